"""Shared fixtures: real nodes on 127.0.0.1 (in-process threads or subprocesses), real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agoranet.core.identity import Identity
from agoranet.node.node import ProviderOptions, build_provider_node
from agoranet.node.server import BackgroundServer, bind, url_of

SRC = Path(__file__).resolve().parent.parent / "src"


def start_provider(home: Path, opts: ProviderOptions | None = None, **limits) -> tuple[BackgroundServer, object]:
    """An in-process provider node on a free 127.0.0.1 port."""
    if not (home / "identity.key").exists():
        Identity.generate().save(home / "identity.key")
    sock = bind()
    app, provider = build_provider_node(home, url_of(sock), opts or ProviderOptions(threads=2), **limits)
    return BackgroundServer(app, sock).start(), provider


@pytest.fixture(scope="session")
def provider(tmp_path_factory) -> Iterator[tuple[str, object]]:
    """One provider on the bundled model, shared by tests that only talk to it."""
    server, prov = start_provider(tmp_path_factory.mktemp("provider"))
    try:
        yield server.url, prov
    finally:
        server.stop()


def operator(home: Path) -> dict[str, str]:
    """The Authorization header of a node's operator: the token in its home (writes to its storage need it)."""
    from agoranet.node.operator import operator_token

    return {"authorization": f"Bearer {operator_token(home)}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeProcess:
    """An `agora` command running as its own process, as users run it."""

    def __init__(self, args: list[str], home: Path, port: int, *, host: str = "127.0.0.1",
                 prefix: list[str] | None = None) -> None:
        self.url = f"http://{host}:{port}"
        # This checkout's code, not whichever agoranet the interpreter has installed.
        env = dict(os.environ, AGORA_HOME=str(home), PYTHONUNBUFFERED="1", PYTHONPATH=str(SRC))
        self.log = home / "node.log"
        home.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "agoranet.cli", *args, "--port", str(port)], env=env,
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 300) -> NodeProcess:  # a loaded 2-core CI box took over 90 s
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited early:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"node not ready:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: the node dies at once, mid-stream, without closing anything."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


FAST_GOSSIP = 0.3  # seconds between gossip rounds in tests


def start_gateway(home: Path, peers: list[str] | None = None, *, host: str = "127.0.0.1",
                  public_host: str | None = None, **config) -> tuple[BackgroundServer, object]:
    """An in-process gateway node on a free port of `host`, gossiping every FAST_GOSSIP seconds; others
    reach it at `public_host` (say, its address on a network namespace's link) when that is given."""
    from agoranet.net.gossip import GossipConfig
    from agoranet.node.gateway import GatewayConfig
    from agoranet.node.node import build_gateway_node

    if not (home / "identity.key").exists():
        Identity.generate().save(home / "identity.key")
    sock = bind(host)
    url = f"http://{public_host}:{sock.getsockname()[1]}" if public_host else url_of(sock)
    app, gateway = build_gateway_node(home, url, peers or [], config=GatewayConfig(**config),
                                      gossip=GossipConfig(interval_s=FAST_GOSSIP))
    return BackgroundServer(app, sock).start(), gateway


def provider_process(home: Path, seed: str, *, price_out: int, extra: list[str] | None = None,
                     host: str = "127.0.0.1", prefix: list[str] | None = None) -> NodeProcess:
    """`agora provide` in its own process, announcing itself to `seed`; call wait_ready() on it."""
    return NodeProcess(["provide", "--host", host, "--peer", seed, "--price-out", str(price_out), "--threads", "1",
                        "--gossip-interval", str(FAST_GOSSIP), *(extra or [])], home, free_port(), host=host,
                       prefix=prefix)


def wait_for(condition, *, timeout: float = 30, what: str = "condition", interval: float = 0.1):
    """Poll `condition` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return value


@pytest.fixture(scope="session")
def real_model(tmp_path_factory) -> Path:
    """A Hugging Face model directory with a real BPE tokenizer and chat template, built locally once."""
    from .realmodel import build_model

    return build_model(tmp_path_factory.mktemp("real-model") / "tiny-bpe-llama")


@pytest.fixture(scope="session")
def real_model_tolerances(real_model, tmp_path_factory) -> Path:
    """fp32 tolerances for `real_model`, calibrated as `agora verify calibrate` does (a small set)."""
    import asyncio
    import json

    from agoranet.engine.models import model_cid
    from agoranet.engine.transformers_engine import load_causal_lm
    from agoranet.node.calibration import calibrate_precision
    from agoranet.verify.tolerances import tolerances_record

    cid = model_cid(real_model)
    reference = load_causal_lm(real_model, "fp32")
    tol = asyncio.run(calibrate_precision(real_model, cid, "fp32", reference, sequences=8, confirm=8,
                                          max_tokens=32, threads=1))  # covers the tests' longest answers (24)
    record = tolerances_record(Identity.generate(), cid, [tol], hardware="test", method="tests: 8+8 sequences")
    path = tmp_path_factory.mktemp("real-model-tol") / f"{cid}.json"
    path.write_text(json.dumps(record.to_json()))
    return path
