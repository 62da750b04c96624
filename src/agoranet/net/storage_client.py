"""HTTP clients of storage peers: single blocks, pins, and a parallel verified fetch of whole DAGs."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic_core import to_json

from agoranet.core.cid import CID, DAG_PB
from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity
from agoranet.net.signed_request import HEADER as SIGNED, sign_request
from agoranet.wire.storage import (
    BLOCK_MEDIA_TYPE, BLOCKS, HasRequest, HasResponse, PinRequest, PinResponse, PinStatus, ReplicaIntent, StoreStatus,
)
from agoranet.store import BlockMismatch, BlockNotFound, Blockstore, CorruptBlock, verify_block
from agoranet.store.blockstore import as_cid
from agoranet.store.dagpb import decode_node

Progress = Callable[[int, int | None], None]  # (bytes done, total bytes once known)

__all__ = ["Progress", "StoragePeerClient", "PeerBlockFetcher", "PeerUnavailable", "FetchFailed", "FetchStats", "fetch_dag"]

log = logging.getLogger(__name__)


class PeerUnavailable(AgoraError):
    hint = "check the peer's URL and that it is running; other peers may still have the data"


class FetchFailed(AgoraError):
    hint = "no listed peer has this block; add peers that pinned the DAG with --peer URL"


class PeersUnavailable(FetchFailed):
    """No peer said it lacks the block: every one was unreachable, failed (5xx) or sent forged bytes. Unlike a
    plain FetchFailed (some peer answered 404), this says nothing about whether the block exists."""

    hint = "check that the storage peers run and are reachable, then retry"


def _base(url: str) -> str:
    return url.rstrip("/")


class StoragePeerClient:
    """One storage peer's `/agora/v1/blocks` API, over a shared httpx.AsyncClient."""

    def __init__(self, url: str, client: httpx.AsyncClient, *, signer: Identity | None = None) -> None:
        self.url = _base(url)
        self._client = client
        self.signer = signer  # signs every request: a peer accepts writes only from its replication peers

    async def _request(self, method: str, path: str, *, json: Any = None, **kwargs) -> httpx.Response:
        url = f"{self.url}{BLOCKS}{path}"
        if json is not None:
            kwargs["content"] = to_json(json)
            kwargs["headers"] = {"content-type": "application/json"}
        if self.signer is not None:
            body = kwargs.get("content", b"")
            kwargs["headers"] = kwargs.get("headers", {}) | {
                SIGNED: sign_request(self.signer, method, httpx.URL(url).path, body if isinstance(body, bytes) else b"")}
        try:
            return await self._client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise PeerUnavailable(f"storage peer {self.url} did not answer: {exc!r}") from exc

    async def status(self, timeout: float | None = None) -> StoreStatus:
        r = await self._request("GET", "", timeout=timeout)
        r.raise_for_status()
        return StoreStatus.model_validate_json(r.content)

    async def has(self, cid: CID | str) -> bool:
        r = await self._request("HEAD", f"/{cid}")
        return r.status_code == 200

    async def has_many(self, cids: Iterable[CID | str]) -> list[bool]:
        r = await self._request("POST", "/has", json=HasRequest(cids=[str(c) for c in cids]).model_dump())
        r.raise_for_status()
        return HasResponse.model_validate_json(r.content).has

    async def get(self, cid: CID | str) -> bytes:
        """The block's bytes, checked against `cid`; BlockNotFound if the peer lacks it."""
        cid = as_cid(cid)
        r = await self._request("GET", f"/{cid}")
        if r.status_code == 404:
            raise BlockNotFound(f"peer {self.url} does not have block {cid}")
        r.raise_for_status()
        verify_block(cid, r.content)
        return r.content

    async def put(self, cid: CID | str, data: bytes) -> None:
        r = await self._request("PUT", f"/{cid}", content=data, headers={"content-type": BLOCK_MEDIA_TYPE})
        r.raise_for_status()

    async def pin(self, cid: CID | str, *, replicas: int | None = None, sources: Iterable[str] = (),
                  timeout: float | None = 600.0) -> PinResponse:
        body = PinRequest(replicas=replicas, sources=list(sources)).model_dump()
        r = await self._request("POST", f"/{cid}/pin", json=body, timeout=timeout)
        if r.status_code >= 400:
            raise AgoraError(f"peer {self.url} could not pin {cid}: {r.text}")
        return PinResponse.model_validate_json(r.content)

    async def is_pinned(self, cid: CID | str) -> bool:
        r = await self._request("GET", f"/{cid}/pin")
        r.raise_for_status()
        return PinStatus.model_validate_json(r.content).pinned

    async def unpin(self, cid: CID | str) -> None:
        r = await self._request("DELETE", f"/{cid}/pin")
        r.raise_for_status()

    async def announce(self, cid: CID | str, intent: ReplicaIntent, *, timeout: float | None = 600.0) -> None:
        """Tell the peer `cid` must have `intent.replicas` copies; returns once it has acted on it."""
        r = await self._request("POST", f"/{cid}/replicas", json=intent.model_dump(), timeout=timeout)
        r.raise_for_status()


