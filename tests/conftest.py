"""Shared fixtures: real nodes on 127.0.0.1 (in-process threads or subprocesses), real HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def start_verifier(home: Path, config: object | None = None, **kwargs) -> tuple[BackgroundServer, object]:
    """An in-process verifier node (a `VerifierConfig`, audit fraction 1 by default) on a free 127.0.0.1 port."""
    from agoranet.node.node import build_verifier_node
    from agoranet.node.verifier import VerifierConfig

    app, role = build_verifier_node(home, config or VerifierConfig(audit_fraction=1.0, seed=1), **kwargs)
    return BackgroundServer(app, bind()).start(), role


class Nodes:
    """The node factory: in-process nodes under `root` on free 127.0.0.1 ports, each in its own folder,
    all stopped (newest first) at the end, so a test needs no try/finally of its own. The `nodes`
    fixture gives one per test; `with Nodes(root) as nodes:` serves a wider-scoped fixture."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[BackgroundServer] = []

    def _keep(self, started: tuple[BackgroundServer, object]) -> tuple[BackgroundServer, object]:
        self.servers.append(started[0])
        return started

    def provider(self, name: str = "provider", opts: ProviderOptions | None = None, **limits):
        return self._keep(start_provider(self.root / name, opts, **limits))

    def gateway(self, name: str = "gateway", peers: list[str] | None = None, **config):
        return self._keep(start_gateway(self.root / name, peers, **config))

    def verifier(self, name: str = "verifier", config: object | None = None, **kwargs):
        return self._keep(start_verifier(self.root / name, config, **kwargs))

    def serve(self, app, sock=None) -> BackgroundServer:
        """Any other app (a storage peer, a hand-built node) on `sock` or a free port."""
        server = BackgroundServer(app, sock).start()
        self.servers.append(server)
        return server

    def stop(self) -> None:
        while self.servers:
            self.servers.pop().stop()

    def __enter__(self) -> Nodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def nodes(tmp_path) -> Iterator[Nodes]:
    with Nodes(tmp_path) as started:
        yield started


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


def fetch_receipt(agora: dict):
    """The full receipt a (compact) answer names: fetched by CID from its `receipt_url`, checked to be the one
    its CID and the provider's signed summary name."""
    from agoranet.core.records import ReceiptBody, verify_record
    from agoranet.wire.openai import check_summary, read_summary

    summary = read_summary(agora)
    receipt = verify_record(httpx.get(agora["receipt_url"], timeout=30).json()["record"], ReceiptBody)
    assert str(receipt.cid) == agora["receipt_cid"]
    check_summary(summary, receipt)
    return receipt


MSG = [{"role": "user", "content": "write a function that reverses a list — naïve 🐍"}]  # the engine tests' ask


def audit(verifier, receipt, node: str):
    """`verifier` judges `receipt` with the canonical request fetched from the provider at `node`."""
    r = httpx.get(f"{node}/agora/v1/records/{receipt.body.request}",
                  headers={"accept": "application/vnd.ipld.dag-cbor"}, timeout=30)
    return verifier.judge(receipt, r.content)


def check_sdk_answer_replays(net, verifier, *, model: str, engine: str, precision: str, max_tokens: int,
                             temperature: float, timeout: float | None = None):
    """Through a gateway (`net`: gateway URL, provider URL, provider) the official SDK gets an answer whose receipt
    names `engine` and `precision`, binds the text, and passes `verifier`'s replay; the same seed streamed with
    logprobs gives the same text; the receipt with one output token changed and re-signed fails at that position.
    Returns the receipt."""
    import openai

    from agoranet.core.records import sign_record

    url, provider_url, prov = net
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                           **({"timeout": timeout} if timeout else {}))
    ask = {"model": model, "messages": MSG, "max_tokens": max_tokens, "temperature": temperature, "seed": 3}
    r = client.chat.completions.create(**ask)
    receipt = fetch_receipt(r.model_extra["agora"])  # by CID from the provider, checked against its summary
    assert prov.offer().body.engine == engine and receipt.body.precision == precision
    assert receipt.body.output_text == r.choices[0].message.content and len(receipt.body.output_tokens) > 0
    judgement = audit(verifier, receipt, provider_url)
    assert judgement.verdict.body.ok, judgement.verdict.body.failure
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **ask, stream=True, logprobs=True, top_logprobs=3) if c.choices)
    assert streamed == r.choices[0].message.content  # same seed, same answer: streamed or not, logprobs or not

    tokens = list(receipt.body.output_tokens)
    tokens[1] = 300 if tokens[1] != 300 else 301  # an ordinary BPE merge, not an end token
    forged = sign_record(prov.identity, receipt.body.model_copy(update={"output_tokens": tokens}))
    bad = audit(verifier, forged, provider_url)
    assert not bad.verdict.body.ok and bad.verdict.body.failure.position == 1
    return receipt


