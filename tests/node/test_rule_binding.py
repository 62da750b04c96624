"""Receipts name the sampling rule they were chosen by: a verifier judges by that name, a rule it does not judge
is its provider's violation (never a fraud proof under another rule), and a receipt naming none is refused."""

from __future__ import annotations

import httpx
import pytest

from agoranet.core.errors import MalformedRecord
from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, ReceiptBody, encode_canonical, sign_record, verify_record
from agoranet.engine.vllm_rule import RULE_DIGEST as VLLM_RULE_DIGEST
from agoranet.verify.rules import RULE, RULE_DIGEST

from ..conftest import FULL

MSG = [{"role": "user", "content": "name your rule"}]


@pytest.fixture(scope="module")
def answer(provider):
    url, _ = provider
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "agora-tiny", "messages": MSG, "max_tokens": 6, "temperature": 0.8, "seed": 4} | FULL)
    assert r.status_code == 200, r.text
    return r.json()["agora"]


def test_receipts_and_offers_name_the_rule_they_sample_by(provider, answer):
    url, _ = provider
    receipt = verify_record(answer["receipt"], ReceiptBody).body
    assert (receipt.rule, receipt.rule_digest) == (RULE, RULE_DIGEST) and RULE_DIGEST == VLLM_RULE_DIGEST
    assert verify_record(httpx.get(f"{url}/agora/v1/offer").json()["record"], OfferBody).body.rule == RULE


def test_a_receipt_naming_no_rule_is_refused_with_the_reason(nodes, answer):
    """What a provider signed before receipts named their rule: v1 or v2, nobody can tell which to judge by."""
    key = Identity.generate()
    body = {k: v for k, v in verify_record(answer["receipt"], ReceiptBody).body.model_dump().items()
            if k not in ("rule", "rule_digest")}
    unsigned = {"type": "agora/receipt/1", "signer": str(key.peer_id), "body": body}
    old = unsigned | {"sig": key.sign(encode_canonical(unsigned))}
    with pytest.raises(MalformedRecord, match="names no sampling rule"):
        verify_record(old)
    v, _ = nodes.verifier()
    r = httpx.post(f"{v.url}/agora/v1/verify", json={"receipt": old | {"sig": old["sig"].hex()},
                                                     "request": answer["request"]})
    assert r.status_code == 400 and "names no sampling rule" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("rule", ["agora-gumbel-v1", "agora-gumbel-v9"])
def test_a_rule_the_verifier_does_not_judge_is_a_violation_not_a_fraud_proof(nodes, answer, rule):
    """Judged under v2, a v1 receipt would look like fraud; a provider naming a rule no verifier judges chose
    to be unjudgeable: a signed violation, whatever its tokens."""
    key = Identity.generate()
    claimed = sign_record(key, verify_record(answer["receipt"], ReceiptBody).body.model_copy(update={"rule": rule}))
    v, role = nodes.verifier()
    r = httpx.post(f"{v.url}/agora/v1/verify", json={"receipt": claimed.to_json(), "request": answer["request"]})
    assert r.status_code == 200, r.text
    verdict = verify_record(r.json()["verdict"]).body
    assert (verdict.ok, verdict.failure.kind, verdict.provider, verdict.checked_positions) == (
        False, "violation", str(key.peer_id), 0)
    assert verdict.failure.detail.startswith("rule: ") and rule in verdict.failure.detail
    assert "fraud_proof" not in r.json() and role.reputation.providers[str(key.peer_id)].excluded