class PeerBlockFetcher:
    """A Blockstore fetcher: asks peers in turn for a block and returns the first verified copy."""

    def __init__(self, peers: Callable[[CID], list[str]], *, timeout: float = 10.0,
                 forged: Counter[str] | None = None) -> None:
        self.peers = peers
        self.timeout = timeout
        self.forged: Counter[str] = forged if forged is not None else Counter()  # wrong blocks, by peer URL

    def __call__(self, cid: CID) -> bytes:
        with httpx.Client(timeout=self.timeout) as client:
            for url in self.peers(cid):
                try:
                    r = client.get(f"{_base(url)}{BLOCKS}/{cid}")
                    if r.status_code == 200:
                        verify_block(cid, r.content)
                        return r.content
                except (httpx.HTTPError, BlockMismatch) as exc:
                    if isinstance(exc, BlockMismatch):
                        self.forged[url] += 1
                    log.info("peer could not supply block", extra={"peer": url, "cid": str(cid), "error": repr(exc)})
        raise FetchFailed(f"no peer could supply block {cid}")


@dataclass
class FetchStats:
    blocks: int = 0
    fetched_bytes: int = 0
    local_blocks: int = 0
    by_peer: Counter[str] = field(default_factory=Counter)
    forged: Counter[str] = field(default_factory=Counter)  # blocks refused for not hashing to their CID, by peer


async def fetch_dag(
    store: Blockstore, root: CID | str, peers: list[str], *, streams_per_peer: int = 4,
    progress: Progress | None = None, client: httpx.AsyncClient | None = None,
    stats: FetchStats | None = None,
) -> FetchStats:
    """Bring every block of the DAG under `root` into `store`, pulling from all `peers` at once.

    Each worker prefers its own peer, so load spreads evenly; a peer that lacks a block or fails is
    skipped for that block and the next peer is asked. Every block is verified before it is stored.
    `progress(done_bytes, total_bytes)` is called after each block (total known once the root is in).
    Pass `stats` to keep its counts (forged blocks by peer) even when the fetch fails.
    """
    root = as_cid(root)
    urls = [_base(u) for u in peers]
    own_client = client is None
    client = client or httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0),
                                         limits=httpx.Limits(max_connections=streams_per_peer * max(1, len(urls)) + 4))
    stats = stats if stats is not None else FetchStats()
    queue: asyncio.Queue[CID] = asyncio.Queue()
    seen = {str(root)}
    queue.put_nowait(root)
    dead: set[str] = set()
    total: int | None = None
    done_bytes = 0

    async def obtain(cid: CID, preferred: int) -> bytes:
        if store.has(cid) or store.kubo is not None:  # a kubo beside the store answers from its repo at once
            try:
                data = await asyncio.to_thread(store.get, cid)
                stats.local_blocks += 1
                return data
            except (BlockNotFound, CorruptBlock):
                pass
        order = urls[preferred:] + urls[:preferred]
        lacked = False  # some peer answered that it does not hold the block
        for url in order:
            if url in dead:
                continue
            try:
                r = await client.get(f"{url}{BLOCKS}/{cid}")
            except httpx.TransportError:
                dead.add(url)
                continue
            if r.status_code != 200:
                lacked = lacked or r.status_code == 404
                continue
            try:
                await asyncio.to_thread(store.put_block, cid, r.content)
            except BlockMismatch:
                stats.forged[url] += 1
                log.warning("peer sent a forged block", extra={"peer": url, "cid": str(cid)})
                continue
            stats.by_peer[url] += 1
            stats.fetched_bytes += len(r.content)
            return r.content
        if not lacked:
            raise PeersUnavailable(f"none of {len(urls)} peer(s) could supply block {cid}: "
                                   f"{len(dead & set(urls))} unreachable, none answered that it lacks it")
        raise FetchFailed(f"none of {len(urls)} peer(s) could supply block {cid}")

    async def worker(index: int) -> None:
        nonlocal total, done_bytes
        while True:
            cid = await queue.get()
            try:
                data = await obtain(cid, index % len(urls) if urls else 0)
                links = store.links(cid, data)
                if cid == root:
                    total = len(data) + sum(link.tsize for link in decode_node(data).links) \
                        if cid.codec.name == DAG_PB else len(data) if not links else None
                for link in links:
                    if str(link) not in seen:
                        seen.add(str(link))
                        queue.put_nowait(link)
                stats.blocks += 1
                done_bytes += len(data)
                if progress is not None:
                    progress(done_bytes, total)
            finally:
                queue.task_done()

    try:
        async with asyncio.TaskGroup() as group:
            workers = [group.create_task(worker(i)) for i in range(max(1, streams_per_peer * len(urls)))]
            await queue.join()
            for task in workers:
                task.cancel()
    except* AgoraError as failures:  # FetchFailed, or the store's kubo failing a put
        raise failures.exceptions[0] from None
    finally:
        if own_client:
            await client.aclose()
    return stats
