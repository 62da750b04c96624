"""llama.cpp engine: a GGUF (written from the locally built BPE Llama) served in process under Agora's
sampling rule; the official SDK through a gateway; a verifier replays with the same GGUF and passes
honest receipts, catches edited tokens and a provider serving another quantization under the file's CID."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace

import pytest

pytest.importorskip("llama_cpp", reason=os.environ.get("AGORA_LLAMACPP_SKIP_REASON") or
                    "llama-cpp-python is not installed (pip install 'agoranet[llamacpp]')")
pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'agoranet[llamacpp]')")

from agoranet.core.identity import Identity  # noqa: E402
from agoranet.core.records import sign_record  # noqa: E402
from agoranet.engine.llamacpp_engine import GGUFModel, LlamaCppEngine  # noqa: E402
from agoranet.engine.models import model_cid  # noqa: E402
from agoranet.net.gossip import GossipConfig  # noqa: E402
from agoranet.node.calibration import calibrate_precision, honest_requests, honest_runs  # noqa: E402
from agoranet.node.node import ProviderOptions  # noqa: E402
from agoranet.node.provider import derived_request_id  # noqa: E402
from agoranet.node.verifier import ReplayVerifier  # noqa: E402
from agoranet.verify.tolerances import tolerances_record  # noqa: E402

from ..conftest import (  # noqa: E402
    FAST_GOSSIP, MSG, audit, check_sdk_answer_replays, killed_mid_stream, start_gateway, start_provider, wait_for,
)
from ..realmodel import write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def ggufs(real_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return write_gguf(real_model, d / "tiny-q8.gguf", "Q8_0"), write_gguf(real_model, d / "tiny-f32.gguf", "F32")


@pytest.fixture(scope="module")
def tolerances(ggufs, tmp_path_factory):
    path = ggufs[0]
    cid = model_cid(path)
    engine = LlamaCppEngine(path, model_cid=cid, model_name="tiny-q8", threads=1)
    tol = asyncio.run(calibrate_precision(path, cid, engine.precision, GGUFModel(path, threads=1, all_logits=True),
                                          sequences=8, confirm=8, max_tokens=40, engine=engine,  # the failover test asks 40
                                          # 8 sequences miss llama.cpp's heavy tail (most replay bit-identical, a few
                                          # deviate by up to ~0.07): the floor is what 200 calibration sequences give
                                          # (benchmarks/verification.py --engine llamacpp: τ_lp 0.13, τ_top 0.15)
                                          floor=0.15))
    out = tmp_path_factory.mktemp("gguf-tol") / "tol.json"
    out.write_text(json.dumps(tolerances_record(Identity.generate(), cid, [tol], hardware="test",
                                                method="tests").to_json()))
    return out


@pytest.fixture(scope="module")
def verifier(ggufs, tolerances):
    return ReplayVerifier(Identity.generate(), models=[str(ggufs[0])], tolerance_files=[tolerances])


@pytest.fixture(scope="module")
def net(tmp_path_factory, ggufs, tolerances):
    root = tmp_path_factory.mktemp("llamanet")
    gw_server, gateway = start_gateway(root / "gw")
    server, prov = start_provider(root / "p", ProviderOptions(engine="llamacpp", model=str(ggufs[0]), threads=1,
                                                              tolerance_files=[tolerances]),
                                  peers=[gw_server.url], gossip=GossipConfig(interval_s=FAST_GOSSIP))
    try:
        wait_for(lambda: str(prov.identity.peer_id) in gateway.discovery.members(), what="the provider")
        yield gw_server.url, server.url, prov
    finally:
        server.stop()
        gw_server.stop()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sdk_through_gateway_gets_a_replayable_llamacpp_answer(net, verifier, temperature):
    check_sdk_answer_replays(net, verifier, model="tiny-q8", engine="llamacpp", precision="gguf-q8_0", max_tokens=20,
                             temperature=temperature)


def test_another_quantization_under_the_files_cid_is_caught(ggufs, verifier):
    q8, f32 = ggufs
    cid = model_cid(q8)

    async def run():
        engine = LlamaCppEngine(f32, model_cid=cid, model_name="tiny-q8", threads=1)
        engine.precision = "gguf-q8_0"  # claims the Q8_0 file it does not run
        reqs = honest_requests(4, seed=9, model_cid=cid, max_tokens=12, temperatures=(0.0, 0.8), top_ps=(1.0,))
        return await honest_runs(engine, reqs, 2)

    for run in asyncio.run(run()):
        judgement = verifier.judge(sign_record(Identity.generate(), run.body), run.request_bytes)
        assert not judgement.result.ok and judgement.result.failure.kind in ("token", "logprob", "top_logprobs")


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_llamacpp_provider_killed_mid_stream_is_continued_without_a_lost_or_repeated_token(
        ggufs, tolerances, verifier, tmp_path, temperature):
    """Two `agora provide --engine llamacpp` processes; the cheap one is SIGKILLed mid-stream. The stream
    completes on the other with exactly the text an uninterrupted run gives (same GGUF, same seed), and the
    last receipt, binding the tokens it continued from, replays."""
    from agoranet.engine.llamacpp_engine import GGUFModel as Tok

    extra = ["--engine", "llamacpp", "--model", str(ggufs[0]), "--token-delay-ms", "60", "--tolerances", str(tolerances)]
    ask = dict(model="tiny-q8", messages=MSG, max_tokens=40, temperature=temperature, seed=5)
    with killed_mid_stream(tmp_path, extra, ask, f"llamacpp-failover-{temperature}") as (last, url, text):
        tok = Tok(ggufs[0], threads=1)
        assert tok.decode(list(last.body.prefix_tokens) + list(last.body.output_tokens)) == text
        judgement = audit(verifier, last, url)
        assert judgement.verdict.body.ok, judgement.verdict.body.failure


def test_receipts_sharing_a_prompt_replay_together(ggufs, verifier):
    """A verifier judging several receipts at once replays a shared prompt once (verify.replay's batched path)
    through the GGUF model; each verdict equals the one-at-a-time verdict, and an edit is still pinned."""
    q8 = ggufs[0]
    cid = model_cid(q8)

    async def run():
        engine = LlamaCppEngine(q8, model_cid=cid, model_name="tiny-q8", threads=1)
        reqs = honest_requests(3, seed=21, model_cid=cid, max_tokens=12, temperatures=(0.8,), top_ps=(1.0,))
        same = [replace(reqs[0], sampling=replace(reqs[0].sampling, seed=s)) for s in (1, 2, 3)]
        same = [replace(r, request_id=derived_request_id(r, cid)) for r in same]
        return await honest_runs(engine, same + reqs, 1)

    runs = asyncio.run(run())
    b = runs[1].body
    tokens = list(b.output_tokens)
    tokens[2] = 300 if tokens[2] != 300 else 301
    runs[1] = replace(runs[1], body=b.model_copy(update={"output_tokens": tokens}))
    items = [(sign_record(Identity.generate(), r.body), r.request_bytes) for r in runs]
    together = verifier.replay_many(items)
    alone = [verifier.replay(*item)[0] for item in items]
    assert [t[0].ok for t in together] == [a.ok for a in alone] == [True, False, True, True, True, True]
    assert together[1][0].failure.position == alone[1].failure.position == 2
