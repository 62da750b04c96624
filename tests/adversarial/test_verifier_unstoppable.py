"""A verifier that cannot be stopped: a poisoned receipt neither kills its audit loop nor costs it a long
replay, and it fetches records only from a URL its provider signed."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, OfferedModel, ReceiptBody, TopLogprob, sign_record, verify_record
from agoranet.node.node import build_verifier_node
from agoranet.node.server import BackgroundServer, bind
from agoranet.node.verifier import VerifierConfig
from agoranet.web import mount_dashboard
from agoranet.verify.rules import RULE

from ..conftest import wait_for

SECRET = "internal-service-answer-7f3a"


@pytest.fixture
def verifier(tmp_path):
    app, role = build_verifier_node(tmp_path / "verifier", VerifierConfig(audit_fraction=1.0, seed=1))
    mount_dashboard(app)
    with BackgroundServer(app, bind()) as server:
        yield server.url, role


@pytest.fixture
def internal_service():
    """Something a verifier must never be made to read for a stranger: it logs every path asked of it."""
    app, hits = FastAPI(), []

    @app.get("/{path:path}")
    async def anything(path: str, request: Request) -> PlainTextResponse:
        hits.append("/" + path)
        return PlainTextResponse(SECRET, status_code=404)

    with BackgroundServer(app, bind()) as server:
        yield server.url, hits


def honest_receipt(provider_url: str) -> tuple[dict, str]:
    r = httpx.post(f"{provider_url}/v1/chat/completions", timeout=60, json={
        "model": "agora-tiny", "messages": [{"role": "user", "content": "add two numbers"}], "max_tokens": 6,
        "agora": {"receipt": "full"}})
    r.raise_for_status()
    return r.json()["agora"]["receipt"], r.json()["agora"]["receipt_cid"]


def resigned(receipt: dict, key: Identity, **changes) -> dict:
    body = verify_record(receipt, ReceiptBody).body.model_copy(update=changes)
    return sign_record(key, body).to_json()


def dead_offer(key: Identity, url: str, model: str) -> dict:
    now = int(time.time() * 1000)
    return sign_record(key, OfferBody(url=url, models=[OfferedModel(cid=model, name="x", input_per_mtok=0,
                                                                    output_per_mtok=0, context_length=1)],
                                      precision="fp32", rule=RULE, max_concurrency=1, hardware="cpu", engine="x", issued_ms=now,
                                      expires_ms=now + 600_000, nonce="n")).to_json()


@pytest.mark.slow
def test_poisoned_receipts_neither_stop_nor_stall_the_verifier(verifier, provider, internal_service):
    url, role = verifier
    provider_url, _ = provider
    receipt, _ = honest_receipt(provider_url)
    stranger = Identity.generate()
    closed = bind()  # bound, never listening: every connection to it is refused
    unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}"

    # 1. A receipt naming a node that cannot be reached (its offer vouches for a dead URL): the audit
    #    fails, is counted, and the loop goes on to audit the next receipt.
    poisoned = resigned(receipt, stranger)
    r = httpx.post(f"{url}/agora/v1/receipts", json={"receipt": poisoned, "node": unreachable,
                                                     "offer": dead_offer(stranger, unreachable,
                                                                         receipt["body"]["model"])}, timeout=30)
    assert r.status_code == 202, r.text
    r = httpx.post(f"{url}/agora/v1/receipts", json={"receipt": receipt, "node": provider_url}, timeout=30)
    assert r.status_code == 202 and r.json()["queued"], r.text
    wait_for(lambda: role.audited >= 1, timeout=60, what="the honest receipt to be audited after the poisoned one")
    assert role.reputation.providers[receipt["signer"]].passed == 1 and role.audit_errors == 1
    metrics = httpx.get(f"{url}/metrics").text
    assert re.search(r'agora_verifier_audit_errors_total\{[^}]*\} 1\.0', metrics), metrics

    # 2. A self-signed receipt far longer than the model's context is judged a violation at once, unreplayed:
    #    its signer declared what no honest provider can serve.
    n = 3000
    long = resigned(receipt, stranger, output_tokens=[65] * n, logprobs=[-1.0] * n,
                    top_logprobs=[[TopLogprob(token=65 + k, logprob=-1.0) for k in range(5)]] * n,
                    sampling=verify_record(receipt, ReceiptBody).body.sampling.model_copy(update={"max_tokens": n}))
    request = httpx.get(f"{provider_url}/agora/v1/records/{receipt['body']['request']}",
                        headers={"accept": "application/vnd.ipld.dag-cbor"}).content
    started = time.monotonic()
    r = httpx.post(f"{url}/agora/v1/verify", json={"receipt": long, "request": request.hex()}, timeout=300)
    assert r.status_code == 200 and not r.json()["ok"], r.text
    failure = r.json()["verdict"]["body"]["failure"]
    assert failure["kind"] == "violation" and "context" in failure["detail"] and time.monotonic() - started < 30
    assert role.reputation.providers[str(stranger.peer_id)].excluded

    # 3. Record fetches go only where a signed offer of the receipt's provider points; a stranger's URL
    #    gets at most the one offer lookup, and its answer is never echoed back.
    service, hits = internal_service
    r = httpx.post(f"{url}/agora/v1/verify", json={"receipt_cid": "bafyreiabc", "node": service}, timeout=30)
    assert 400 <= r.status_code < 500 and SECRET not in r.text, r.text
    r = httpx.post(f"{url}/agora/v1/verify", json={"receipt": receipt, "node": service}, timeout=30)
    assert 400 <= r.status_code < 500 and SECRET not in r.text, r.text
    assert set(hits) <= {"/agora/v1/offer"}, hits
    closed.close()
