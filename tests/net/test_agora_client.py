"""The typed /agora/v1 client against real nodes on 127.0.0.1: a provider, a verifier, and the ways asking fails."""

from __future__ import annotations

import asyncio
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest

from agoranet.core.cid import DAG_CBOR, cid_of
from agoranet.core.records import OfferBody, ReceiptBody
from agoranet.log.transparency import check_inclusion
from agoranet.net.agora_client import AgoraClient, NodeRefused, NodeUnreachable, call
from agoranet.node.verifier import VerifierConfig
from agoranet.wire.agora import VerifyRequest

from ..conftest import Nodes, free_port


def chat(url: str, seed: int) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "agora-tiny", "messages": [{"role": "user", "content": "name a colour"}], "max_tokens": 8,
        "temperature": 0.8, "seed": seed})
    r.raise_for_status()
    return r.json()["agora"]["receipt_cid"]


@pytest.fixture(scope="module")
def verifier_url(tmp_path_factory):
    with Nodes(tmp_path_factory.mktemp("client")) as nodes:
        yield nodes.verifier(config=VerifierConfig(audit_fraction=0.0, seed=0))[0].url


async def test_a_providers_offer_receipts_records_and_log(provider) -> None:
    url, prov = provider
    cid = chat(url, 1)
    async with AgoraClient(url) as node:
        offer = await node.signed_offer()
        assert isinstance(offer.body, OfferBody) and offer.body.url == url
        assert offer.signer == str(prov.identity.peer_id)

        page = await node.receipts(limit=500)
        assert cid in [item.cid for item in page.items] and page.next > 0
        assert (await node.receipts(after=page.next)).items == []

        receipt = await node.record(cid)  # checked: signature, type and the CID asked for
        assert isinstance(receipt.body, ReceiptBody) and receipt.signer == offer.signer
        request = await node.record_bytes(receipt.body.request)  # the canonical request, as stored
        assert str(cid_of(request, DAG_CBOR)) == receipt.body.request

        for _ in range(100):  # the provider appends its receipts to its log in the background
            head = await node.log_head()
            try:
                proof = await node.inclusion_proof(cid, head.body.size)
                break
            except NodeRefused as exc:
                assert exc.status == 404 and exc.code == "not_found"
                await asyncio.sleep(0.1)
        assert check_inclusion(head, cid, proof.model_dump()) == proof.index
        earlier = await node.log_head(1)
        assert earlier.body.size == 1 and earlier.signer == head.signer
        assert (await node.consistency_proof(1, head.body.size)).first == 1
        entries = await node.log_entries(0, 2)
        assert entries.start == 0 and len(entries.entries) == min(2, head.body.size)


async def test_a_verifier_replays_on_request_and_reports_reputation(provider, verifier_url) -> None:
    url, prov = provider
    cid = chat(url, 2)
    async with AgoraClient(url) as node, AgoraClient(verifier_url) as verifier:
        receipt = await node.record(cid)
        answer = await verifier.verify(VerifyRequest(receipt=receipt.to_json(), node=url))
        assert answer.ok and answer.fraud_proof is None and answer.verdict["body"]["receipt"] == cid
        table = await verifier.reputation()
        standing = table.providers[str(prov.identity.peer_id)]
        assert standing.passed >= 1 and not standing.excluded and table.verifier is not None
        assert answer.verdict_cid in [item.cid for item in (await verifier.verdicts(limit=500)).items]
        submitted = await verifier.submit_receipt(VerifyRequest(receipt=receipt.to_json(), node=url))
        assert submitted.receipt_cid == cid and not submitted.queued  # audit fraction 0, and seen already
        assert (await verifier.fraud_proofs()).items == []


def test_call_runs_one_request_from_sync_code(verifier_url) -> None:
    assert call(verifier_url, lambda v: v.reputation()).audit_fraction == 0.0


async def test_a_refusal_carries_the_servers_message_and_code(provider, verifier_url) -> None:
    url, _ = provider
    async with AgoraClient(url) as node:
        with pytest.raises(NodeRefused) as caught:
            await node.record("bafyreiabsentabsentabsentabsentabsentabsentabsentabsentabsentab")
        assert caught.value.status == 404 and caught.value.code == "not_found"
        assert "no record" in caught.value.message and "answered 404" in str(caught.value)
        with pytest.raises(NodeRefused) as caught:
            await node.log_head(10**9)
        assert caught.value.status == 400 and caught.value.code == "beyond_log_size"
        with pytest.raises(NodeRefused) as caught:
            await node.reputation()  # a provider is no verifier
        assert caught.value.status == 404
    async with AgoraClient(verifier_url) as verifier:
        with pytest.raises(NodeRefused) as caught:
            await verifier.verify(VerifyRequest())
        assert caught.value.status == 400 and "give `receipt`" in caught.value.message


async def test_a_node_that_cannot_be_asked_is_unreachable_with_a_reason(provider) -> None:
    url, _ = provider
    async with AgoraClient(f"http://127.0.0.1:{free_port()}", timeout=5) as nobody:
        with pytest.raises(NodeUnreachable) as caught:
            await nobody.log_head()
        assert caught.value.reason == "ConnectError" and "check the URL" in str(caught.value)
    async with AgoraClient("not a url") as bad:
        with pytest.raises(NodeUnreachable):
            await bad.offer()
    async with AgoraClient(url) as node:
        with pytest.raises(NodeUnreachable) as caught:
            await node.offer(max_bytes=10)  # an answer over the cap is cut off, not read into memory
        assert caught.value.reason == "more than 10 bytes"


def _serve(handler: type[BaseHTTPRequestHandler]):
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


async def test_answers_that_are_not_what_the_route_sends_are_refused() -> None:
    class NotAgora(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"<html>hello</html>" if "reputation" in self.path else b'{"providers": 7}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = _serve(NotAgora)
    try:
        async with AgoraClient(f"http://127.0.0.1:{server.server_address[1]}") as node:
            with pytest.raises(NodeUnreachable) as caught:
                await node.reputation()
            assert caught.value.reason == "not JSON"
            with pytest.raises(NodeUnreachable) as caught:
                await node.offer()
            assert caught.value.reason == "unexpected answer" and "OfferAnswer" in str(caught.value)
    finally:
        server.shutdown()


def test_silent_node_times_out() -> None:
    with socket.socket() as listener:  # accepts the connection, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(NodeUnreachable) as caught:
            call(url, lambda node: node.log_head(), timeout=0.5)
        assert caught.value.reason == "ReadTimeout"
