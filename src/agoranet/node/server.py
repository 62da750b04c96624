"""Running a node's app with uvicorn: in the foreground (CLI) or in a background thread (demo, tests)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket; port 0 lets the OS pick a free port, so nothing ever clashes."""
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP,
    # and without it Nagle + delayed ACK add ~40 ms to every response written in two parts.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


def _config(app: FastAPI, log_level: str) -> uvicorn.Config:
    # log_config=None: uvicorn's loggers propagate to the root logger that core/logs.py configured (JSON or not).
    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=3,
                          log_config=None)


def serve_forever(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (uvicorn installs the handlers and shuts the lifespan down)."""
    uvicorn.Server(_config(app, log_level)).run(sockets=[sock])


class BackgroundServer:
    """A node served from a thread of this process; `with` starts it and stops it, leaving no port open."""

    def __init__(self, app: FastAPI, sock: socket.socket | None = None, log_level: str = "warning") -> None:
        self.sock = sock or bind()
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(_config(app, log_level))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # main thread owns them
        self._thread = threading.Thread(target=self._run, name=f"agora-node {self.url}", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as exc:  # surfaced by start()
            self._error = exc

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"node at {self.url} failed to start: {self._error}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node at {self.url} did not start within {timeout:.0f}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
