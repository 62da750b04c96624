"""The calibrated range: a provider refuses what its tolerance record does not cover, gateways route no request
beyond a provider's offered range, and a receipt beyond it counts against the provider that ignored it."""

from __future__ import annotations

import httpx

from agoranet.core.records import OfferBody, ReceiptBody, verify_record
from agoranet.net.gossip import GossipConfig
from agoranet.node.node import ProviderOptions
from agoranet.node.verifier import VerifierConfig
from agoranet.verify.rules import RULE

from ..conftest import FAST_GOSSIP, fetch_receipt, tolerance_file, wait_for

SHORT = {"max_prompt_tokens": 64, "max_output_tokens": 16}  # a record calibrated over short sequences only
MSG = [{"role": "user", "content": "hi"}]


def _chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"model": "agora-tiny", "messages": MSG} | body)


def test_a_provider_refuses_what_its_tolerance_record_does_not_cover_and_its_offer_says_so(nodes, tmp_path):
    short = tolerance_file(tmp_path / "short.json", {"fp32": SHORT})
    server, _ = nodes.provider(opts=ProviderOptions(threads=1, tolerance_files=[short]))
    offer = verify_record(httpx.get(f"{server.url}/agora/v1/offer").json()["record"], OfferBody).body
    assert (offer.models[0].max_prompt_tokens, offer.models[0].max_output_tokens, offer.rule) == (64, 16, RULE)

    r = _chat(server.url, max_tokens=17)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "max_tokens_above_calibrated_range" and err["param"] == "max_tokens"
    assert "(16 output tokens)" in err["message"] and err["type"]
    r = _chat(server.url, messages=[{"role": "user", "content": "x" * 300}], max_tokens=4)
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "prompt_above_calibrated_range" and err["param"] == "messages"
    assert "(64 prompt tokens)" in err["message"]
    r = httpx.post(f"{server.url}/v1/completions", timeout=60, json={"model": "agora-tiny", "prompt": "y" * 300})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"

    r = _chat(server.url, temperature=0.8, seed=3)  # no max_tokens: the default, within range
    assert r.status_code == 200, r.text
    receipt = verify_record(httpx.get(r.json()["agora"]["receipt_url"]).json()["record"], ReceiptBody).body
    assert receipt.sampling.max_tokens == 16 and len(receipt.output_tokens) <= 16


def test_a_gateway_routes_no_request_beyond_a_providers_calibrated_range(nodes, tmp_path):
    short = tolerance_file(tmp_path / "short.json", {"fp32": SHORT})
    gw, gateway = nodes.gateway()
    _, prov = nodes.provider(opts=ProviderOptions(threads=1, tolerance_files=[short]), peers=[gw.url],
                             gossip=GossipConfig(interval_s=FAST_GOSSIP))
    wait_for(lambda: str(prov.identity.peer_id) in gateway.discovery.members(), what="the provider")
    r = _chat(gw.url, max_tokens=17)
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_provider_matches", r.text
    assert "calibrated for fewer output tokens than max_tokens 17" in r.json()["error"]["message"]
    r = _chat(gw.url, seed=1)  # unasked, max_tokens stays within the range of every provider it may go to
    assert r.status_code == 200, r.text
    assert fetch_receipt(r.json()["agora"]["receipts"][-1]).body.sampling.max_tokens == 16


def test_a_receipt_beyond_the_range_counts_against_a_provider_that_ignored_its_own(nodes, tmp_path):
    """A provider running modified code that serves beyond the range its offer states signs a receipt no honest
    provider signs: a violation. The same receipt length from a provider whose offer states a wider range only
    shows that this verifier's record is narrower: refused, not judged, as is one whose provider's offer is not
    known here (else a stranger could post an honest provider's long answers to a narrower verifier)."""
    short = tolerance_file(tmp_path / "short.json", {"fp32": SHORT})
    honest, _ = nodes.provider("honest", opts=ProviderOptions(threads=1))  # the shipped record: 960/256
    # serves beyond the record it sells under (its offer states that record's 64 prompt tokens and no output limit)
    ignores, bad = nodes.provider("ignores", opts=ProviderOptions(threads=1, tolerance_files=[short],
                                                                  pricing={"max_output_tokens": 0}))
    v, role = nodes.verifier(config=VerifierConfig(audit_fraction=1.0, seed=0, sources=(ignores.url,),
                                                   poll_interval_s=0.2), tolerance_files=[short])

    def long_answer(url: str) -> dict:
        for seed in range(20):  # one that does not end before 16 tokens
            agora = _chat(url, max_tokens=24, temperature=1.0, seed=seed, agora={"receipt": "full"}).json()["agora"]
            if len(agora["receipt"]["body"]["output_tokens"]) > 16:
                return agora
        raise AssertionError("no answer longer than 16 tokens")

    wide = long_answer(honest.url)
    # posted by a stranger with its request: no offer of its provider is known here, so it is not judged
    r = httpx.post(f"{v.url}/agora/v1/verify", json={"receipt": wide["receipt"], "request": wide["request"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "receipt_not_replayable", r.text
    assert "no signed offer of its provider is known here" in r.json()["error"]["message"]
    # with the node, whose signed offer states a wider range than this verifier's record: still not judged
    r = httpx.post(f"{v.url}/agora/v1/receipts", json={"receipt": wide["receipt"], "node": honest.url})
    assert r.status_code == 400 and r.json()["error"]["code"] == "receipt_not_replayable", r.text
    assert "this verifier's record is the narrower one" in r.json()["error"]["message"]

    beyond = long_answer(ignores.url)  # pulled from its feed, with its offer, which states no output limit

    def verdicts():
        rows = httpx.get(f"{v.url}/agora/v1/verdicts").json()["verdicts"]
        found = [verify_record(row["record"]).body for row in rows]
        return found if any(x.receipt == beyond["receipt_cid"] for x in found) else None

    found = wait_for(verdicts, timeout=60, what="a verdict on the receipt beyond the range")
    peer = str(bad.identity.peer_id)
    assert {x.provider for x in found} == {peer}  # nothing about the honest provider
    x = next(x for x in found if x.receipt == beyond["receipt_cid"])
    assert (x.ok, x.failure.kind, x.checked_positions) == (False, "violation", 0) and x.fraud_proof is None
    assert x.failure.detail.startswith("range: ") and "output tokens exceed the 16" in x.failure.detail
    assert role.reputation.providers[peer].excluded and role.violations >= 1
