"""Gossip discovery's record checks and membership, with a hand-driven clock (no network)."""

from __future__ import annotations

import asyncio

from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, OfferedModel, sign_record
from agoranet.net.gossip import GossipConfig, GossipDiscovery, HeartbeatBody
from agoranet.verify.rules import RULE

NOW = 1_700_000_000_000


def offer(identity: Identity, *, issued: int = NOW, ttl: int = 600_000) -> dict:
    body = OfferBody(url="http://127.0.0.1:9", models=[OfferedModel(cid="bafy-x", name="m", input_per_mtok=1,
                     output_per_mtok=2, context_length=64)], precision="fp32", rule=RULE, max_concurrency=1, hardware="cpu",
                     engine="stub", issued_ms=issued, expires_ms=issued + ttl, nonce="n")
    return sign_record(identity, body).to_json()


def heartbeat(identity: Identity, *, issued: int = NOW, ttl: int = 3_000, url: str = "http://127.0.0.1:9") -> dict:
    return sign_record(identity, HeartbeatBody(url=url, roles=["provider"], offer="", seq=1, issued_ms=issued,
                                               expires_ms=issued + ttl)).to_json()


def node(clock) -> GossipDiscovery:
    return GossipDiscovery(Identity.generate(), "http://127.0.0.1:1", [], roles=["gateway"],
                           config=GossipConfig(interval_s=1.0), clock=clock)


def test_bad_signature_expired_and_future_records_are_rejected_and_counted():
    d = node(lambda: NOW)
    peer = Identity.generate()
    good = offer(peer)
    tampered = {**good, "body": {**good["body"], "url": "http://evil:1"}}
    assert d.ingest([tampered, offer(peer, issued=NOW - 700_000), offer(peer, issued=NOW + 60_000),
                     {"type": "nope"}, heartbeat(peer, ttl=3_600_000)]) == 0
    assert d.rejected == {"bad_signature": 1, "expired": 1, "from_future": 1, "malformed": 1, "bad_lifetime": 1}
    assert d.ingest([good, heartbeat(peer)]) == 2


def test_offer_without_a_live_heartbeat_gets_no_traffic_and_dead_peers_are_evicted():
    now = [NOW]
    d = node(lambda: now[0])
    events = d.watch()
    peer = Identity.generate()
    d.ingest([offer(peer)])
    assert asyncio.run(d.find_offers("m")) == []  # a signed offer alone does not make a member
    d.ingest([heartbeat(peer)])
    assert [o.signer for o in asyncio.run(d.find_offers("m"))] == [str(peer.peer_id)]
    assert d.members() == {str(peer.peer_id): "http://127.0.0.1:9"}
    assert "http://127.0.0.1:9" in d.contacts()
    now[0] += 3_001  # three missed heartbeats later
    assert d.members() == {} and asyncio.run(d.find_offers("m")) == [] and d.contacts() == []

    async def two():
        return [await anext(events), await anext(events)]

    joined, left = asyncio.run(two())
    assert (joined.kind, left.kind) == ("joined", "left") and left.peer_id == str(peer.peer_id)


def test_newer_records_replace_older_and_exchange_returns_only_what_the_peer_lacks():
    d = node(lambda: NOW)
    peer = Identity.generate()
    d.ingest([heartbeat(peer, issued=NOW - 100), heartbeat(peer)])
    d.ingest([heartbeat(peer, issued=NOW - 50)])  # older than held: ignored
    held = [r for r in d.live_records() if r["signer"] == str(peer.peer_id)]
    assert len(held) == 1 and held[0]["body"]["issued_ms"] == NOW
    other = Identity.generate()
    answer = d.exchange([heartbeat(other)])
    assert {r["signer"] for r in answer} == {str(peer.peer_id)}  # not the sender's own record back
    assert str(other.peer_id) in d.members()