@contextmanager
def killed_mid_stream(tmp_path: Path, extra: list[str], ask: dict, tag: str) -> Iterator[tuple[object, str, str]]:
    """Two `agora provide` processes (`extra`: engine and model options) behind a gateway; the cheaper one is
    SIGKILLed once 10 characters of a streamed answer have arrived. Checks that the stream ends with exactly the
    text of an uninterrupted run on the other (same request id, so the rule draws the same) and that the last
    receipt binds the tokens it continued from; yields (that receipt, the URL of its provider, the text) while
    both are still up, for the engine's own replay check."""
    import openai

    gw_server, gateway = start_gateway(tmp_path / "gw", stall_timeout_s=5.0)
    a = provider_process(tmp_path / "a", gw_server.url, price_out=100_000, extra=extra)
    b = provider_process(tmp_path / "b", gw_server.url, price_out=400_000, extra=extra)
    try:
        for p in (a, b):
            p.wait_ready()
        ids = [httpx.get(f"{p.url}/agora/v1/offer").json()["record"]["signer"] for p in (a, b)]
        wait_for(lambda: set(ids) <= set(gateway.discovery.members()), what="both providers")
        direct = openai.OpenAI(base_url=f"{b.url}/v1", api_key="x", max_retries=0, timeout=120)
        for n in range(20):  # one that does not end early (a random-weight model may sample end-of-turn)
            rid = {"agora": {"request_id": f"{tag}-{n}"}}
            whole = direct.chat.completions.create(**ask, extra_body=rid)
            if whole.usage.completion_tokens == ask["max_tokens"]:
                break
        expected = whole.choices[0].message.content

        client = openai.OpenAI(base_url=f"{gw_server.url}/v1", api_key="x", max_retries=0, timeout=120)
        text, agora = "", None
        for chunk in client.chat.completions.create(**ask, stream=True,
                                                  extra_body={"provider": {"sort": "price"}} | rid):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                if len(text) >= 10 and a.proc.poll() is None:
                    a.kill()
            agora = (chunk.model_extra or {}).get("agora", agora)
        assert a.proc.poll() is not None, "the stream ended before the kill"
        assert text == expected
        last = fetch_receipt(agora["receipts"][-1])  # by CID from the provider that finished it
        assert agora["provider"] == ids[1] and 0 < len(last.body.prefix_tokens) < ask["max_tokens"]
        assert list(last.body.prefix_tokens) + list(last.body.output_tokens) == list(
            fetch_receipt(whole.model_extra["agora"]).body.output_tokens)
        yield last, b.url, text
    finally:
        for p in (a, b):
            p.stop()
        gw_server.stop()


FULL = {"agora": {"receipt": "full"}}  # a request's opt-in to the full receipt in its answer


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
        wait_for_process(self.proc, lambda: httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200,
                         log=self.log, timeout=timeout, what="node")
        return self

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


def wait_for_process(process: subprocess.Popen, probe, *, log: Path, timeout: float, what: str):
    """Poll `probe` (an HTTP call: transport errors count as not yet) until it returns something truthy and
    return that; fail at once, with the process's log, if the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()}")
        try:
            if value := probe():
                return value
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready within {timeout:.0f}s:\n{log.read_text()}")
        time.sleep(0.1)


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
                                          max_tokens=40, threads=1))  # covers the tests' longest answers (40: vLLM failover)
    record = tolerances_record(Identity.generate(), cid, [tol], hardware="test", method="tests: 8+8 sequences")
    path = tmp_path_factory.mktemp("real-model-tol") / f"{cid}.json"
    path.write_text(json.dumps(record.to_json()))
    return path


def tolerance_file(path: Path, changes: dict[str, dict] | None = None, *, model: str = "agora-tiny") -> Path:
    """A signed tolerance record for `model` made of the shipped classes named in `changes`, each with its
    fields changed as given (say {"fp32": {"max_output_tokens": 16}}); all shipped classes when None."""
    import json

    from agoranet.engine.models import model_cid, resolve_model
    from agoranet.verify.tolerances import default_tolerances, tolerances_record

    cid = model_cid(resolve_model(model)[0])
    shipped = default_tolerances(cid).body
    classes = [c.model_copy(update=(changes or {}).get(c.precision, {})) for c in shipped.classes
               if changes is None or c.precision in changes]
    record = tolerances_record(Identity.generate(), cid, classes, hardware="test", method="tests: shipped, changed")
    path.write_text(json.dumps(record.to_json()))
    return path
