"""A real BPE-tokenizer Llama (built locally) served by `agora provide --model DIR`, asked through a
gateway with the official SDK, its receipts replayed by a verifier; edited tokens and a swapped model caught."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from agoranet.core.identity import Identity
from agoranet.core.records import decode_canonical, sign_record
from agoranet.engine.models import model_cid
from agoranet.engine.tokenizer import HFTokenizer, load_tokenizer
from agoranet.engine.transformers_engine import TransformersEngine
from agoranet.node.calibration import honest_requests, honest_runs
from agoranet.node.node import build_verifier_node
from agoranet.node.server import BackgroundServer, bind
from agoranet.node.verifier import ReplayVerifier, VerifierConfig

from ..conftest import fetch_receipt, provider_process, start_gateway, wait_for
from ..realmodel import build_model

# Every test here needs the real model calibrated and served by its own process (~20 s before the first answer).
pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "write a function that reverses a list — naïve 🐍"}]


@pytest.fixture(scope="module")
def net(tmp_path_factory, real_model, real_model_tolerances):
    root = tmp_path_factory.mktemp("realnet")
    gw_server, gateway = start_gateway(root / "gw")
    app, verifier = build_verifier_node(root / "verifier", VerifierConfig(audit_fraction=0.0),
                                        models=[str(real_model)], tolerance_files=[real_model_tolerances])
    v_server = BackgroundServer(app, bind()).start()
    proc = provider_process(root / "provider", gw_server.url, price_out=100_000,
                            extra=["--model", str(real_model), "--tolerances", str(real_model_tolerances)])
    try:
        proc.wait_ready(timeout=300)
        peer = httpx.get(f"{proc.url}/agora/v1/offer").json()["record"]["signer"]
        wait_for(lambda: peer in gateway.discovery.members(), what="the provider to be discovered")
        yield gw_server.url, proc, v_server.url, root / "provider"
    finally:
        proc.stop()
        v_server.stop()
        gw_server.stop()


def audit(verifier_url: str, receipt, node: str) -> dict:
    """Ask the verifier node over HTTP, as a user would: it fetches the canonical request from `node`."""
    r = httpx.post(f"{verifier_url}/agora/v1/verify", json={"receipt": receipt.to_json(), "node": node}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_sdk_answer_from_a_bpe_model_carries_its_own_token_ids_and_replays(net, real_model, temperature):
    url, proc, verifier, _ = net
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    name = real_model.name
    r = client.chat.completions.create(model=name, messages=MSG, max_tokens=24, temperature=temperature, seed=7)
    agora = r.model_extra["agora"]
    receipt = fetch_receipt(agora)
    body = receipt.body
    tok = load_tokenizer(real_model)
    assert isinstance(tok, HFTokenizer) and max(body.output_tokens) >= 256  # BPE merges, not bytes
    assert tok.decode([t for t in body.output_tokens if t not in tok.eos_tokens]) == r.choices[0].message.content
    request = decode_canonical(httpx.get(f"{proc.url}/agora/v1/records/{body.request}",
                                         headers={"accept": "application/vnd.ipld.dag-cbor"}).content)
    assert request["prompt_tokens"] == tok.chat_prompt([("user", MSG[0]["content"])])
    assert body.prompt_tokens == len(request["prompt_tokens"])
    judgement = audit(verifier, receipt, proc.url)
    assert judgement["ok"], judgement["verdict"]["body"]["failure"]
    assert judgement["verdict"]["body"]["checked_positions"] == len(body.output_tokens) > 0

    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=name, messages=MSG, max_tokens=24, temperature=temperature, seed=7, stream=True, logprobs=True,
        top_logprobs=3) if c.choices)
    assert streamed == r.choices[0].message.content  # same seed, same answer: streamed or not, logprobs or not


def test_edited_token_signed_by_the_provider_is_caught(net, real_model):
    url, proc, verifier, home = net
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="tiny-bpe-llama", messages=MSG,
                                       max_tokens=16, temperature=0.8, seed=11)
    body = fetch_receipt(r.model_extra["agora"]).body
    tok = load_tokenizer(real_model)
    tokens = list(body.output_tokens)
    tokens[3] = next(t for t in range(300, tok.vocab_size) if t != tokens[3] and t not in tok.eos_tokens)
    forged = body.model_copy(update={"output_tokens": tokens,
                                     "output_text": tok.decode([t for t in tokens if t not in tok.eos_tokens])})
    provider_key = Identity.load(home / "identity.key")  # the provider itself signs the edit
    judgement = audit(verifier, sign_record(provider_key, forged), proc.url)
    failure = judgement["verdict"]["body"]["failure"]
    assert not judgement["ok"] and failure["position"] == 3 and failure["kind"] in ("token", "logprob")
    assert judgement["fraud_proof"]["body"]["provider"] == str(provider_key.peer_id)


def test_provider_serving_other_weights_under_the_model_cid_is_caught(real_model, real_model_tolerances,
                                                                      tmp_path):
    cid = model_cid(real_model)
    other = build_model(tmp_path / "other", seed=1)  # same tokenizer and shape, different weights

    async def run():
        engine = TransformersEngine(other, model_cid=cid, model_name="tiny-bpe-llama", threads=1)
        await engine.start()
        try:
            reqs = honest_requests(4, seed=5, model_cid=cid, max_tokens=12, temperatures=(0.0, 0.8), top_ps=(1.0,))
            return await honest_runs(engine, reqs, 4)
        finally:
            await engine.stop()

    verifier = ReplayVerifier(Identity.generate(), models=[str(real_model)], tolerance_files=[real_model_tolerances])
    for run in asyncio.run(run()):
        receipt = sign_record(Identity.generate(), run.body)
        judgement = verifier.judge(receipt, run.request_bytes)
        assert not judgement.result.ok and judgement.result.failure.kind in ("token", "logprob", "top_logprobs")
