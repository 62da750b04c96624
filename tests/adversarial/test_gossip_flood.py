"""Bounded, fair gossip state: a flood of validly signed offers from fresh keys cannot partition the network."""

from __future__ import annotations

import time

import httpx
import pytest

from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, OfferedModel, sign_record
from agoranet.engine.stub import StubEngine
from agoranet.net.gossip import GossipConfig
from agoranet.verify.rules import RULE

from ..conftest import FAST_GOSSIP, start_gateway, start_provider, wait_for

DAY_MS = 24 * 3600 * 1000


def forged_offers(n: int) -> list[dict]:
    """Offers a stranger signs with fresh keys: valid signatures, a day's lifetime, never a heartbeat."""
    now = int(time.time() * 1000)
    return [sign_record(Identity.generate(), OfferBody(
        url=f"http://127.0.0.1:{1 + i % 1000}", precision="fp32", rule=RULE, max_concurrency=1, hardware="cpu", engine="stub",
        models=[OfferedModel(cid="bafy-flood", name="agora-tiny", input_per_mtok=0, output_per_mtok=0,
                             context_length=64)],
        issued_ms=now, expires_ms=now + DAY_MS - 1000, nonce=f"{i}")).to_json() for i in range(n)]


def push(url: str, records: list[dict], part: int = 500) -> None:
    for start in range(0, len(records), part):
        for _ in range(50):  # a 429 (per-address push budget) only slows the flood down
            r = httpx.post(f"{url}/agora/v1/gossip", json={"records": records[start:start + part]}, timeout=60)
            if r.status_code != 429:
                break
            time.sleep(0.2)


def chat(url: str) -> int:
    return httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "agora-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).status_code


@pytest.mark.slow
def test_a_flood_of_signed_offers_from_fresh_keys_cannot_partition_the_network(tmp_path):
    fast = GossipConfig(interval_s=FAST_GOSSIP)
    gw, gateway = start_gateway(tmp_path / "gw")
    first, p1 = start_provider(tmp_path / "p1", engine=StubEngine(model_name="agora-tiny"), peers=[gw.url],
                               gossip=fast)
    late = None
    try:
        wait_for(lambda: str(p1.identity.peer_id) in gateway.discovery.members(), what="the first provider")
        assert chat(gw.url) == 200
        flood = forged_offers(4200)  # more than a node's whole record table
        push(gw.url, flood)
        push(first.url, flood)
        table = gateway.discovery.metrics()["gossip_records"]
        # The stranger's offers are charged to its address and bounded there, not to the whole table.
        assert table <= 256 + 16, table  # GossipConfig.max_unproven_per_source, plus the honest nodes' records
        # Gossip between honest nodes goes on: the provider keeps its membership across many heartbeat
        # lifetimes (pushes fit the body limit), so every request still finds it.
        statuses = []
        for _ in range(20):
            statuses.append(chat(gw.url))
            time.sleep(0.3)
        assert statuses == [200] * 20, statuses
        # A provider that (re)starts while the flood goes on is taken, never refused as `full`.
        late, p2 = start_provider(tmp_path / "p2", engine=StubEngine(model_name="agora-tiny"), peers=[gw.url],
                                  gossip=fast)
        push(gw.url, forged_offers(1500))
        wait_for(lambda: str(p2.identity.peer_id) in gateway.discovery.members(), timeout=30, what="the new provider")
        assert gateway.discovery.rejected["full"] == 0
        # The orphan offers (no heartbeat) are never relayed, and expire quickly.
        assert not any(r["body"].get("nonce", "").isdigit() for r in gateway.discovery.live_records())
        wait_for(lambda: gateway.discovery.metrics()["gossip_records"] < 16, timeout=12 + 20,
                 what="the orphan offers to expire")
        assert gateway.discovery.metrics()["gossip_records_evicted_total"] > 0
    finally:
        if late is not None:
            late.stop()
        first.stop()
        gw.stop()
