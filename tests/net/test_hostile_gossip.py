"""Hostile gossip peers: floods, replays, oversized and malformed pushes, oversized answers.

Each is rejected with a clear reason, counted in the node's metrics, and leaves membership intact.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agoranet.core.identity import Identity
from agoranet.net.gossip import GossipConfig, GossipDiscovery, RateLimiter
from agoranet.net.peer import PeerClient, PeerUnreachable
from agoranet.node.network import NetworkRole
from agoranet.node.server import BackgroundServer, bind

from .test_gossip import NOW, heartbeat, node, offer


def test_a_signer_flooding_fresh_heartbeats_is_rate_limited_and_counted():
    now = [NOW]
    d = GossipDiscovery(Identity.generate(), "http://127.0.0.1:1", [], roles=["gateway"],
                        config=GossipConfig(signer_records_per_s=5, signer_burst=10), clock=lambda: now[0])
    flooder, honest = Identity.generate(), Identity.generate()
    flood = [heartbeat(flooder, issued=NOW - 2_000 + i) for i in range(200)]  # each newer than the last
    d.ingest(flood)
    assert d.accepted == 10 and d.rejected["rate_limited"] == 190
    assert d.ingest([heartbeat(honest)]) == 1  # another signer is not held back by the flood
    assert set(d.members()) == {str(flooder.peer_id), str(honest.peer_id)}
    now[0] += 1_000  # a second later the flooder has 5 new tokens, not 200
    assert d.ingest([heartbeat(flooder, issued=now[0] - 10 + i) for i in range(10)]) == 5
    assert d.metrics()["gossip_records_rate_limited_total"] == 195


def test_replayed_records_never_roll_state_back():
    now = [NOW]
    d = node(lambda: now[0])
    peer = Identity.generate()
    old_offer, new_offer = offer(peer, issued=NOW - 1_000), offer(peer)
    d.ingest([old_offer, new_offer, heartbeat(peer, ttl=2_000)])
    d.ingest([old_offer, old_offer])  # replay of the older offer while the newer is held
    assert asyncio.run(d.find_offers("m"))[0].body.issued_ms == NOW
    now[0] += 2_001  # the peer's heartbeat lapses: evicted, and its offer dropped
    assert d.members() == {}
    d.ingest([old_offer])  # an attacker replays the older (still unexpired) offer
    assert d.rejected["stale"] == 1
    d.ingest([heartbeat(peer, issued=now[0])])  # the peer comes back
    d.ingest([new_offer])  # its unchanged current offer, relayed again, is taken back
    [held] = asyncio.run(d.find_offers("m"))
    assert held.body.issued_ms == NOW and d.metrics()["gossip_records_stale_total"] == 1


def test_rate_limiter_refills_per_key_and_forgets_the_least_recent_key():
    t = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, max_keys=2, clock=lambda: t[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    t[0] += 0.5
    assert limiter.allow("a") and not limiter.allow("a")
    assert limiter.allow("b") and limiter.allow("c")  # "a" is forgotten: at most two keys held
    assert len(limiter._buckets) == 2


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
record_like = st.fixed_dictionaries({"type": st.sampled_from(["agora/heartbeat/1", "agora/offer/1", "x"]),
                                     "signer": st.text(max_size=60), "body": json_values, "sig": json_values})


@given(st.lists(json_values | record_like, max_size=10))
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_garbage_records_are_counted_and_never_corrupt_state(garbage):
    d = node(lambda: NOW)
    peer = Identity.generate()
    d.ingest([heartbeat(peer), offer(peer)])
    before = (d.members(), d.live_records())
    d.exchange(garbage)
    assert (d.members(), d.live_records()) == before
    assert sum(d.rejected.values()) == len(garbage)


@pytest.fixture
def gossip_node(tmp_path):
    """A node serving only the network role, with a small push budget per client address."""
    from agoranet.node.app import create_app

    discovery = GossipDiscovery(Identity.generate(), "http://127.0.0.1:1", [], roles=["seed"],
                                config=GossipConfig(interval_s=60, pushes_per_s=2, push_burst=20))
    role = NetworkRole(discovery)
    app = create_app([role], max_request_bytes=64 << 10)
    with BackgroundServer(app, bind()) as server:
        yield server.url, role


def test_oversized_and_malformed_pushes_get_a_clear_4xx_and_change_nothing(gossip_node):
    url, role = gossip_node
    peer = Identity.generate()
    assert httpx.post(f"{url}/agora/v1/gossip", json={"records": [heartbeat(peer, issued=_now(), ttl=30_000)]}
                      ).status_code == 200
    members = role.discovery.members()
    cases = [
        (b'{"records": [' + b'{"a": 1},' * 20_000 + b'{}]}', 413, "request_too_large"),
        (b'{"records": [', 400, "invalid_json"),
        (b'{"records": {"not": "a list"}}', 400, "invalid_value"),
        (b'[1, 2, 3]', 400, "invalid_value"),
        (b'{"records": [' + b'1,' * 5000 + b'1]}', 400, "invalid_value"),  # over the 4096-record cap
    ]
    for body, status, code in cases:
        r = httpx.post(f"{url}/agora/v1/gossip", content=body, headers={"content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    r = httpx.post(f"{url}/agora/v1/gossip", json={"records": [{"type": "agora/offer/1", "sig": 5}, 7, "x"]})
    assert r.status_code == 200 and role.discovery.rejected["malformed"] == 3
    assert role.discovery.members() == members


def test_a_peer_flooding_pushes_gets_429_and_is_counted(gossip_node):
    url, role = gossip_node
    with httpx.Client() as client:
        codes = [client.post(f"{url}/agora/v1/gossip", json={"records": []}).status_code for _ in range(40)]
    assert codes[:20] == [200] * 20 and codes.count(429) >= 15
    r = httpx.post(f"{url}/agora/v1/gossip", json={"records": []})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "rate_limited"
    assert role.metrics()["gossip_pushes_rate_limited_total"] == codes.count(429) + 1  # what /metrics exports


def test_a_peer_answering_gossip_with_a_huge_body_is_cut_off():
    app = FastAPI()

    @app.post("/agora/v1/gossip")
    async def huge() -> Response:
        return Response(b'{"records": [' + b'"x",' * (1 << 20) + b'"x"]}', media_type="application/json")

    async def ask(url: str) -> None:
        client = PeerClient()
        try:
            await client.gossip(url, [], max_bytes=1 << 20)
        finally:
            await client.aclose()

    with BackgroundServer(app, bind()) as server, pytest.raises(PeerUnreachable, match="more than 1048576 bytes"):
        asyncio.run(ask(server.url))


def _now() -> int:
    from agoranet.net.gossip import now_ms

    return now_ms()
