"""Running a node's app with uvicorn: in the foreground (CLI) or in a background thread (demo, tests).

uvicorn's httptools protocol bounds neither how long nor how much a client may send before its
request's headers end (llhttp has no header size limit by default), so a peer trickling headers forever
holds a socket and grows the node without bound. `GuardedHttp` adds both limits: a request whose
headers are not complete within `header_timeout_s` is closed (408), and one whose request line and
headers pass `max_header_bytes` gets 431 and is closed. Idle keep-alive connections close after
`keep_alive_s`, and beyond `max_concurrency` connections and requests in flight new requests get 503.

`QuietServer` is uvicorn's server with a main loop that wakes once a second instead of ten times
(uvicorn's ticks only refresh the date header, once a second, and look for an exit request): an idle
node's process otherwise spends most of its CPU on those wake-ups. An exit request wakes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class HttpLimits:
    header_timeout_s: float = 10.0  # from connection (or the previous response) to the end of the headers
    max_header_bytes: int = 64 << 10  # request line and headers together
    keep_alive_s: float = 5.0  # an idle connection between requests is closed after this
    max_concurrency: int = 4096  # connections plus requests in flight; beyond it new requests get 503


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap on each request's headers."""

    limits = HttpLimits()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_bytes = 0
        self._in_headers = True
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.limits.header_timeout_s, self._headers_too_slow)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_headers and not self.transport.is_closing():  # counted after parsing: a body is not headers
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, "request headers too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_headers:  # the next request on a kept-alive connection: a new deadline
            self._in_headers, self._header_bytes = True, 0
            self._arm()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()  # type: ignore[union-attr]
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._in_headers and not self.transport.is_closing():
            self._refuse(408, "request headers not received in time")

    def _refuse(self, status: int, message: str) -> None:
        self._disarm()
        self._in_headers = False
        if not self.transport.is_closing():
            reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            body = message.encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n%s" % (status, reason, len(body), body))
            self.transport.close()


class QuietServer(uvicorn.Server):
    """`uvicorn.Server` ticking once a second (uvicorn: ten times), and at once when told to exit.

    uvicorn's tick refreshes the date header every tenth tick and checks `should_exit` (set by its
    signal handlers, or by another thread in `BackgroundServer.stop`); here each tick counts as ten,
    so the header is refreshed on every tick, and setting `should_exit` wakes the loop."""

    def __init__(self, config: uvicorn.Config) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit = asyncio.Event()
        self._should_exit = False
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing left to wake
                self._loop.call_soon_threadsafe(self._exit.set)

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000  # on_tick refreshes the date header when counter % 10 == 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._exit.wait()
            should_exit = await self.on_tick(counter)


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


def _config(app: FastAPI, log_level: str, limits: HttpLimits | None = None) -> uvicorn.Config:
    limits = limits or HttpLimits()
    protocol = type("GuardedHttp", (GuardedHttp,), {"limits": limits})  # the limits of this server only
    # log_config=None: uvicorn's loggers propagate to the root logger that core/logs.py configured (JSON or not).
    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=3,
                          log_config=None, http=protocol, timeout_keep_alive=int(limits.keep_alive_s) or 1,
                          limit_concurrency=limits.max_concurrency)


def serve_forever(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM (uvicorn installs the handlers and shuts the lifespan down).

    A role that cannot start for a reason Agora names (an AgoraError: an upstream that does not answer …)
    is raised here, for the CLI to print with its hint, instead of uvicorn logging its traceback."""
    app.state.startup_error = None

    def no_startup_traceback(record: logging.LogRecord) -> bool:
        return not (app.state.startup_error is not None and str(record.msg).startswith("Traceback"))

    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(no_startup_traceback)
    try:
        QuietServer(_config(app, log_level)).run(sockets=[sock])
    except SystemExit:  # uvicorn exits when the lifespan fails to start
        if app.state.startup_error is not None:
            raise app.state.startup_error from None
        raise
    finally:
        uvicorn_log.removeFilter(no_startup_traceback)


class BackgroundServer:
    """A node served from a thread of this process; `with` starts it and stops it, leaving no port open."""

    def __init__(self, app: FastAPI, sock: socket.socket | None = None, log_level: str = "warning",
                 limits: HttpLimits | None = None) -> None:
        self.sock = sock or bind()
        self.url = url_of(self.sock)
        self.server = QuietServer(_config(app, log_level, limits))
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

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
