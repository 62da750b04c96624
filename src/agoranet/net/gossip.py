"""Discovery by signed gossip over HTTP: push-pull anti-entropy of offer and heartbeat records.

Every round a node signs a fresh heartbeat, picks up to `fanout` peers at random (seeds from the
command line plus every live peer's heartbeat URL) and sends them all live records it holds; each
answers with the live records the sender lacks. Only records that verify, have not expired and were
not issued in the future are kept (the latest per signer and type); the rest are counted by reason.
A peer is live while its latest heartbeat is; when it lapses (missed heartbeats) the peer, its offer
and its URL are evicted. Records carry their own proof, so they can be relayed by anyone.

Roles may add record kinds of their own (`GossipKind`, e.g. signed tree heads): they travel the
same way, are kept per signer by the same rules, and the role hears of every one that checks out.

Against hostile peers: each signer gets a token bucket of new records (a flood is rejected as
`rate_limited`), and the newest issue time seen per signer and type outlives eviction, so a replayed
older record never rolls state back (`stale`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from agoranet.core.errors import BadSignature, RecordError
from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, Record, RecordBody, register, sign_record, verify_record
from agoranet.core.tasks import cancel_and_wait
from agoranet.net.discovery import MembershipEvent, OfferSource, offers_model
from agoranet.net.peer import PeerClient, PeerError

log = logging.getLogger(__name__)

@register("agora/heartbeat/1")
class HeartbeatBody(RecordBody):
    """A node saying it is alive, where it listens and which offer (by CID) it currently stands by."""

    url: str
    roles: list[str]
    offer: str  # CID of the node's current offer record, "" when it sells nothing
    seq: int
    issued_ms: int
    expires_ms: int


GOSSIPED = (OfferBody, HeartbeatBody)


@dataclass(frozen=True)
class GossipKind:
    """A record type a role adds to gossip: how long one lives, this node's own, and who hears of them."""

    body: type[RecordBody]
    issued_ms: Callable[[Any], int]  # when a body was signed; it is relayed until ttl_s after that
    ttl_s: float
    own: Callable[[], Record[Any] | None] | None = None  # this node's current one, re-read every round
    problem: Callable[[Record[Any]], str | None] | None = None  # a kind-specific reason to reject, or None
    observe: Callable[[Record[Any]], None] | None = None  # every new record that passes, even an older one


@dataclass(frozen=True)
class GossipConfig:
    interval_s: float = 2.0  # one push-pull round per interval
    fanout: int = 3  # peers contacted per round
    # A peer is dead once this many intervals pass without a heartbeat. 6, not 3: under a 500-client load
    # a saturated node's gossip rounds run late, and 3 evicted live providers (3% of requests got 404).
    missed_heartbeats: int = 6
    max_clock_skew_s: float = 10.0  # records issued further in the future are rejected
    max_heartbeat_ttl_s: float = 60.0  # a heartbeat never keeps a peer alive longer than this
    max_offer_ttl_s: float = 24 * 3600.0
    max_records: int = 4096
    request_timeout_s: float = 2.0
    signer_records_per_s: float = 10.0  # new records accepted per signer (a node issues ~2 per round)
    signer_burst: int = 40
    pushes_per_s: float = 20.0  # gossip pushes answered per client address (NetworkRole)
    push_burst: int = 60
    max_response_bytes: int = 4 << 20  # a peer's gossip answer larger than this is dropped


