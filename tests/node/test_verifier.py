"""The verifier: every cheat fails replay where it happened, fraud proofs re-check, reputation over HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch
from typer.testing import CliRunner

from agoranet.cli.verify_cmd import verify_app
from agoranet.core.errors import AgoraError, RecordError
from agoranet.core.identity import Identity
from agoranet.core.records import ReceiptBody, sign_record, verify_record
from agoranet.engine.models import model_cid, resolve_model
from agoranet.engine.transformers_engine import TransformersEngine
from agoranet.node.calibration import honest_requests, honest_runs
from agoranet.node.cheat import TAMPERED_INDEX, CheatingEngine
from agoranet.node.node import ProviderOptions, build_verifier_node
from agoranet.node.judge import ReplayVerifier
from agoranet.node.verifier import VerifierConfig
from agoranet.verify.records import FailureEvidence, FraudProofBody


MODEL_DIR = resolve_model("agora-tiny")[0]
MODEL_CID = model_cid(MODEL_DIR)
PROVIDER = Identity.generate()


def generate(requests, cheat: str | None = None):
    torch.set_num_threads(1)
    engine = TransformersEngine(MODEL_DIR, model_cid=MODEL_CID, threads=1)
    engine = CheatingEngine(engine, cheat) if cheat else engine

    async def go():
        await engine.start()
        try:
            return await honest_runs(engine, requests, 4)
        finally:
            await engine.stop()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def requests():
    return honest_requests(4, seed=3, model_cid=MODEL_CID, max_tokens=24, temperatures=(0.7, 1.0), top_ps=(1.0,))


@pytest.fixture(scope="module")
def honest(requests):
    return generate(requests)


@pytest.fixture(scope="module")
def verifier():
    return ReplayVerifier(Identity.generate())


def signed(run):
    return sign_record(PROVIDER, run.body)


def expected_failure(cheat: str, honest_run, cheat_run) -> set[tuple[str, int]]:
    if cheat in ("model", "prompt"):  # the whole distribution differs from the first token on
        return {("logprob", 0), ("token", 0), ("top_logprobs", 0)}
    if cheat == "token":
        return {("token", TAMPERED_INDEX), ("nucleus", TAMPERED_INDEX)}
    if cheat == "logprobs":
        first = next(i for i, lp in enumerate(honest_run.body.logprobs) if min(1.0, -lp) > 1e-3)
        return {("logprob", first)}
    # wrong temperature / ignored seed: the first token where the cheat's choice departs from the rule's
    first = next(i for i, (a, b) in enumerate(zip(honest_run.body.output_tokens, cheat_run.body.output_tokens))
                 if a != b)
    return {("token", first), ("nucleus", first)}


def test_honest_receipts_get_a_passing_signed_verdict(verifier, honest):
    for run in honest:
        j = verifier.judge(signed(run), run.request_bytes)
        assert j.verdict.body.ok and j.proof is None, j.verdict.body.failure
        assert j.verdict.signer == str(verifier.identity.peer_id) and j.verdict.body.provider == str(PROVIDER.peer_id)
        # the verdict names the limits applied: the shipped record's short-prompt bucket, not the whole range
        whole, applied = verifier.tolerances(MODEL_CID, "fp32"), j.verdict.body.tolerances
        assert len(run.prompt) <= 128 and applied.max_prompt_tokens == whole.buckets[0].max_prompt_tokens == 128
        assert applied.sequences == whole.buckets[0].sequences < whole.sequences


@pytest.mark.parametrize("cheat", ["model", "token", "logprobs", "temperature", "seed", "prompt"])
def test_every_cheat_fails_replay_at_the_position_it_happened(verifier, requests, honest, cheat):
    cheated = generate(requests, cheat)
    for honest_run, cheat_run in zip(honest, cheated):
        if cheat_run.body.output_tokens == honest_run.body.output_tokens and cheat in ("temperature", "seed"):
            continue  # rare: the cheat happened to produce the honest answer
        j = verifier.judge(signed(cheat_run), cheat_run.request_bytes)
        f = j.verdict.body.failure
        assert not j.verdict.body.ok and j.proof is not None
        assert (f.kind, f.position) in expected_failure(cheat, honest_run, cheat_run), f


def test_fraud_proof_rechecks_for_a_third_party_and_a_false_proof_is_caught(verifier, requests, honest):
    cheat_run = generate(requests[:1], "token")[0]
    proof = verifier.judge(signed(cheat_run), cheat_run.request_bytes).proof
    third_party = ReplayVerifier(Identity.generate())
    recheck = third_party.recheck(verify_record(proof.to_json(), FraudProofBody))
    assert recheck.holds and recheck.provider == str(PROVIDER.peer_id)
    assert recheck.result.failure.position == TAMPERED_INDEX and "proof claimed" not in recheck.detail

    liar = Identity.generate()
    run = honest[0]
    receipt = signed(run)
    false_proof = sign_record(liar, FraudProofBody(
        receipt_cid=str(receipt.cid), receipt=receipt.encode().hex(), request=run.request_bytes.hex(),
        provider=receipt.signer, evidence=FailureEvidence(kind="token", position=1, detail="made up"),
        tolerances=proof.body.tolerances, reference_precision="fp32", created_ms=0,
    ))
    recheck = third_party.recheck(false_proof)
    assert not recheck.holds and recheck.issuer == str(liar.peer_id)

    # a proof whose embedded receipt was swapped for another is rejected outright
    swapped = sign_record(liar, proof.body.model_copy(update={"receipt": receipt.encode().hex()}))
    with pytest.raises(RecordError):
        third_party.recheck(swapped)


def chat(url: str, content: str, seed: int) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "agora-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 16,
        "temperature": 0.8, "seed": seed})
    r.raise_for_status()
    return r.json()["agora"]["receipt_cid"]


def test_verifier_role_audits_providers_over_http_and_excludes_the_cheater(nodes, tmp_path):
    honest_node, honest_prov = nodes.provider("honest", ProviderOptions(threads=1))
    cheat_node, cheat_prov = nodes.provider("cheat", ProviderOptions(threads=1, cheat="token"))
    verifier, role = nodes.verifier(config=VerifierConfig(
        audit_fraction=1.0, sources=(honest_node.url, cheat_node.url), poll_interval_s=0.2, seed=0))
    honest_id, cheat_id = str(honest_prov.identity.peer_id), str(cheat_prov.identity.peer_id)
    good = [chat(honest_node.url, "add two numbers", s) for s in (1, 2)]
    bad = [chat(cheat_node.url, "add two numbers", s) for s in (1, 2)]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rep = httpx.get(f"{verifier.url}/agora/v1/reputation").json()
        if rep["providers"].get(honest_id, {}).get("verified", 0) >= 2 and \
                rep["providers"].get(cheat_id, {}).get("verified", 0) >= 2:
            break
        time.sleep(0.3)
    h, c = rep["providers"][honest_id], rep["providers"][cheat_id]
    assert (h["passed"], h["excluded"]) == (2, False) and h["score"] > 0.5
    assert c["excluded"] and c["score"] == 0 and len(c["fraud_proofs"]) == 2
    assert rep["verifier"] == str(role.identity.peer_id)

    # a user asks about one receipt: replayed at once, whatever the audit fraction
    asked = httpx.post(f"{verifier.url}/agora/v1/verify",
                       json={"receipt_cid": good[0], "node": honest_node.url}, timeout=60).json()
    assert asked["ok"] and verify_record(asked["verdict"]).body.receipt == good[0]

    # anyone re-checks the fraud proof from the verifier's store with the CLI
    runner, home = CliRunner(), str(tmp_path / "cli")
    proof_cid = c["fraud_proofs"][0]
    out = runner.invoke(verify_app, ["--fraud-proof", proof_cid, "--node", verifier.url, "--home", home])
    assert out.exit_code == 0 and "fraud proof holds" in out.output, out.output
    out = runner.invoke(verify_app, [good[1], "--node", honest_node.url, "--home", home])
    assert out.exit_code == 0 and "valid" in out.output, out.output
    out = runner.invoke(verify_app, [bad[0], "--node", cheat_node.url, "--home", home,
                                     "--out", str(tmp_path / "v.json")])
    assert out.exit_code == 3 and f"fails at position {TAMPERED_INDEX}" in out.output, out.output
    out = runner.invoke(verify_app, ["--fraud-proof", str(tmp_path / "v.json"), "--home", home])
    assert out.exit_code == 0, out.output

    # a false fraud proof submitted to the verifier is caught and marks its issuer
    receipt = verify_record(httpx.get(f"{honest_node.url}/agora/v1/records/{good[1]}").json()["record"],
                            ReceiptBody)
    request = httpx.get(f"{honest_node.url}/agora/v1/records/{receipt.body.request}",
                        headers={"accept": "application/vnd.ipld.dag-cbor"}).content
    liar = Identity.generate()
    false_proof = sign_record(liar, FraudProofBody(
        receipt_cid=good[1], receipt=receipt.encode().hex(), request=request.hex(), provider=honest_id,
        evidence=FailureEvidence(kind="token", position=0, detail="made up"),
        tolerances=verify_record(asked["verdict"]).body.tolerances, reference_precision="fp32", created_ms=0))
    answer = httpx.post(f"{verifier.url}/agora/v1/fraud-proofs", json={"record": false_proof.to_json()},
                        timeout=60).json()
    assert answer["holds"] is False
    rep = httpx.get(f"{verifier.url}/agora/v1/reputation").json()
    assert rep["verifiers"][str(liar.peer_id)]["false_proofs"] == [str(false_proof.cid)]
    assert not rep["providers"][honest_id]["excluded"]


def test_audit_sampling_follows_the_configured_fraction(tmp_path, honest):
    async def go(fraction: float) -> int:
        _, role = build_verifier_node(tmp_path / f"v{fraction}", VerifierConfig(audit_fraction=fraction, seed=1))
        role._queue = asyncio.Queue()
        receipts = [sign_record(Identity.generate(), honest[0].body) for _ in range(200)]
        queued = sum(role.offer(r, node=None) for r in receipts)
        assert not role.offer(receipts[0], node=None)  # seen once is enough
        return queued

    assert asyncio.run(go(0.0)) == 0
    assert 30 <= asyncio.run(go(0.25)) <= 70
    assert asyncio.run(go(1.0)) == 200


async def test_the_audit_loop_replays_the_receipts_it_has_queued_together(tmp_path, honest):
    _, role = build_verifier_node(tmp_path / "v", VerifierConfig(audit_fraction=1.0, seed=1))
    await role.start()
    try:
        for run in honest:  # queued before the loop wakes: one batch
            assert role.offer(signed(run), node=None, request_bytes=run.request_bytes)
        deadline = time.monotonic() + 60
        while role.audited + role.audit_errors < len(honest) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (role.audited, role.audit_errors, role.audit_batches) == (len(honest), 0, 1)
        assert role.reputation.providers[str(PROVIDER.peer_id)].passed == len(honest)
    finally:
        await role.stop()


def test_receipts_judged_together_get_the_verdicts_they_get_one_by_one(verifier, honest):
    """The audit loop replays queued receipts in one batch: same verdicts, and a receipt that cannot be judged
    (its request is not the one it binds) is reported alone without sinking the others."""
    tokens = list(honest[0].body.output_tokens)
    tokens[3] = (tokens[3] + 11) % 256
    tampered = sign_record(PROVIDER, honest[0].body.model_copy(update={"output_tokens": tokens}))
    items = [(signed(r), r.request_bytes) for r in honest]
    items += [(tampered, honest[0].request_bytes), (signed(honest[1]), honest[2].request_bytes)]
    together = verifier.judge_many(items)
    assert [j.verdict.body.ok for j in together[: len(honest)]] == [True] * len(honest)
    assert not together[len(honest)].verdict.body.ok and together[len(honest)].verdict.body.failure.position == 3
    assert isinstance(together[-1], AgoraError) and "not the one it binds" in str(together[-1])
    for (receipt, request), j in zip(items[:-1], together[:-1]):
        alone = verifier.judge(receipt, request)
        a, b = alone.verdict.body, j.verdict.body
        assert a.ok == b.ok and (a.failure is None) == (b.failure is None)
        assert a.failure is None or (a.failure.kind, a.failure.position) == (b.failure.kind, b.failure.position)


def test_receipts_outside_the_calibrated_range_are_violations_not_replayed(tmp_path, honest):
    """Tolerances calibrated on outputs of at most 16 tokens say nothing about a 24-token receipt, so it is never
    replayed (no fraud proof); a provider refuses such requests up front, so signing one is its own doing: a
    signed violation that counts against it."""
    import json

    from agoranet.verify.tolerances import SequenceStats, class_tolerance, tolerances_record

    stats = SequenceStats(flips=[0], flip_margins=[0.0], lp_means=[0.0], max_prompt_tokens=1024,
                          max_output_tokens=16, batch_sizes=(1,))
    tol = class_tolerance("fp32", (0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0), sequences=1, confirm_sequences=1, stats=stats)
    path = tmp_path / "short.json"
    path.write_text(json.dumps(tolerances_record(Identity.generate(), MODEL_CID, [tol], hardware="test",
                                                 method="test").to_json()))
    short = ReplayVerifier(Identity.generate(), tolerance_files=[path])
    run = next(r for r in honest if len(r.body.output_tokens) > 16)
    j = short.judge(signed(run), run.request_bytes)
    v = verify_record(j.verdict.encode()).body
    assert (v.ok, v.failure.kind, v.checked_positions, j.proof) == (False, "violation", 0, None)
    assert v.failure.detail.startswith("range: ") and "output tokens exceed the 16" in v.failure.detail
