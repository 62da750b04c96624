"""Replication between storage peers: rendezvous placement of k copies, re-checks and repair.

Every peer keeps the set of replicated pins (CID → k) it has been told about. For each, the k live
peers ranking highest by rendezvous hash hold a pinned copy; every peer works this out for itself,
so there is no coordinator to lose. When a peer disappears the ranking over the survivors moves
the next peer into the top k, and that peer pulls the DAG from the others at its next re-check. A
peer that finds itself outside the top k drops its pin once all k holders confirm theirs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from agoranet.core.cid import CID
from agoranet.core.identity import Identity
from agoranet.net.storage_client import FetchStats, PeerBlockFetcher, PeerUnavailable, StoragePeerClient, fetch_dag
from agoranet.wire.storage import ReplicaIntent
from agoranet.store import Blockstore
from agoranet.store.blockstore import as_cid

__all__ = ["rendezvous_rank", "StorageReplicator", "RecheckReport"]

log = logging.getLogger(__name__)


def rendezvous_rank(cid: CID | str, peers: Iterable[str]) -> list[str]:
    """Peers ordered by highest-random-weight hashing of (peer, cid): stable as peers come and go."""
    key = bytes(as_cid(cid))
    return sorted({p.rstrip("/") for p in peers},
                  key=lambda p: hashlib.sha256(p.encode() + b"\0" + key).digest(), reverse=True)


@dataclass
class RecheckReport:
    alive: list[str] = field(default_factory=list)
    corrupt_blocks: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class StorageReplicator:
    """This peer's part in keeping replicated pins at k copies; `run()` re-checks periodically."""

    def __init__(self, store: Blockstore, url: str, peers: Iterable[str], *, recheck_interval: float = 60.0,
                 state_path: Path | None = None, probe_timeout: float = 2.0, identity: Identity | None = None) -> None:
        self.store = store
        self.identity = identity  # signs this peer's announcements; the others accept writes only so signed
        self.peer_ids: dict[str, str] = {}  # peer URL -> the peer id its status reported (learned by probing)
        self._ids_refreshed = 0.0
        self.url = url.rstrip("/")
        self.peers = sorted({p.rstrip("/") for p in peers} | {self.url})
        self.recheck_interval = recheck_interval
        self.probe_timeout = probe_timeout
        self.state_path = state_path
        self.intents: dict[str, int] = {}
        if state_path is not None and state_path.exists():
            self.intents = json.loads(state_path.read_text())
        self._locks: dict[str, asyncio.Lock] = {}
        self.last_report: RecheckReport | None = None  # the latest periodic re-check, for health and metrics
        self._client: httpx.AsyncClient | None = None
        # Corrupt blocks are healed from the other peers, holders first.
        self.forged: Counter[str] = Counter()  # blocks peers sent that did not hash to their CID, by peer URL
        store.fetcher = PeerBlockFetcher(lambda cid: [p for p in rendezvous_rank(cid, self.peers) if p != self.url],
                                         forged=self.forged)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=self.probe_timeout),
                                             limits=httpx.Limits(max_connections=64))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _save(self) -> None:
        if self.state_path is not None:
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.intents, sort_keys=True))
            os.replace(tmp, self.state_path)

    async def alive_peers(self) -> list[str]:
        """Peers that answer a status request now (this peer always counts)."""
        async def probe(url: str) -> str | None:
            if url == self.url:
                return url
            try:
                status = await StoragePeerClient(url, self._http()).status(timeout=self.probe_timeout)
                if status.peer:
                    self.peer_ids[url] = status.peer
                return url
            except (PeerUnavailable, httpx.HTTPError):
                return None
        return [u for u in await asyncio.gather(*(probe(p) for p in self.peers)) if u is not None]

    async def is_peer(self, peer_id: str) -> bool:
        """Whether `peer_id` is one of this peer's replication peers (by the ids their URLs report);
        an unknown id re-probes them, at most every few seconds, so a stranger cannot make us probe often."""
        if peer_id in self.peer_ids.values():
            return True
        if time.monotonic() - self._ids_refreshed < 5.0:
            return False
        self._ids_refreshed = time.monotonic()
        await self.alive_peers()
        return peer_id in self.peer_ids.values()

    async def pin(self, cid: CID | str, replicas: int, sources: Iterable[str] = ()) -> list[str]:
        """Place `replicas` copies of the DAG: announce to every peer, wait for them, return the holders."""
        cid = as_cid(cid)
        sources = [s.rstrip("/") for s in sources]
        if self.store.has(cid) and self.url not in sources:
            sources.insert(0, self.url)
        self._remember(cid, replicas)
        intent = ReplicaIntent(replicas=replicas, sources=sources)
        alive = await self.alive_peers()
        results = await asyncio.gather(
            *(StoragePeerClient(p, self._http(), signer=self.identity).announce(cid, intent)
              for p in alive if p != self.url),
            return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("peer did not take the replica intent", extra={"cid": str(cid), "error": repr(result)})
        # Reconciling here last lets this peer see the others' copies before it drops its own extra one.
        await self.reconcile(cid, sources=sources, alive=alive)
        return await self.holders(cid, alive)

    async def accept(self, cid: CID | str, intent: ReplicaIntent) -> None:
        """A peer announced a replicated pin: remember it and take this peer's share now."""
        cid = as_cid(cid)
        self._remember(cid, intent.replicas)
        await self.reconcile(cid, sources=intent.sources)

    def _remember(self, cid: CID, replicas: int) -> None:
        if self.intents.get(str(cid)) != replicas:
            self.intents[str(cid)] = replicas
            self._save()

    def forget(self, cid: CID | str) -> None:
        if self.intents.pop(str(as_cid(cid)), None) is not None:
            self._save()

    async def holders(self, cid: CID, alive: list[str] | None = None) -> list[str]:
        """Live peers that report the DAG pinned."""
        alive = alive if alive is not None else await self.alive_peers()

        async def pinned(url: str) -> bool:
            if url == self.url:
                return self.store.is_pinned(cid)
            try:
                return await StoragePeerClient(url, self._http()).is_pinned(cid)
            except (PeerUnavailable, httpx.HTTPError):
                return False
        flags = await asyncio.gather(*(pinned(u) for u in alive))
        return [u for u, f in zip(alive, flags) if f]

    async def reconcile(self, cid: CID, *, sources: Iterable[str] = (), alive: list[str] | None = None) -> str | None:
        """Make this peer's copy match its rank: fetch and pin if in the top k, drop if not needed.

        Returns "fetched", "dropped" or None when nothing changed.
        """
        replicas = self.intents.get(str(cid))
        if replicas is None:
            return None
        lock = self._locks.setdefault(str(cid), asyncio.Lock())
        async with lock:
            alive = alive if alive is not None else await self.alive_peers()
            ranked = rendezvous_rank(cid, alive)
            targets = ranked[:replicas]
            if self.url in targets:
                if self.store.is_pinned(cid) and not await asyncio.to_thread(self.store.missing, cid):
                    return None
                others = [s.rstrip("/") for s in sources if s.rstrip("/") != self.url]
                others += [p for p in ranked if p != self.url and p not in others]
                stats = FetchStats()
                stats.forged = self.forged
                await fetch_dag(self.store, cid, others, client=self._http(), stats=stats)
                await asyncio.to_thread(self.store.pin, cid)
                log.info("replica placed", extra={"cid": str(cid), "peer": self.url})
                return "fetched"
            if self.store.is_pinned(cid):
                holders = await self.holders(cid, targets)
                if len(holders) >= replicas:
                    self.store.unpin(cid)
                    log.info("extra replica dropped", extra={"cid": str(cid), "peer": self.url})
                    return "dropped"
            return None

    async def recheck(self) -> RecheckReport:
        """Re-hash this peer's blocks (healing bad ones) and reconcile every replicated pin."""
        report = RecheckReport()
        report.corrupt_blocks = [str(c) for c in await asyncio.to_thread(self.store.verify_all)]
        report.alive = await self.alive_peers()
        for cid_text in list(self.intents):
            try:
                outcome = await self.reconcile(as_cid(cid_text), alive=report.alive)
            except Exception as exc:  # one unreachable DAG must not stop the others' repair
                report.failed[cid_text] = repr(exc)
                log.warning("replica repair failed", extra={"cid": cid_text, "error": repr(exc)})
                continue
            if outcome == "fetched":
                report.fetched.append(cid_text)
            elif outcome == "dropped":
                report.dropped.append(cid_text)
        return report

    async def run(self) -> None:
        """Re-check forever, every `recheck_interval` seconds; cancelled by the owning lifespan."""
        try:
            while True:
                await asyncio.sleep(self.recheck_interval)
                try:
                    self.last_report = await self.recheck()
                except Exception as exc:  # keep re-checking; the next round may succeed
                    log.exception("re-check failed", extra={"error": repr(exc)})
        finally:
            await self.aclose()