class RateLimiter:
    """Token buckets keyed by sender (signer or client address); the least recently seen key goes first."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def allow(self, key: str, cost: float = 1.0) -> bool:
        """Take `cost` tokens from `key`'s bucket if it holds that many (a byte count, say)."""
        now = self.clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        allowed = tokens >= cost
        self._buckets[key] = (tokens - cost if allowed else tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed


def now_ms() -> int:
    return int(time.time() * 1000)


class GossipDiscovery:
    """The HTTP gossip implementation of `Discovery`; `exchange` is what the node's gossip route calls."""

    def __init__(self, identity: Identity, url: str, seeds: list[str], *, roles: list[str],
                 config: GossipConfig | None = None, clock: Callable[[], int] = now_ms) -> None:
        self.identity, self.url, self.roles = identity, url.rstrip("/"), roles
        self.config = config or GossipConfig()
        self.seeds = [s.rstrip("/") for s in seeds if s.rstrip("/") != self.url]
        self.clock = clock
        self.rejected: collections.Counter[str] = collections.Counter()
        self.accepted = 0
        self.rounds = 0
        self._records: dict[tuple[str, str], Record[Any]] = {}  # (signer, type) -> latest record
        # (signer, type) -> newest issued_ms ever accepted; kept after eviction so replays cannot roll back
        self._newest: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()
        self._signer_limit = RateLimiter(self.config.signer_records_per_s, self.config.signer_burst,
                                         clock=lambda: self.clock() / 1000)
        self._live: dict[str, str] = {}  # peer id -> url, as of the last sweep
        self._offer_source: OfferSource | None = None
        self._seq = 0
        self._watchers: list[asyncio.Queue[MembershipEvent | None]] = []
        self._client: PeerClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._kinds: dict[str, GossipKind] = {}  # record type -> kind, for kinds roles added

    def add_kind(self, kind: GossipKind) -> None:
        """Gossip one more record type besides offers and heartbeats (call before `start`)."""
        self._kinds[kind.body.record_type] = kind

    # -- Discovery ------------------------------------------------------------------------------------

    def announce(self, offer: OfferSource) -> None:
        self._offer_source = offer
        self._publish_own()

    async def find_offers(self, model: str | None) -> list[Record[OfferBody]]:
        self._sweep()
        return [r for (signer, t), r in self._records.items()
                if t == OfferBody.record_type and signer in self._live and (model is None or offers_model(r, model))]

    def members(self) -> dict[str, str]:
        self._sweep()
        return dict(self._live)

    def watch(self) -> AsyncIterator[MembershipEvent]:
        queue: asyncio.Queue[MembershipEvent | None] = asyncio.Queue()
        self._watchers.append(queue)  # now, so nothing that happens before the first read is missed
        return self._drain(queue)

    async def _drain(self, queue: asyncio.Queue[MembershipEvent | None]) -> AsyncIterator[MembershipEvent]:
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._watchers.remove(queue)

    async def start(self) -> None:
        self._client = PeerClient(connect_timeout_s=self.config.request_timeout_s,
                                  read_timeout_s=self.config.request_timeout_s)
        self._publish_own()
        self._task = asyncio.create_task(self._run(), name="agora-gossip")  # owned: cancelled in stop()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for queue in self._watchers:
            queue.put_nowait(None)
        if self._client is not None:
            await self._client.aclose()

    # -- records --------------------------------------------------------------------------------------

    def ingest(self, wire: list[Any]) -> int:
        """Keep every record in `wire` that verifies and is current; count the rest by reason."""
        kept = 0
        for item in wire[: self.config.max_records]:
            try:
                record = verify_record(item)
            except RecordError as exc:
                self._reject("bad_signature" if isinstance(exc, BadSignature) else "malformed")
                continue
            if (reason := self._problem(record)) is not None:
                self._reject(reason)
                continue
            key = (record.signer, record.type)
            held = self._records.get(key)
            if held is not None and held.cid == record.cid:
                continue
            if (kind := self._kinds.get(record.type)) is not None and kind.observe is not None:
                try:  # told even of records older than the one held: a role may compare them
                    kind.observe(record)
                except Exception:
                    log.exception("observing a gossiped %s failed", record.type)
            if held is not None and (self._issued(held), str(held.cid)) >= (self._issued(record), str(record.cid)):
                continue  # we already hold this one or a newer one
            if held is None and self._issued(record) < self._newest.get(key, -1):
                # Older than one we held and evicted: a replay. The same record again is no rollback
                # (a returning provider's unchanged offer is relayed back after its eviction).
                self._reject("stale")
                continue
            if held is None and len(self._records) >= self.config.max_records:
                self._reject("full")
                continue
            if not self._signer_limit.allow(record.signer):
                self._reject("rate_limited")
                continue
            self._records[key] = record
            self._remember(key, self._issued(record))
            self.accepted += 1
            kept += 1
        if kept:
            self._sweep()
        return kept

    def _issued(self, record: Record[Any]) -> int:
        kind = self._kinds.get(record.type)
        return kind.issued_ms(record.body) if kind is not None else record.body.issued_ms

    def _expires(self, record: Record[Any]) -> int:
        kind = self._kinds.get(record.type)
        return kind.issued_ms(record.body) + int(kind.ttl_s * 1000) if kind is not None else record.body.expires_ms

    def _remember(self, key: tuple[str, str], issued_ms: int) -> None:
        self._newest.pop(key, None)
        self._newest[key] = issued_ms
        while len(self._newest) > 4 * self.config.max_records:
            self._newest.popitem(last=False)  # a record this old has expired by now in all likelihood

    def _problem(self, record: Record[Any]) -> str | None:
        body = record.body
        now = self.clock()
        if (kind := self._kinds.get(record.type)) is not None and isinstance(body, kind.body):
            if self._issued(record) > now + self.config.max_clock_skew_s * 1000:
                return "from_future"
            if self._expires(record) <= now:
                return "expired"
            return kind.problem(record) if kind.problem is not None else None
        if not isinstance(body, GOSSIPED):
            return "wrong_type"
        ttl_cap = self.config.max_offer_ttl_s if isinstance(body, OfferBody) else self.config.max_heartbeat_ttl_s
        if body.issued_ms > now + self.config.max_clock_skew_s * 1000:
            return "from_future"
        if body.expires_ms <= now:
            return "expired"
        if body.expires_ms - body.issued_ms > ttl_cap * 1000 or body.expires_ms < body.issued_ms:
            return "bad_lifetime"
        return None

    def _reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        log.info("gossip record rejected: %s", reason)

    def live_records(self) -> list[dict[str, Any]]:
        self._sweep()
        return [r.to_json() for r in self._records.values()]

    def exchange(self, pushed: list[Any]) -> list[dict[str, Any]]:
        """Answer a peer's push: take what verifies, return the live records it did not send."""
        self.ingest(pushed)
        sent = set()
        for item in pushed:
            if isinstance(item, dict) and isinstance(item.get("sig"), str):
                sent.add(item["sig"])
        return [w for w in self.live_records() if w["sig"] not in sent]

    def _publish_own(self) -> None:
        now = self.clock()
        offer_cid = ""
        if self._offer_source is not None:
            offer = self._offer_source()
            offer_cid = str(offer.cid)
            self._records[(offer.signer, offer.type)] = offer
            self._remember((offer.signer, offer.type), offer.body.issued_ms)
        self._seq += 1
        # Never under 3 s: a busy node's rounds run late, and that alone must not get it evicted.
        ttl = min(max(self.config.interval_s * self.config.missed_heartbeats, 3.0), self.config.max_heartbeat_ttl_s)
        hb = sign_record(self.identity, HeartbeatBody(
            url=self.url, roles=self.roles, offer=offer_cid, seq=self._seq, issued_ms=now,
            expires_ms=now + int(ttl * 1000),
        ))
        self._records[(hb.signer, hb.type)] = hb
        self._remember((hb.signer, hb.type), hb.body.issued_ms)
        for kind in self._kinds.values():
            if kind.own is not None and (own := kind.own()) is not None:
                self._records[(own.signer, own.type)] = own

    def _sweep(self) -> None:
        """Drop expired records and peers whose heartbeat lapsed; tell watchers who came and went."""
        now = self.clock()
        for key, record in list(self._records.items()):
            if self._expires(record) <= now:
                del self._records[key]
        live = {signer: r.body.url for (signer, t), r in self._records.items() if t == HeartbeatBody.record_type}
        for peer, url in live.items():
            if peer not in self._live:
                self._emit(MembershipEvent("joined", peer, url))
        for peer, url in self._live.items():
            if peer not in live:
                log.info("peer %s at %s left (missed heartbeats)", peer, url)
                self._records.pop((peer, OfferBody.record_type), None)
                self._emit(MembershipEvent("left", peer, url))
        self._live = live

    def _emit(self, event: MembershipEvent) -> None:
        for queue in self._watchers:
            queue.put_nowait(event)

    # -- rounds ---------------------------------------------------------------------------------------

    def contacts(self) -> list[str]:
        me = str(self.identity.peer_id)
        urls = set(self.seeds) | {url for peer, url in self.members().items() if peer != me}
        urls.discard(self.url)
        return sorted(urls)

    async def gossip_round(self) -> None:
        """Publish a fresh heartbeat and push-pull with up to `fanout` random peers at once."""
        self._publish_own()
        targets = self.contacts()
        targets = random.sample(targets, min(self.config.fanout, len(targets)))
        if targets:
            await asyncio.gather(*(self._exchange_with(url) for url in targets))
        self._sweep()
        self.rounds += 1

    async def _exchange_with(self, url: str) -> None:
        assert self._client is not None
        try:
            answer = await self._client.gossip(url, self.live_records(), max_bytes=self.config.max_response_bytes)
        except PeerError as exc:
            log.debug("gossip with %s failed: %s", url, exc)
            return
        self.ingest(answer)

    async def _run(self) -> None:
        while True:
            try:
                await self.gossip_round()
            except Exception:  # one bad round must not end discovery
                log.exception("gossip round failed")
            # jitter keeps nodes started together from gossiping in lockstep
            await asyncio.sleep(self.config.interval_s * (0.75 + 0.5 * random.random()))

    def metrics(self) -> dict[str, float]:
        """Flat readings for /metrics: records accepted and rejected (all reasons), members held."""
        return {"gossip_records_accepted_total": self.accepted,
                "gossip_records_rejected_total": sum(self.rejected.values()),
                "gossip_records_rate_limited_total": self.rejected["rate_limited"],
                "gossip_records_stale_total": self.rejected["stale"],
                "gossip_members": len(self.members()), "gossip_records": len(self._records)}

    def stats(self) -> dict[str, Any]:
        return {"peer": str(self.identity.peer_id), "url": self.url, "members": self.members(),
                "records": len(self._records), "accepted": self.accepted, "rejected": dict(self.rejected),
                "rounds": self.rounds, "contacts": self.contacts()}
