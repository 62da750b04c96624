"""Record kinds that roles add to gossip: own records published, lifetimes enforced, every new one observed."""

from __future__ import annotations

import asyncio

from agoranet.core.identity import Identity
from agoranet.core.records import sign_record
from agoranet.log.records import TreeHeadBody
from agoranet.net.gossip import GossipConfig, GossipDiscovery, GossipKind

NOW = 1_700_000_000_000


def head(identity: Identity, *, at: int = NOW, size: int = 1, log_id: str | None = None) -> dict:
    body = TreeHeadBody(log_id=log_id or str(identity.peer_id), size=size, root="ab" * 32, timestamp_ms=at)
    return sign_record(identity, body).to_json()


def test_an_added_kind_is_published_aged_checked_and_observed():
    now = [NOW]
    me, peer = Identity.generate(), Identity.generate()
    d = GossipDiscovery(me, "http://127.0.0.1:1", [], roles=["provider"], config=GossipConfig(), clock=lambda: now[0])
    seen: list[int] = []
    own = sign_record(me, TreeHeadBody(log_id=str(me.peer_id), size=0, root="cd" * 32, timestamp_ms=NOW))
    d.add_kind(GossipKind(TreeHeadBody, issued_ms=lambda b: b.timestamp_ms, ttl_s=60, own=lambda: own,
                          problem=lambda r: None if r.body.log_id == r.signer else "wrong_signer",
                          observe=lambda r: seen.append(r.body.size)))
    asyncio.run(d.gossip_round())  # no peers to contact: it only publishes this node's records
    assert own.to_json() in d.live_records()

    stranger = Identity.generate()
    assert d.ingest([head(peer, size=2), head(peer, at=NOW + 60_000), head(peer, at=NOW - 61_000),
                     head(stranger, log_id=str(peer.peer_id))]) == 1
    assert d.rejected == {"from_future": 1, "expired": 1, "wrong_signer": 1}
    assert d.ingest([head(peer, at=NOW - 5, size=1)]) == 0  # older than the one held: not kept …
    assert seen == [2, 1]  # … but the role still hears of it, to compare
    now[0] += 61_000  # the heads outlive their ttl and are dropped
    assert [r for r in d.live_records() if r["type"] == TreeHeadBody.record_type] == []
