"""The gossiped records a node holds, and the one place that decides which records it takes.

`GossipTable.admit` is the admission rule of every discovery implementation (the HTTP gossip here; a
libp2p topic validator calls the same method with the message's source): a record must verify, be
current, be no older than one seen before from its signer (`stale`), and stay within its signer's
rate (`rate_limited`). The table is bounded and fair:

- **Liveness ranks records.** A signer is *proven* once this node reached the URL its heartbeat names
  and the node there answered as that signer; an offer whose signer has no live heartbeat is an
  *orphan*. Orphans are never relayed and are dropped `orphan_ttl_s` after they arrive; records of
  unproven signers are relayed only in small numbers; proven signers' records are never evicted.
- **Each source gets a bounded share.** Records of unproven signers are charged to the source that
  brought them (a client address, or the proven peer that relayed them); one source holds at most
  `max_unproven_per_source` of them, and a new one evicts that source's oldest (orphans first).
- **A full table evicts, it does not refuse.** When `max_records` are held, a new record evicts an
  orphan or an unproven record of the source holding the most, so an honest live provider always
  gets in; only a table full of proven peers refuses (`full`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agoranet.core.records import OfferBody, Record, RecordBody, register


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


class RateLimiter:
    """Token buckets keyed by sender (signer or client address); the least recently seen key goes first."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, key: str, want: int) -> int:
        """Take up to `want` whole tokens from `key`'s bucket; returns how many it held."""
        now = self.clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        granted = min(want, int(tokens))
        self._buckets[key] = (tokens - granted, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return granted

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


Key = tuple[str, str]  # (signer, record type)
HEARTBEAT = HeartbeatBody.record_type


@dataclass
class Held:
    record: Record[Any]
    source: str  # who brought it: "self", "ip:ADDR" or a proven peer id
    received_ms: int
    _wire: dict[str, Any] | None = None

    def wire(self) -> dict[str, Any]:
        if self._wire is None:
            self._wire = self.record.to_json()
        return self._wire


@dataclass(frozen=True)
class TableLimits:
    max_clock_skew_s: float = 10.0  # records issued further in the future are rejected
    max_heartbeat_ttl_s: float = 60.0  # a heartbeat never keeps a peer alive longer than this
    max_offer_ttl_s: float = 24 * 3600.0
    max_records: int = 4096
    max_unproven_per_source: int = 256
    orphan_ttl_s: float = 12.0  # an offer with no live heartbeat of its signer is dropped this long after arrival
    signer_records_per_s: float = 10.0  # new records accepted per signer (a node issues ~2 per round)
    signer_burst: int = 40


class GossipTable:
    """Records by (signer, type), with the newest issue time ever held per key (so replays cannot roll back)."""

    def __init__(self, limits: TableLimits, *, clock: Callable[[], int]) -> None:
        self.limits, self.clock = limits, clock
        self.kinds: dict[str, GossipKind] = {}  # record type -> kind, for kinds roles added
        self.held: dict[Key, Held] = {}
        self._sigs: dict[str, Key] = {}  # signature -> key of each record held: a push of it needs no verification
        self._newest: collections.OrderedDict[Key, int] = collections.OrderedDict()
        self._by_source: dict[str, collections.OrderedDict[Key, None]] = {}  # unproven records, oldest first
        self.proven: set[str] = set()
        self._signer_limit = RateLimiter(limits.signer_records_per_s, limits.signer_burst, clock=lambda: clock() / 1000)
        self.evicted: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self.held)

    def holds_exactly(self, item: Any) -> bool:
        """Whether a wire record is one held, byte for byte (so it needs no signature check)."""
        sig = item.get("sig") if isinstance(item, dict) else None
        if not isinstance(sig, str) or (key := self._sigs.get(sig)) is None:
            return False
        held = self.held.get(key)
        return held is not None and held.wire() == item

    def get(self, key: Key) -> Record[Any] | None:
        held = self.held.get(key)
        return held.record if held is not None else None

    def records(self) -> Iterable[Record[Any]]:
        return (h.record for h in self.held.values())

    def unproven_count(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    # -- admission ----------------------------------------------------------------------------------

    def issued(self, record: Record[Any]) -> int:
        kind = self.kinds.get(record.type)
        return kind.issued_ms(record.body) if kind is not None else record.body.issued_ms

    def expires(self, record: Record[Any]) -> int:
        kind = self.kinds.get(record.type)
        return kind.issued_ms(record.body) + int(kind.ttl_s * 1000) if kind is not None else record.body.expires_ms

    def problem(self, record: Record[Any]) -> str | None:
        """Why a verified record is not current (type, issue time, lifetime), or None: no state involved."""
        body, limits, now = record.body, self.limits, self.clock()
        if (kind := self.kinds.get(record.type)) is not None and isinstance(body, kind.body):
            if self.issued(record) > now + limits.max_clock_skew_s * 1000:
                return "from_future"
            if self.expires(record) <= now:
                return "expired"
            return kind.problem(record) if kind.problem is not None else None
        if not isinstance(body, GOSSIPED):
            return "wrong_type"
        ttl_cap = limits.max_offer_ttl_s if isinstance(body, OfferBody) else limits.max_heartbeat_ttl_s
        if body.issued_ms > now + limits.max_clock_skew_s * 1000:
            return "from_future"
        if body.expires_ms <= now:
            return "expired"
        if body.expires_ms - body.issued_ms > ttl_cap * 1000 or body.expires_ms < body.issued_ms:
            return "bad_lifetime"
        return None

    def admit(self, record: Record[Any], source: str) -> str | None:
        """Hold a verified record brought by `source`: None if it was taken, else why not (`held` for one
        already held or older than that, which is no offence). The one admission rule of discovery."""
        if (reason := self.problem(record)) is not None:
            return reason
        key = (record.signer, record.type)
        held = self.held.get(key)
        issued = self.issued(record)
        if held is not None and ((held_issued := self.issued(held.record)) > issued or (  # CIDs only break ties:
                held_issued == issued and str(held.record.cid) >= str(record.cid))):  # hashing costs ~30 µs a record
            return "held"
        if held is None and issued < self._newest.get(key, -1):
            # Older than one held and evicted: a replay. The same record again is no rollback
            # (a returning provider's unchanged offer is relayed back after its eviction).
            return "stale"
        if not self._signer_limit.allow(record.signer):
            return "rate_limited"
        unproven = record.signer not in self.proven
        if held is None:
            if unproven and self.unproven_count(source) >= self.limits.max_unproven_per_source:
                self._evict_from(source, "source_share")
            if len(self.held) >= self.limits.max_records and not self._make_room():
                return "full"
        else:
            self._drop(key)
        self._put(key, Held(record, source, self.clock()), unproven)
        return None

    def put_own(self, record: Record[Any]) -> None:
        """This node's own record: no checks, never evicted."""
        key = (record.signer, record.type)
        self.proven.add(record.signer)
        if key in self.held:
            self._drop(key)
        self._put(key, Held(record, "self", self.clock()), unproven=False)

    def _put(self, key: Key, held: Held, unproven: bool) -> None:
        self.held[key] = held
        self._sigs[held.record.sig.hex()] = key
        if unproven:
            self._by_source.setdefault(held.source, collections.OrderedDict())[key] = None
        self._newest.pop(key, None)
        self._newest[key] = self.issued(held.record)
        while len(self._newest) > 4 * self.limits.max_records:
            self._newest.popitem(last=False)  # a record this old has expired by now in all likelihood

    def _drop(self, key: Key) -> None:
        held = self.held.pop(key, None)
        if held is None:
            return
        self._sigs.pop(held.record.sig.hex(), None)
        if (queue := self._by_source.get(held.source)) is not None:
            queue.pop(key, None)
            if not queue:
                del self._by_source[held.source]

    def drop_signer(self, signer: str, reason: str) -> None:
        for key in [k for k in self.held if k[0] == signer]:
            self._drop(key)
            self.evicted[reason] += 1
        self.proven.discard(signer)

    def _orphan(self, key: Key) -> bool:
        return key[1] == OfferBody.record_type and (key[0], HEARTBEAT) not in self.held

    def _evict_from(self, source: str, reason: str) -> bool:
        """Evict one of `source`'s unproven records: an orphan if it has one, else its oldest."""
        queue = self._by_source.get(source)
        if not queue:
            return False
        victim = next((k for k in queue if self._orphan(k)), next(iter(queue)))
        self._drop(victim)
        self.evicted[reason] += 1
        return True

    def _make_room(self) -> bool:
        if not self._by_source:
            return False
        largest = max(self._by_source, key=lambda s: len(self._by_source[s]))
        return self._evict_from(largest, "table_full")

    # -- liveness -----------------------------------------------------------------------------------

    def prove(self, signer: str) -> None:
        """`signer` answered at the URL its heartbeat names: its records are no longer charged to a source."""
        if signer in self.proven:
            return
        self.proven.add(signer)
        for key in [k for k in self.held if k[0] == signer]:
            held = self.held[key]
            if (queue := self._by_source.get(held.source)) is not None:
                queue.pop(key, None)
                if not queue:
                    del self._by_source[held.source]

    def expire(self) -> None:
        """Drop expired records, and orphan offers held longer than `orphan_ttl_s`."""
        now, orphan_ms = self.clock(), int(self.limits.orphan_ttl_s * 1000)
        for key, held in list(self.held.items()):
            if self.expires(held.record) <= now:
                self._drop(key)
            elif self._orphan(key) and now - held.received_ms > orphan_ms:
                self._drop(key)
                self.evicted["orphan"] += 1

    def relayable(self, max_unproven: int) -> list[Held]:
        """What to send a peer, in this order: own and proven signers' records, then at most
        `max_unproven` of the newest unproven ones whose signer has a live heartbeat; orphans never."""
        first: list[Held] = []
        rest: list[Held] = []
        for key, held in self.held.items():
            if self._orphan(key):
                continue
            (first if key[0] in self.proven else rest).append(held)
        rest.sort(key=lambda h: h.received_ms, reverse=True)
        return first + rest[:max_unproven]
