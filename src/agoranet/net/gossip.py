"""Discovery by signed gossip over HTTP: push-pull anti-entropy of offer and heartbeat records.

Every round a node signs a fresh heartbeat, contacts its seeds, up to `fanout` proven peers at random
and `probes` unproven ones, and sends them the live records it relays; each answers with the live
records the sender lacks and the peer id it is. Only records that verify, have not expired and were
not issued in the future are kept (the latest per signer and type); the rest are counted by reason.
A peer is live while its latest heartbeat is; when it lapses (missed heartbeats) the peer, its offer
and its URL are evicted. Records carry their own proof, so they can be relayed by anyone.

Roles may add record kinds of their own (`GossipKind`, e.g. signed tree heads): they travel the
same way, are kept per signer by the same rules, and the role hears of every one that checks out.

Against hostile peers: admission and the table's bounds live in `gossip_table` (per-signer rates,
replays, a bounded share per source, liveness-ranked eviction, orphan offers dropped quickly). A
round contacts the seeds, `fanout` proven peers and `probes` unproven ones: a node that answers at
the URL its heartbeat names, as the peer id that signed it, is proven; one that does not is evicted.
Pushes are split into parts under `max_push_bytes` (halved for a peer that answers 413), and
signatures of a push are checked in a worker thread within a per-source budget (`over_budget`).
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

import yarl
from pydantic_core import to_json

from agoranet.core.errors import BadSignature, RecordError
from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, Record, sign_record, verify_record
from agoranet.core.tasks import cancel_and_wait
from agoranet.net.discovery import MembershipEvent, OfferSource, offers_model
from agoranet.net.gossip_table import (
    GOSSIPED, GossipKind, GossipTable, HeartbeatBody, RateLimiter, TableLimits,
)
from agoranet.net.peer import PeerClient, PeerError, PeerRefused, PeerUnreachable

__all__ = ["GOSSIPED", "GossipConfig", "GossipDiscovery", "GossipKind", "HeartbeatBody", "RateLimiter", "now_ms",
           "verify_all"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GossipConfig:
    interval_s: float = 2.0  # one push-pull round per interval
    fanout: int = 3  # proven peers contacted per round
    probes: int = 2  # unproven peers contacted per round besides: each answer proves or evicts one
    # A peer is dead once this many intervals pass without a heartbeat. 6, not 3: under a 500-client load
    # a saturated node's gossip rounds run late, and 3 evicted live providers (3% of requests got 404).
    missed_heartbeats: int = 6
    max_clock_skew_s: float = 10.0  # records issued further in the future are rejected
    max_heartbeat_ttl_s: float = 60.0  # a heartbeat never keeps a peer alive longer than this
    max_offer_ttl_s: float = 24 * 3600.0
    max_records: int = 4096
    max_unproven_per_source: int = 256  # records of unproven signers one source may have held here
    orphan_ttl_s: float = 12.0  # an offer whose signer sent no heartbeat is dropped this long after arrival
    request_timeout_s: float = 2.0
    signer_records_per_s: float = 10.0  # new records accepted per signer (a node issues ~2 per round)
    signer_burst: int = 40
    pushes_per_s: float = 20.0  # gossip pushes answered per client address (NetworkRole)
    push_burst: int = 60
    verify_per_s: float = 200.0  # signatures checked per source and second (a CPU budget: ~5% of a core)
    verify_burst: int = 1000  # what a peer joining a large network sends at first contact
    max_push_bytes: int = 512 << 10  # a push is split into parts no larger (half the 1 MiB default body limit)
    max_response_bytes: int = 4 << 20  # a peer's gossip answer larger than this is dropped

    @property
    def table(self) -> TableLimits:
        return TableLimits(max_clock_skew_s=self.max_clock_skew_s, max_heartbeat_ttl_s=self.max_heartbeat_ttl_s,
                           max_offer_ttl_s=self.max_offer_ttl_s, max_records=self.max_records,
                           max_unproven_per_source=self.max_unproven_per_source, orphan_ttl_s=self.orphan_ttl_s,
                           signer_records_per_s=self.signer_records_per_s, signer_burst=self.signer_burst)


def now_ms() -> int:
    return int(time.time() * 1000)


def verify_all(wire: list[Any]) -> list[Record[Any] | str]:
    """Each wire record verified, or the reason it is not (a thread may run this: it touches no state)."""
    out: list[Record[Any] | str] = []
    for item in wire:
        try:
            out.append(verify_record(item))
        except RecordError as exc:
            out.append("bad_signature" if isinstance(exc, BadSignature) else "malformed")
    return out


def split(records: list[dict[str, Any]], max_bytes: int) -> list[list[dict[str, Any]]]:
    """Records in consecutive parts whose JSON stays under `max_bytes` each (a record alone may not)."""
    parts: list[list[dict[str, Any]]] = [[]]
    size = 0
    for record in records:
        n = len(to_json(record)) + 1
        if parts[-1] and size + n > max_bytes - 64:
            parts.append([])
            size = 0
        parts[-1].append(record)
        size += n
    return [p for p in parts if p] or [[]]


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
        self.table = GossipTable(self.config.table, clock=clock)
        self._verify_budget = RateLimiter(self.config.verify_per_s, self.config.verify_burst)
        self._push_bytes: dict[str, int] = {}  # peer URL -> the part size it last accepted (halved on 413)
        self._probed: dict[str, int] = {}  # unproven peer id -> when it was last contacted
        self._live: dict[str, str] = {}  # peer id -> url, as of the last sweep
        self._offer_source: OfferSource | None = None
        self._seq = 0
        self._watchers: list[asyncio.Queue[MembershipEvent | None]] = []
        self._client: PeerClient | None = None
        self._task: asyncio.Task[None] | None = None

    def add_kind(self, kind: GossipKind) -> None:
        """Gossip one more record type besides offers and heartbeats (call before `start`)."""
        self.table.kinds[kind.body.record_type] = kind

    # -- Discovery ------------------------------------------------------------------------------------

    def announce(self, offer: OfferSource) -> None:
        self._offer_source = offer
        self._publish_own()

    async def find_offers(self, model: str | None) -> list[Record[OfferBody]]:
        self._sweep()
        return [h.record for (signer, t), h in self.table.held.items()
                if t == OfferBody.record_type and signer in self._live and (model is None or offers_model(h.record, model))]

    def members(self) -> dict[str, str]:
        self._sweep()
        return dict(self._live)

    async def locate(self, peer: str) -> str | None:
        """The URL of a live peer (whether or not it is routed to), or None."""
        return self.members().get(peer)

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
                                  read_timeout_s=self.config.request_timeout_s, signer=self.identity)
        self._publish_own()
        self._task = asyncio.create_task(self._run(), name="agora-gossip")  # owned: cancelled in stop()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for queue in self._watchers:
            queue.put_nowait(None)
        if self._client is not None:
            await self._client.aclose()

    # -- records --------------------------------------------------------------------------------------

    def ingest(self, wire: list[Any], source: str = "local") -> int:
        """Keep every record in `wire` that verifies and is current; count the rest by reason."""
        return self._admit_all(verify_all(self._unseen(wire[: self.config.max_records], source)), source)

    async def ingest_off_loop(self, wire: list[Any], source: str) -> int:
        """`ingest`, with the signatures checked in a worker thread so a large push never stalls the loop."""
        fresh = self._unseen(wire[: self.config.max_records], source)
        checked = await asyncio.to_thread(verify_all, fresh) if len(fresh) > 8 else verify_all(fresh)
        return self._admit_all(checked, source)

    def _unseen(self, wire: list[Any], source: str) -> list[Any]:
        """The records not held already (those need no signature check), within `source`'s CPU budget."""
        fresh = [item for item in wire if not self.table.holds_exactly(item)]
        granted = self._verify_budget.take(source, len(fresh)) if fresh else 0
        if granted < len(fresh):
            self.rejected["over_budget"] += len(fresh) - granted
            log.info("gossip: %d records from %s over its verification budget", len(fresh) - granted, source)
        return fresh[:granted]

    def _admit_all(self, checked: list[Record[Any] | str], source: str) -> int:
        kept = 0
        joined = False
        for record in checked:
            if isinstance(record, str):
                self._reject(record)
                continue
            held = self.table.get((record.signer, record.type))
            reason = self.table.admit(record, source)
            if reason is None or (reason == "held" and held is not None and held.cid != record.cid):
                if (kind := self.table.kinds.get(record.type)) is not None and kind.observe is not None:
                    try:  # told even of records older than the one held: a role may compare them
                        kind.observe(record)
                    except Exception:
                        log.exception("observing a gossiped %s failed", record.type)
            if reason is None:
                self.accepted += 1
                kept += 1
                joined = joined or (record.type == HeartbeatBody.record_type and record.signer not in self._live)
            elif reason != "held":
                self._reject(reason)
        # A new member is told to watchers at once; the rest (lapsed peers, expired records) is swept by
        # every round and before every read (members, find_offers), not at each record: with libp2p each
        # record comes alone, and a sweep per record is a walk of the whole table per heartbeat heard.
        if joined:
            self._sweep()
        return kept

    def _reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        log.debug("gossip record rejected: %s", reason)

    def live_records(self) -> list[dict[str, Any]]:
        """What this node relays: its own and proven peers' records, a few unproven ones, no orphans."""
        self._sweep()
        return [h.wire() for h in self.table.relayable(self.config.max_unproven_per_source // 4)]

    def exchange(self, pushed: list[Any], source: str = "local") -> list[dict[str, Any]]:
        """Answer a peer's push: take what verifies, return the live records it did not send."""
        self.ingest(pushed, source)
        return self._answer(pushed)

    async def exchange_off_loop(self, pushed: list[Any], source: str) -> list[dict[str, Any]]:
        """`exchange` for the gossip route: signatures checked off the event loop, within `source`'s budget."""
        await self.ingest_off_loop(pushed, source)
        return self._answer(pushed)

    def _answer(self, pushed: list[Any]) -> list[dict[str, Any]]:
        sent = {item["sig"] for item in pushed if isinstance(item, dict) and isinstance(item.get("sig"), str)}
        answer, size = [], 0
        for record in self.live_records():
            if record["sig"] in sent:
                continue
            size += len(to_json(record)) + 1
            if size > self.config.max_response_bytes // 2:  # the rest comes next round
                break
            answer.append(record)
        return answer

    def source_of(self, signer: str | None, address: str) -> str:
        """Who records are charged to: a proven peer that signed the push (or answered our pull), else the
        address they came from (a client address, or the host of the URL we pulled from)."""
        if signer is not None and signer in self.table.proven:
            return signer
        return f"ip:{yarl.URL(address).host or address}"

    def _publish_own(self) -> None:
        now = self.clock()
        offer_cid = ""
        if self._offer_source is not None:
            offer = self._offer_source()
            offer_cid = str(offer.cid)
            self.table.put_own(offer)
        self._seq += 1
        # Never under 3 s: a busy node's rounds run late, and that alone must not get it evicted.
        ttl = min(max(self.config.interval_s * self.config.missed_heartbeats, 3.0), self.config.max_heartbeat_ttl_s)
        hb = sign_record(self.identity, HeartbeatBody(
            url=self.url, roles=self.roles, offer=offer_cid, seq=self._seq, issued_ms=now,
            expires_ms=now + int(ttl * 1000),
        ))
        self.table.put_own(hb)
        for kind in self.table.kinds.values():
            if kind.own is not None and (own := kind.own()) is not None:
                self.table.put_own(own)

    def _sweep(self) -> None:
        """Drop expired records and peers whose heartbeat lapsed; tell watchers who came and went."""
        self.table.expire()
        live = {signer: h.record.body.url for (signer, t), h in self.table.held.items() if t == HeartbeatBody.record_type}
        for peer, url in live.items():
            if peer not in self._live:
                self._emit(MembershipEvent("joined", peer, url))
        for peer, url in self._live.items():
            if peer not in live:
                log.info("peer %s at %s left (missed heartbeats)", peer, url)
                self.table.drop_signer(peer, "left")
                self._probed.pop(peer, None)
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

    def _targets(self) -> dict[str, str | None]:
        """This round's peers (URL -> the peer id expected there): seeds and `fanout` proven peers, and
        `probes` unproven ones, the longest unprobed first, whose answer proves them or evicts them."""
        me = str(self.identity.peer_id)
        members = {peer: url for peer, url in self.members().items() if peer != me and url != self.url}
        proven = [(url, peer) for peer, url in members.items() if peer in self.table.proven]
        unproven = sorted(((url, peer) for peer, url in members.items() if peer not in self.table.proven),
                          key=lambda item: self._probed.get(item[1], 0))
        targets: dict[str, str | None] = {url: None for url in self.seeds}
        for url, peer in random.sample(proven, min(self.config.fanout, len(proven))):
            targets[url] = peer
        for url, peer in unproven[: self.config.probes]:
            targets.setdefault(url, peer)
            self._probed[peer] = self.clock()
        return targets

    async def gossip_round(self) -> None:
        """Publish a fresh heartbeat and push-pull with seeds, some proven peers and some unproven ones."""
        self._publish_own()
        targets = self._targets()
        if targets:
            await asyncio.gather(*(self._exchange_with(url, peer) for url, peer in targets.items()))
        self._sweep()
        self.rounds += 1

    async def _exchange_with(self, url: str, expected: str | None) -> None:
        """Push our records in parts that fit the peer's body limit; take its answers; judge its liveness."""
        assert self._client is not None
        records = self.live_records()
        limit = self._push_bytes.get(url, self.config.max_push_bytes)
        answered: str | None = None
        try:
            for part in split(records, limit):
                try:
                    answer, answered = await self._client.gossip(url, part, max_bytes=self.config.max_response_bytes)
                except PeerRefused as exc:
                    if exc.status != 413 or limit < 8 << 10:
                        raise
                    limit = self._push_bytes[url] = limit // 2  # its limit is lower than ours: smaller parts
                    for smaller in split(part, limit):
                        answer, answered = await self._client.gossip(url, smaller, max_bytes=self.config.max_response_bytes)
                        await self.ingest_off_loop(answer, self.source_of(answered, url))
                    continue
                await self.ingest_off_loop(answer, self.source_of(answered, url))
        except PeerError as exc:
            log.debug("gossip with %s failed: %s", url, exc)
            if isinstance(exc, PeerUnreachable) and expected is not None and expected not in self.table.proven:
                self.table.drop_signer(expected, "unreachable")  # its heartbeat names a URL that does not answer
            return
        if answered is not None:
            hb = self.table.get((answered, HeartbeatBody.record_type))
            if hb is not None and hb.body.url.rstrip("/") == url:
                self.table.prove(answered)
        if expected is not None and answered != expected and expected not in self.table.proven:
            self.table.drop_signer(expected, "unreachable")  # another node (or none) answers at its URL

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
                "gossip_records_over_budget_total": self.rejected["over_budget"],
                "gossip_records_evicted_total": sum(self.table.evicted.values()),
                "gossip_members": len(self.members()), "gossip_proven_members": len(self.table.proven & set(self._live)),
                "gossip_records": len(self.table)}

    def stats(self) -> dict[str, Any]:
        return {"peer": str(self.identity.peer_id), "url": self.url, "members": self.members(),
                "records": len(self.table), "accepted": self.accepted, "rejected": dict(self.rejected),
                "evicted": dict(self.table.evicted), "proven": sorted(self.table.proven & set(self._live)),
                "rounds": self.rounds, "contacts": self.contacts()}
