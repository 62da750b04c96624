"""libp2p discovery with real go-libp2p daemons on 127.0.0.1: GossipSub records, DHT lookups, hostile peers."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agoranet.core.cid import RAW, cid_of
from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, OfferedModel, Record, sign_record
from agoranet.net.gossip import GossipConfig
from agoranet.net.libp2p import GLOBAL_TOPIC, LibP2PDiscovery, P2PConfig
from agoranet.net.p2pd import DaemonOptions, P2PDaemon, P2PDaemonMissing, find_p2pd
from agoranet.verify.rules import RULE

try:
    find_p2pd()
except P2PDaemonMissing as exc:
    pytest.skip(f"no go-libp2p daemon here ({exc}); install it with pip install 'agoranet[p2p]'",
                allow_module_level=True)

INTERVAL = 0.3
MODEL_CID = "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"


def make_offer(identity: Identity, *, url: str = "http://127.0.0.1:9", model_cid: str = MODEL_CID, name: str = "m",
               issued: int | None = None, ttl_ms: int = 600_000) -> Record[OfferBody]:
    issued = int(time.time() * 1000) if issued is None else issued
    return sign_record(identity, OfferBody(
        url=url, models=[OfferedModel(cid=model_cid, name=name, input_per_mtok=1, output_per_mtok=2,
                                      context_length=64)],
        precision="fp32", rule=RULE, max_concurrency=1, hardware="cpu", engine="stub", issued_ms=issued,
        expires_ms=issued + ttl_ms, nonce="n"))


async def wait_for(check: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.05)


class Network:
    """Discovery nodes, each with its own daemon, joined through the first one."""

    def __init__(self) -> None:
        self.nodes: list[LibP2PDiscovery] = []

    async def add(self, *, identity: Identity | None = None, offer: Record[OfferBody] | None = None,
                  roles: list[str] | None = None, orphan_ttl_s: float = 12.0, **p2p: object) -> LibP2PDiscovery:
        identity = identity or Identity.generate()
        bootstrap = tuple(self.nodes[0].multiaddrs()) if self.nodes else ()
        d = LibP2PDiscovery(identity, f"http://127.0.0.1:{9000 + len(self.nodes)}", roles=roles or ["provider"],
                            config=GossipConfig(interval_s=INTERVAL, missed_heartbeats=3, orphan_ttl_s=orphan_ttl_s),
                            p2p=P2PConfig(daemon=DaemonOptions(bootstrap=bootstrap), **p2p))
        if offer is not None:
            d.announce(lambda: offer)
        await d.start()
        self.nodes.append(d)
        return d


@pytest.fixture
async def net() -> AsyncIterator[Network]:
    network = Network()
    try:
        yield network
    finally:
        for d in network.nodes:
            await d.stop()


async def test_daemon_runs_under_the_node_identity_and_its_key_file_is_private(tmp_path):
    identity = Identity.generate()
    daemon = P2PDaemon(identity)
    client = await daemon.start()
    try:
        peer, addrs = await client.identify()
        assert peer == identity.peer_id and str(peer).startswith("12D3KooW")
        assert addrs and all(a.startswith("/ip4/127.0.0.1/tcp/") for a in addrs)
        assert not (daemon.dir / "identity.p2p.key").exists()  # read by the daemon, then removed
        assert daemon._process is not None
        environ = Path(f"/proc/{daemon._process.pid}/environ").read_bytes().split(b"\0")
        expected = os.environ.get("GOMAXPROCS", "1")  # one Go thread at a time unless the operator says otherwise
        assert f"GOMAXPROCS={expected}".encode() in environ
    finally:
        await daemon.stop()
    identity.save_libp2p_key(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600


def test_agora_p2pd_names_the_binary_and_a_wrong_one_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AGORA_P2PD", str(find_p2pd()))
    assert find_p2pd() == find_p2pd(Path(os.environ["AGORA_P2PD"]))
    monkeypatch.setenv("AGORA_P2PD", str(tmp_path / "nothing"))
    with pytest.raises(P2PDaemonMissing, match="is not an executable p2pd binary"):
        find_p2pd()


async def test_a_signed_offer_published_by_one_node_reaches_the_others(net):
    provider = Identity.generate()
    offer = make_offer(provider)
    a = await net.add(roles=["gateway"])
    b = await net.add(roles=["gateway"])
    plain = await net.add()  # routes nothing: it hears the offer on the global topic, no heartbeat
    p = await net.add(identity=provider, offer=offer)
    for d in (a, b):
        # the offer on the global topic; the gateway then follows the model's topic, where the heartbeats go
        await wait_for(lambda d=d: d.members().get(str(provider.peer_id)), what="provider's heartbeat")
        await wait_for(lambda d=d: d.table.get((str(provider.peer_id), OfferBody.record_type)) is not None, what="the offer")
        [held] = await d.find_offers("m")
        assert held.cid == offer.cid
        assert f"agora/1/model/{MODEL_CID}" in d.stats()["topics"]
    await wait_for(lambda: plain.table.get((str(provider.peer_id), OfferBody.record_type)) is not None,
                   what="the offer at the node that routes nothing")
    assert plain.stats()["topics"] == [GLOBAL_TOPIC]
    # Only sellers publish heartbeats: nodes that sell nothing are no members anywhere, and are found when
    # asked for (a witness fetching a log's proof): their signed heartbeat comes over a libp2p stream.
    await asyncio.sleep(3 * INTERVAL)
    assert str(provider.peer_id) not in plain.members()
    assert set(p.members()) == {str(provider.peer_id)} and set(a.members()) == {str(a.identity.peer_id), str(provider.peer_id)}
    assert await p.locate(str(a.identity.peer_id)) == a.url
    assert str(a.identity.peer_id) in p.members()


async def attacker(net: Network, identity: Identity | None = None) -> tuple[P2PDaemon, object]:
    """A bare daemon on the network that publishes whatever bytes it likes (no Agora checks)."""
    daemon = P2PDaemon(identity or Identity.generate(), DaemonOptions(bootstrap=tuple(net.nodes[0].multiaddrs())))
    client = await daemon.start()
    await daemon.join()
    # It publishes without subscribing (GossipSub's fanout): first it must learn who follows the topic.
    listeners = {d.identity.peer_id for d in net.nodes}
    deadline = time.monotonic() + 20
    while not listeners <= set(await client.topic_peers(GLOBAL_TOPIC)):
        assert time.monotonic() < deadline, "the attacker never saw the topic's subscribers"
        for d in net.nodes:
            await client.connect(d.identity.peer_id, [a.rpartition("/p2p/")[0] for a in d.multiaddrs()])
        await asyncio.sleep(0.2)
    return daemon, client


async def test_invalid_records_on_the_topic_are_never_accepted_and_their_author_is_ignored(net):
    a = await net.add(roles=["gateway"], max_invalid=5)
    b = await net.add(roles=["gateway"], max_invalid=5)
    bad = Identity.generate()
    daemon, client = await attacker(net, bad)
    try:
        good = make_offer(bad)
        wire = good.to_wire()
        tampered = Record(good.type, good.signer, good.body.model_copy(update={"url": "http://evil:1"}), good.sig)
        expired = make_offer(bad, issued=int(time.time() * 1000) - 700_000)
        foreign = make_offer(Identity.generate())  # valid, but signed by someone else than the author
        for data in (tampered.encode(), expired.encode(), foreign.encode(), b"\xa1junk", bytes(wire["sig"])):
            await client.publish(GLOBAL_TOPIC, data)
        for d in (a, b):
            await wait_for(lambda d=d: sum(d.rejected.values()) >= 5, what="the invalid records arriving")
            assert str(bad.peer_id) not in {r.signer for r in d.table.records()}
            assert d.rejected["bad_signature"] == 1 and d.rejected["expired"] == 1 and d.rejected["foreign"] == 1
            assert d.rejected["malformed"] == 2
            assert await d.find_offers("m") == []
        await client.publish(GLOBAL_TOPIC, good.encode())  # now even a valid record of its is ignored
        for d in (a, b):
            await wait_for(lambda d=d: d.rejected["ignored_author"] >= 1, what="the author being ignored")
            assert str(bad.peer_id) not in {r.signer for r in d.table.records()}
            assert d.metrics()["p2p_ignored_authors"] == 1
    finally:
        await daemon.stop()


async def test_a_flood_of_offers_for_fresh_models_leaves_no_subscriptions_behind(net):
    g = await net.add(roles=["gateway"], orphan_ttl_s=1.0)
    bad = Identity.generate()
    daemon, client = await attacker(net, bad)
    try:
        models = [str(cid_of(f"fresh {i}".encode(), RAW)) for i in range(5)]
        for cid in models:  # validly signed by their author, but it never heartbeats: orphans
            await client.publish(GLOBAL_TOPIC, make_offer(bad, model_cid=cid).encode())
        await wait_for(lambda: g.received >= len(models), what="the offers arriving")
        # one offer per signer is held (the newest), and the topic of each model it names is followed meanwhile
        assert len(g.stats()["topics"]) <= 1 + len(models) and g.accepted >= len(models) - 1
        # Dropped as orphans after orphan_ttl_s, and the topics with them; no more than one fetch a round was
        # asked of their signer meanwhile.
        await wait_for(lambda: g.stats()["topics"] == [GLOBAL_TOPIC], timeout=10, what="the subscriptions pruned")
        assert g.fetches <= 1 + (1.0 + 10) / INTERVAL and await g.find_offers(None) == []
    finally:
        await daemon.stop()


@pytest.mark.slow
async def test_a_sybil_flood_of_valid_offers_leaves_the_honest_provider_found(net):
    honest = Identity.generate()
    g = await net.add(roles=["gateway"])
    await net.add(identity=honest, offer=make_offer(honest, name="m"))
    await wait_for(lambda: g.table.get((str(honest.peer_id), OfferBody.record_type)) is not None, what="the honest offer")
    sybils = [await attacker(net) for _ in range(4)]
    try:
        for daemon, client in sybils:  # each floods 150 fresh, validly signed offers for the same model
            now = int(time.time() * 1000)
            flood = [make_offer(daemon.identity, issued=now - 150 + i).encode() for i in range(150)]
            await asyncio.gather(*(client.publish(GLOBAL_TOPIC, data) for data in flood))
        # Each newer than the last: the latest one per signer is held (at most 40 a signer's burst allows),
        # the older ones that arrive late are skipped, and none of them makes a sybil a member.
        await wait_for(lambda: g.received >= 4 * 100, what="the flood arriving")
        # The table may evict the honest offer under the flood; its heartbeats name it, so it is fetched
        # back from the provider. Sybils, with no heartbeat, never become members.
        async def honest_found() -> bool:
            return [o.signer for o in await g.find_offers("m")] == [str(honest.peer_id)]

        deadline = time.monotonic() + 30
        while not await honest_found():
            assert time.monotonic() < deadline, "the honest provider was not found again after the flood"
            await asyncio.sleep(0.2)
        await asyncio.sleep(3 * INTERVAL * 2)
        assert str(honest.peer_id) in g.members()  # the honest heartbeats still get through
    finally:
        for daemon, _ in sybils:
            await daemon.stop()


@pytest.mark.slow
async def test_a_node_that_follows_no_topic_finds_a_provider_through_the_dht_alone(net):
    provider = Identity.generate()
    await net.add()  # the bootstrap node
    for _ in range(3):
        await net.add()
    await net.add(identity=provider, offer=make_offer(provider, name="m"))
    g = await net.add(roles=["gateway"], global_topic=False)
    await asyncio.sleep(2 * INTERVAL)
    assert set(g.members()) == {str(g.identity.peer_id)} and g.received == 0  # it hears nothing until it asks
    t0 = time.monotonic()
    offers = []
    while not offers and time.monotonic() - t0 < 20:  # the provider's DHT announcement may still be on its way
        offers = await g.find_offers(MODEL_CID)
        await asyncio.sleep(0.2)
    assert [o.signer for o in offers] == [str(provider.peer_id)] and g.lookups >= 1
    await asyncio.sleep(6 * INTERVAL)  # now it follows the model's topic: the heartbeats keep it live
    assert [o.signer for o in await g.find_offers("m")] == [str(provider.peer_id)]
    assert str(provider.peer_id) in g.members()


@pytest.mark.slow
async def test_churn_killed_nodes_are_evicted_and_restarted_ones_rejoin(net):
    gateways = [await net.add(roles=["gateway"]) for _ in range(2)]
    for i in range(7):
        identity = Identity.generate()
        cid = str(cid_of(f"model {i % 3}".encode(), RAW))  # three models, two or three providers each
        await net.add(identity=identity, offer=make_offer(identity, model_cid=cid, name=f"m{i % 3}"))
    providers = {str(d.identity.peer_id): d for d in net.nodes[2:]}
    await wait_for(lambda: all(set(g.members()) >= set(providers) for g in gateways), timeout=30,
                   what="every gateway hearing every provider")
    killed = net.nodes[-2:]  # ~30%, crashed: the daemon dies at once, nothing is said to anyone
    for d in killed:
        d.daemon.kill()
        await d.stop()
    net.nodes = net.nodes[:-2]
    gone = {str(d.identity.peer_id) for d in killed}
    # (how soon: benchmarks/discovery.py; a heartbeat lives max(3 intervals, 3 s))
    await wait_for(lambda: all(not set(g.members()) & gone for g in gateways), timeout=30, what="eviction")
    assert all(set(g.members()) >= set(providers) - gone for g in gateways)
    for d in killed:  # the same identities come back with their offers, joining through a node that stayed
        offer = d.table.get((str(d.identity.peer_id), OfferBody.record_type))
        await net.add(identity=d.identity, offer=offer)
    await wait_for(lambda: all(set(g.members()) >= set(providers) for g in gateways), timeout=30, what="rejoin")
