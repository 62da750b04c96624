"""Peers a dashboard shows: rows built from nodes' status documents, and a watcher that polls known URLs.

`PeerWatch` stands in for gossip discovery: given peer URLs (`--watch`), it asks each one for its
status (`?peers=false`, so nobody relays anybody else's view) every few seconds. A discovery or
gateway role that knows peers contributes the same rows through its own `status()`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
from fastapi import APIRouter

from agoranet.core.tasks import cancel_and_wait
from agoranet.net.agora_client import AgoraClient, NodeError

__all__ = ["PeerWatch", "peer_row"]

log = logging.getLogger(__name__)


def peer_row(url: str, status: dict[str, Any], *, rtt_ms: float | None, error: str | None = None,
             last_seen_ms: int | None = None) -> dict[str, Any]:
    """One row of the peers table, from a node's status document (as another node or this one sees it)."""
    node, traffic = status.get("node", {}), status.get("traffic", {})
    models = [{"cid": m.get("cid"), "name": m.get("name")}
              for o in status.get("offers", []) for m in (o.get("models") or o.get("record", {}).get("body", {})
                                                           .get("models", []))]
    return {
        "url": node.get("url") or url, "peer_id": node.get("peer_id"), "roles": node.get("roles", []),
        "health": "unreachable" if error else status.get("health", {}).get("status", "ok"),
        "rtt_ms": rtt_ms, "error": error, "last_seen_ms": last_seen_ms or int(time.time() * 1000),
        "models": models, "log_size": status.get("log", {}).get("size"),
        "traffic": {k: traffic.get(k) for k in ("requests_per_s", "tokens_per_s", "p50_ms", "p99_ms", "in_flight")},
        "offers": status.get("offers", []),
    }


class PeerWatch:
    """Polls each known peer's status every `interval` seconds; `status()` gives their rows."""

    role_name = "watch"

    def __init__(self, urls: list[str], *, interval: float = 2.0, timeout: float = 2.0) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.interval, self.timeout = interval, timeout
        self.rows: dict[str, dict[str, Any]] = {}
        self.router = APIRouter()  # nothing to serve: the dashboard shows what this role saw
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="agora-peer-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def status(self) -> dict[str, Any]:
        return {"peers": [self.rows[u] for u in self.urls if u in self.rows]}

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout, limits=httpx.Limits(max_connections=32)) as client:
            while True:
                await self.poll(client)
                await asyncio.sleep(self.interval)

    async def poll(self, client: httpx.AsyncClient) -> None:
        """Ask every peer once, concurrently; an unreachable peer keeps its last row, marked unreachable."""
        await asyncio.gather(*(self._poll_one(client, url) for url in self.urls))

    async def _poll_one(self, client: httpx.AsyncClient, url: str) -> None:
        started = time.perf_counter()
        try:
            status = await AgoraClient(url, client, timeout=self.timeout).status(peers=False)
        except NodeError as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
            last = self.rows.get(url) or peer_row(url, {}, rtt_ms=None) | {"last_seen_ms": None}
            self.rows[url] = last | {"health": "unreachable", "error": error, "rtt_ms": None}
            return
        rtt = round((time.perf_counter() - started) * 1000, 1)
        self.rows[url] = peer_row(url, status, rtt_ms=rtt)
