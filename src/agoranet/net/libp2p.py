"""Discovery over libp2p: signed records on GossipSub topics, model providers in the Kademlia DHT.

Each node runs its own go-libp2p daemon (`agoranet.net.p2pd`) under its Agora identity, so its
libp2p peer id is the `12D3KooW…` Agora prints. Topics: `agora/1/records` carries offers and the
record kinds roles add (tree heads, split-view reports), published when they change and every few
rounds for nodes that joined since; `agora/1/model/<CID>` carries the offers and the heartbeats of
that model's providers.

Liveness is only asked of what is routed to. A node that sells something (holds an offer) publishes
a fresh signed heartbeat every round, on its models' topics only; a node that sells nothing
publishes none (nothing is routed to it; its records and URL are fetched from it over a libp2p
stream when needed, `locate`). A node that routes (a gateway; `follow_offers`) follows the topic of
every model it holds a live offer for, so it hears the heartbeats of the providers it can route to
and of no other node; a node that follows no topic at all (`global_topic=False`) follows the models
it is asked for. An idle network thus costs each node the heartbeats of the providers it routes to,
not those of every node (benchmarks/discovery.py).

Trust comes from the records, never from the transport: each received record goes through the same
admission checks as HTTP gossip (signature, expiry, lifetime caps, per-signer rate, replays), and
must be signed by the peer that authored the GossipSub message. The daemon's control protocol has
no validator hook, so the daemon relays what GossipSub's own checks pass before this node sees it;
invalid records are never accepted here, and an author that sends `max_invalid` of them is ignored
and disconnected for `ignore_s` (a local stand-in for GossipSub peer scoring).

Providers announce the CID of each model they sell (and a key derived from its name) in the DHT. A
node asked for a model it holds no live offer for looks the providers up there and fetches their
current signed records over a libp2p stream (`/agora/records/1`) as each provider is found, and
answers once one live offer is held: the offer names the provider's URL, the signature is what is
trusted. Liveness stays with the signed, expiring heartbeats: DHT provider records outlive dead
nodes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agoranet.core.cid import RAW, cid_of, parse_cid
from agoranet.core.errors import AgoraError, RecordError
from agoranet.core.identity import Identity, PeerId
from agoranet.core.records import OfferBody, Record, decode_record
from agoranet.core.tasks import cancel_and_wait
from agoranet.net.discovery import OfferSource
from agoranet.net.gossip import GossipConfig, GossipDiscovery, HeartbeatBody, now_ms, verify_all
from agoranet.net.p2pd import DaemonOptions, P2PDaemon, P2PError, read_delimited, write_delimited

log = logging.getLogger(__name__)

GLOBAL_TOPIC = "agora/1/records"
RECORDS_PROTOCOL = "/agora/records/1"
MAX_STREAM_RECORDS = 16  # records one peer may hand over on a records stream
MAX_RECORD_BYTES = 256 << 10
MAX_FOLLOWED = 256  # model topics a node follows because it holds offers for them (a sybil flood cannot grow it)
SEEN_MESSAGES = 1024  # digests of the latest messages taken, so a record heard on two topics is checked once
REJOIN_S = 10.0  # how often a node with no peer left dials its bootstrap peers again
# Rejections that are the sender's fault (scored); "stale" and "full" can befall an honest sender.
FAULTS = frozenset({"bad_signature", "malformed", "expired", "from_future", "bad_lifetime", "wrong_type",
                    "foreign", "rate_limited", "wrong_signer", "too_many_split_views", "bad_split_view",
                    "inconclusive_split_view"})


def model_topic(model_cid: str) -> str:
    return f"agora/1/model/{model_cid}"


def model_key(model: str) -> bytes:
    """The DHT key providers of `model` are announced under: its CID, or for a name a CID derived from it."""
    try:
        return bytes(parse_cid(model))
    except AgoraError:
        return bytes(cid_of(b"agora/model-name/1/" + model.encode(), RAW))


@dataclass(frozen=True)
class P2PConfig:
    daemon: DaemonOptions = field(default_factory=DaemonOptions)
    # Heartbeats cross a GossipSub mesh in milliseconds, not in push-pull rounds: three missed rounds
    # are enough to call a peer dead (HTTP gossip waits six).
    missed_heartbeats: int = 3
    global_topic: bool = True  # hear every node's offers and other records; False: only those of models asked for
    # Follow the topic of each model this node holds a live offer for (hear its providers' heartbeats,
    # so it can route to them); None: if the node routes (the gateway role).
    follow_offers: bool | None = None
    lookup_providers: int = 8  # a DHT lookup stops once this many providers are found (it answers at the first)
    republish_rounds: int = 5  # offers and other records go out at least every this many rounds
    lookup_timeout_s: float = 10.0  # one DHT findProviders
    fetch_timeout_s: float = 5.0  # one records stream to a provider
    lookup_again_s: float = 5.0  # a model no live provider was found for is not looked up again sooner
    reprovide_s: float = 300.0  # DHT provider records are renewed this often (they expire in the DHT)
    max_invalid: int = 10  # invalid records one author may send before it is ignored
    ignore_s: float = 300.0
    log_dir: Path | None = None  # where the daemon's own log goes (default: its temp dir)


class LibP2PDiscovery(GossipDiscovery):
    """`Discovery` on the go-libp2p daemon; the record table and its admission rules are HTTP gossip's."""

    def __init__(self, identity: Identity, url: str, *, roles: list[str], config: GossipConfig | None = None,
                 p2p: P2PConfig | None = None, clock: Callable[[], int] = now_ms) -> None:
        p2p = p2p or P2PConfig()
        super().__init__(identity, url, [], roles=roles, clock=clock,
                         config=replace(config or GossipConfig(), missed_heartbeats=p2p.missed_heartbeats))
        self.p2p = p2p
        self.daemon = P2PDaemon(identity, self.p2p.daemon, log_dir=self.p2p.log_dir)
        self.received = 0
        self._me = str(identity.peer_id)
        self._faults = 0  # rejections that were the sender's fault, ever (see FAULTS)
        self.lookups = 0
        self.fetches = 0
        self._invalid: collections.Counter[str] = collections.Counter()  # author -> invalid records sent
        self._ignored: dict[str, float] = {}  # author -> monotonic time its messages are heard again
        self._topics: dict[str, asyncio.Task[None]] = {}  # subscribed topic -> its reader
        self._followed: set[str] = set()  # topics followed because an offer for the model is held (pruned)
        self._asked: dict[str, float] = {}  # signer -> when its records were last fetched for an offer heard
        self._follow = p2p.follow_offers if p2p.follow_offers is not None else "gateway" in roles
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # digests of messages taken
        self._published: dict[tuple[str, str], tuple[str, int]] = {}  # (topic, type) -> (CID, round) sent
        self._provided: set[bytes] = set()
        self._looked_up: dict[str, float] = {}  # model -> monotonic time of its last fruitless lookup
        self._lookups: dict[str, asyncio.Task[None]] = {}  # model -> the lookup in flight
        self._pulls: dict[str, asyncio.Task[Any]] = {}  # peer -> records fetch (or disconnect) in flight
        self._server: asyncio.base_events.Server | None = None
        self._provider_task: asyncio.Task[None] | None = None
        self._providing: asyncio.Task[None] | None = None
        self._after_mesh: asyncio.Task[None] | None = None
        self._started = False
        self._wake = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        client = await self.daemon.start()
        try:
            sock = self.daemon.dir / "records.sock"
            self._server = await asyncio.start_unix_server(self._serve_records, path=str(sock))
            await client.stream_handler(RECORDS_PROTOCOL, sock)
            if self.p2p.global_topic:
                self._subscribe(GLOBAL_TOPIC)
            if self.p2p.daemon.bootstrap:
                if not await self.daemon.join():
                    log.warning("no bootstrap peer answered (%s); retrying every %.0f s",
                                ", ".join(self.p2p.daemon.bootstrap), REJOIN_S)
                else:
                    self._after_mesh = asyncio.create_task(self._republish_after_mesh())  # owned: stop()
            await super().start()  # the rounds: publish heartbeat (and offer) every interval
        except BaseException:
            await self.stop()
            raise
        self._started = True
        self._provider_task = asyncio.create_task(self._provide_loop(), name="agora-p2p-provide")  # owned

    async def stop(self) -> None:
        self._started = False
        await cancel_and_wait(self._provider_task)
        await cancel_and_wait(self._providing)
        await cancel_and_wait(self._after_mesh)
        for task in [*self._topics.values(), *self._lookups.values(), *self._pulls.values()]:
            await cancel_and_wait(task)
        self._topics.clear()
        self._lookups.clear()
        self._pulls.clear()
        await super().stop()
        if self._server is not None:
            self._server.close()
            self._server = None
        await self.daemon.stop()

    async def _republish_after_mesh(self) -> None:
        """Publish this node's records again once GossipSub has put its new peers in its topic mesh: a
        node publishes only to its mesh peers, and the daemon fills the mesh of a node that just joined
        at its next GossipSub heartbeat (until then its publications reach no one: measured, 0 of 6
        messages in the first 3 s with a 3 s heartbeat), so its first offer would otherwise wait for
        its republication `republish_rounds` later. (Timed from the join: a little late for the first
        heartbeat, which counts from the daemon's start, never early.)"""
        options = self.p2p.daemon
        start = time.monotonic()
        # the daemon's first heartbeat (options.gossipsub_initial_delay_ms after it started, usually after
        # the join), then the next one (for a join that came after that), each with 0.5 s to spare
        for at in ((options.gossipsub_initial_delay_ms or 100) / 1000 + 0.5, (options.gossipsub_heartbeat_ms or 1000) / 1000 + 0.5):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            self._published.clear()
            self._wake.set()

    def multiaddrs(self) -> list[str]:
        """Where other nodes bootstrap from this one (`--bootstrap`)."""
        return self.daemon.multiaddrs()

    # -- publishing -----------------------------------------------------------------------------------

    def announce(self, offer: OfferSource) -> None:
        super().announce(offer)
        self._wake.set()  # a new offer goes out now, not at the next round

    async def _run(self) -> None:
        while True:
            try:
                await self.gossip_round()
            except Exception:  # one bad round must not end discovery
                log.exception("libp2p round failed")
            self._wake.clear()
            # jitter keeps nodes started together from publishing in lockstep
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.interval_s * (0.75 + 0.5 * random.random()))

    async def gossip_round(self) -> None:
        """Sign a fresh heartbeat and publish whatever is due: the heartbeat on the topics of the models
        this node sells (none if it sells nothing), its offer and other records when they change and
        every `republish_rounds` rounds."""
        self._publish_own()
        me = str(self.identity.peer_id)
        own = [r for r in self.table.records() if r.signer == me]
        offer = next((r for r in own if r.type == OfferBody.record_type), None)
        model_topics = [model_topic(m.cid) for m in offer.body.models] if offer is not None else []
        sends = []
        for record in own:
            if record.type == HeartbeatBody.record_type:
                topics = model_topics  # liveness is for those routed to: sellers, heard by who routes their models
            elif record.type == OfferBody.record_type:
                topics = [GLOBAL_TOPIC, *model_topics]
            else:
                topics = [GLOBAL_TOPIC]
            for topic in topics:
                sent = self._published.get((topic, record.type))
                if (record.type == HeartbeatBody.record_type or sent is None or sent[0] != str(record.cid)
                        or self.rounds - sent[1] >= self.p2p.republish_rounds):
                    self._published[(topic, record.type)] = (str(record.cid), self.rounds)
                    sends.append(self._publish(topic, record))
        await asyncio.gather(*sends)
        if offer is not None and self._started and (self._providing is None or self._providing.done()) \
                and self._model_keys() - self._provided:  # a model this node now sells: announce it in the DHT
            self._providing = asyncio.create_task(self._provide(), name="agora-p2p-provide-new")  # owned: stop()
        self._sweep()
        self._prune_followed()
        self.rounds += 1

    async def _publish(self, topic: str, record: Record[Any]) -> None:
        client = self.daemon.client
        if client is None:
            return
        try:
            await client.publish(topic, record.encode())
        except (OSError, asyncio.IncompleteReadError, P2PError) as exc:
            log.warning("publishing %s on %s failed: %s", record.type, topic, exc)

    async def _provide_loop(self) -> None:
        """Announce this node's models in the DHT soon after joining, again once the network has
        grown around it, then every `reprovide_s` (provider records expire in the DHT); dial the
        bootstrap peers again whenever this node finds itself with no peer at all."""
        for delay in (0.5, 10.0):
            await asyncio.sleep(delay)
            await self._provide(force=True)
        last = time.monotonic()
        while True:
            await asyncio.sleep(REJOIN_S)
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, P2PError):
                if self.daemon.client is not None and not await self.daemon.client.list_peers():
                    if await self.daemon.join():
                        if self._after_mesh is None or self._after_mesh.done():
                            self._after_mesh = asyncio.create_task(self._republish_after_mesh())  # owned: stop()
                        await self._provide(force=True)
            if time.monotonic() - last >= self.p2p.reprovide_s:
                last = time.monotonic()
                await self._provide(force=True)

    def _model_keys(self) -> set[bytes]:
        if self._offer_source is None:
            return set()
        return {k for m in self._offer_source().body.models for k in (model_key(m.cid), model_key(m.name))}

    async def _provide(self, *, force: bool = False) -> None:
        if (client := self.daemon.client) is None:
            return
        keys = self._model_keys()
        for key in keys if force else keys - self._provided:
            try:
                await client.provide(key, timeout_s=self.p2p.lookup_timeout_s)
                self._provided.add(key)
            except (OSError, asyncio.IncompleteReadError, P2PError) as exc:
                log.info("announcing a model in the DHT failed (retried later): %s", exc)

    # -- receiving ------------------------------------------------------------------------------------

    def _subscribe(self, topic: str) -> None:
        if topic not in self._topics:
            self._topics[topic] = asyncio.create_task(self._read_topic(topic), name=f"agora-p2p-{topic}")  # owned
        self._followed.discard(topic)  # asked for (a lookup): kept

    def _follow_models(self, offer: Record[OfferBody]) -> None:
        """A routing node holds an offer: follow its models' topics, where their providers' heartbeats go,
        and fetch the provider's current records from it over a stream: its heartbeat proves it live at
        once (not a round later), and the connection lets it learn of this subscriber with no other
        node between them."""
        for m in offer.body.models:
            topic = model_topic(m.cid)
            if topic not in self._topics and len(self._followed) < MAX_FOLLOWED:
                self._topics[topic] = asyncio.create_task(self._read_topic(topic), name=f"agora-p2p-{topic}")  # owned
                self._followed.add(topic)
        now = time.monotonic()
        if self.table.get((offer.signer, HeartbeatBody.record_type)) is None \
                and now - self._asked.get(offer.signer, -1e9) >= self.config.interval_s:  # one fetch a round at most
            self._asked[offer.signer] = now
            if len(self._asked) > MAX_FOLLOWED:
                del self._asked[next(iter(self._asked))]
            self._pull_from(PeerId.parse(offer.signer))

    def _prune_followed(self) -> None:
        """Stop following the models no offer held names any more (its providers left, or the offers
        were orphans: a flood of offers without heartbeats leaves no subscription behind)."""
        if not self._followed:
            return
        held = {model_topic(m.cid) for (_, t), h in self.table.held.items() if t == OfferBody.record_type
                for m in h.record.body.models}
        for topic in self._followed - held:
            self._followed.discard(topic)
            task = self._topics.pop(topic, None)
            if task is not None:
                task.cancel()  # closing the subscription's connection unsubscribes

    async def _read_topic(self, topic: str) -> None:
        while True:
            client = self.daemon.client
            try:
                assert client is not None
                async for message in client.subscribe(topic):
                    if message.author is not None:
                        self.receive(message.author, message.data)
            except (OSError, asyncio.IncompleteReadError, P2PError, AssertionError) as exc:
                log.warning("subscription to %s ended (%s); subscribing again", topic, exc)
            await asyncio.sleep(1.0)

    def receive(self, author: PeerId, data: bytes) -> bool:
        """A record `author` published: kept if it passes every check; an author whose records keep
        failing them is ignored for a while and disconnected."""
        sender = str(author)
        if sender == self._me:
            return False
        if (until := self._ignored.get(sender)) is not None:
            if time.monotonic() < until:
                self.rejected["ignored_author"] += 1
                return False
            del self._ignored[sender]
            self._invalid.pop(sender, None)
        self.received += 1
        before = self._faults
        kept = self._admit(sender, data)
        if faults := self._faults - before:
            self._invalid[sender] += faults
            if self._invalid[sender] >= self.p2p.max_invalid:
                self._ignore(author)
        return kept

    def _reject(self, reason: str) -> None:
        if reason in FAULTS:
            self._faults += 1
        super()._reject(reason)

    def _admit(self, sender: str, data: bytes) -> bool:
        """HTTP gossip's admission rule for one record, charged to its sender: within the sender's
        verification budget, decoded and its signature checked once, then held if it is current. The
        same bytes taken moments ago (one record published on two topics this node follows) are not
        checked again."""
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest in self._seen:
            return False
        fresh = self._unseen([data], sender)
        if not fresh:
            return False
        record = verify_all(fresh)[0]
        if isinstance(record, str):
            self._reject(record)
            return False
        if record.signer != sender:  # each node publishes its own records; a relay is GossipSub's job
            self._reject("foreign")
            return False
        if not self._admit_all([record], sender):
            return False
        self._seen[digest] = None
        if len(self._seen) > SEEN_MESSAGES:
            self._seen.popitem(last=False)
        if record.type == OfferBody.record_type and self._follow:
            self._follow_models(record)
        if record.type == HeartbeatBody.record_type:
            self.table.prove(sender)  # it reached us over an authenticated connection as itself: it is live
            self._check_offer(record)
        return True

    def _check_offer(self, heartbeat: Record[HeartbeatBody]) -> None:
        """A heartbeat names an offer this node does not hold: fetch it from its signer (a node that
        joined after the offer was last published would otherwise wait for its republication)."""
        wanted = heartbeat.body.offer
        held = self.table.get((heartbeat.signer, OfferBody.record_type))
        if wanted and (held is None or str(held.cid) != wanted) and heartbeat.signer not in self._pulls:
            self._pull_from(PeerId.parse(heartbeat.signer))

    def _ignore(self, author: PeerId) -> None:
        sender = str(author)
        log.warning("ignoring libp2p peer %s for %.0f s: it sent %d invalid records", sender, self.p2p.ignore_s,
                    self._invalid[sender])
        self._ignored[sender] = time.monotonic() + self.p2p.ignore_s
        if (client := self.daemon.client) is not None and sender not in self._pulls:
            async def disconnect() -> None:
                try:
                    with contextlib.suppress(OSError, asyncio.IncompleteReadError, P2PError):
                        await client.disconnect(author)
                finally:
                    self._pulls.pop(sender, None)
            self._pulls[sender] = asyncio.create_task(disconnect())  # owned: cancelled in stop()

    # -- the records protocol -------------------------------------------------------------------------

    async def _serve_records(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An inbound `/agora/records/1` stream: send this node's own current records, then close."""
        try:
            client = self.daemon.client
            if client is None:
                return
            await asyncio.wait_for(client.read_stream_info(reader), self.p2p.fetch_timeout_s)
            self._publish_own()
            for record in list(self.table.records()):
                if record.signer == self._me:
                    await write_delimited(writer, record.encode())
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, P2PError) as exc:
            log.debug("serving a records stream failed: %s", exc)
        finally:
            writer.close()

    async def fetch_records(self, peer: PeerId) -> int:
        """Ask `peer` for its current signed records over a libp2p stream; keep those that check out."""
        client = self.daemon.client
        if client is None or str(peer) in self._ignored:
            return 0
        self.fetches += 1
        records: list[bytes] = []
        writer = None
        try:
            async with asyncio.timeout(self.p2p.fetch_timeout_s):
                reader, writer = await client.stream_open(peer, RECORDS_PROTOCOL, timeout_s=self.p2p.fetch_timeout_s)
                while len(records) < MAX_STREAM_RECORDS:
                    records.append(await read_delimited(reader, MAX_RECORD_BYTES))
        except asyncio.IncompleteReadError:
            pass  # the peer sent all it has
        except (OSError, asyncio.TimeoutError, P2PError) as exc:
            log.info("fetching records from %s failed: %s", peer, exc)
        finally:
            if writer is not None:
                writer.close()
        # Heartbeat first, so the offer it names is taken without another fetch.
        records.sort(key=lambda data: _type_of(data) != HeartbeatBody.record_type)
        return sum(self.receive(peer, data) for data in records)

    # -- lookups ----------------------------------------------------------------------------------------

    async def locate(self, peer: str) -> str | None:
        """A live peer's URL; one that sells nothing publishes no heartbeat, so it is asked for its current
        signed records (its heartbeat names its URL) over a libp2p stream."""
        if (url := self.members().get(peer)) is not None or not self._started:
            return url
        with contextlib.suppress(AgoraError):
            await self.fetch_records(PeerId.parse(peer))
        return self.members().get(peer)

    async def find_offers(self, model: str | None) -> list[Record[OfferBody]]:
        found = await super().find_offers(model)
        if found or model is None or not self._started:
            return found
        await self.lookup(model)
        return await super().find_offers(model)

    async def lookup(self, model: str) -> None:
        """Find `model`'s providers in the DHT and fetch their records (one lookup per model at a time)."""
        if time.monotonic() - self._looked_up.get(model, -1e9) < self.p2p.lookup_again_s:
            return
        if model not in self._lookups:
            self._lookups[model] = asyncio.create_task(self._lookup(model))  # owned: cancelled in stop()
        await asyncio.shield(self._lookups[model])

    async def _lookup(self, model: str) -> None:
        client = self.daemon.client
        try:
            if client is None:
                return
            self.lookups += 1
            with contextlib.suppress(AgoraError):
                self._subscribe(model_topic(str(parse_cid(model))))  # a CID: hear its providers from now on
            # Each provider's records are fetched as soon as the DHT names it, and the lookup answers once one
            # live offer is held (the other providers' heartbeats follow on the model's topic), rather than
            # when the query has walked the DHT neighbourhood for all `lookup_providers`.
            progress = asyncio.Event()
            fetches: list[asyncio.Task[int]] = []
            me = self.identity.peer_id

            async def names() -> None:
                try:
                    async for provider in client.providers(model_key(model), count=self.p2p.lookup_providers,
                                                           timeout_s=self.p2p.lookup_timeout_s):
                        if provider.peer is not None and provider.peer != me:
                            task = self._pull_from(provider.peer)
                            task.add_done_callback(lambda _: progress.set())
                            fetches.append(task)
                            progress.set()
                except (OSError, asyncio.IncompleteReadError, P2PError) as exc:
                    log.info("DHT lookup of %s failed: %s", model, exc)
                finally:
                    progress.set()

            reader = asyncio.create_task(names())
            try:
                async with asyncio.timeout(self.p2p.lookup_timeout_s + self.p2p.fetch_timeout_s):
                    while not await super().find_offers(model):
                        if reader.done() and all(t.done() for t in fetches):
                            break
                        progress.clear()
                        await progress.wait()
            except asyncio.TimeoutError:
                log.info("DHT lookup of %s timed out", model)
            finally:
                await cancel_and_wait(reader)  # ends the DHT query (closing its connection) if still running
            log.info("DHT named %d provider(s) of %s", len(fetches), model)
            for offer in await super().find_offers(model):
                for m in offer.body.models:  # follow the model by CID once it is known by name
                    if model in (m.cid, m.name):
                        self._subscribe(model_topic(m.cid))
            if not await super().find_offers(model):
                self._looked_up[model] = time.monotonic()
        finally:
            self._lookups.pop(model, None)

    def _pull_from(self, peer: PeerId) -> asyncio.Task[int]:
        """A records fetch from `peer` that may outlive the lookup that started it (owned: cancelled in stop())."""
        key = str(peer)
        task = self._pulls.get(key)
        if task is None:
            async def pull() -> int:
                try:
                    return await self.fetch_records(peer)
                finally:
                    self._pulls.pop(key, None)
            task = self._pulls[key] = asyncio.create_task(pull())
        return task

    # -- views ----------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        return super().metrics() | {"p2p_records_received_total": self.received, "p2p_dht_lookups_total": self.lookups,
                                    "p2p_record_fetches_total": self.fetches,
                                    "p2p_ignored_authors": sum(t > time.monotonic() for t in self._ignored.values())}

    def stats(self) -> dict[str, Any]:
        return super().stats() | {"discovery": "libp2p", "multiaddrs": self.multiaddrs(),
                                  "topics": sorted(self._topics), "ignored": sorted(self._ignored),
                                  "received": self.received, "dht_lookups": self.lookups, "fetches": self.fetches}


def _type_of(data: bytes) -> str:
    try:
        return decode_record(data).type
    except RecordError:
        return ""
