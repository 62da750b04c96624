"""Network role: serves the gossip exchange and membership view for this node's discovery.

Pushes are rate-limited per client address (429 with Retry-After, counted); the body size limit is
the node's (413), and a body that is not `{"records": [...]}` gets 400 before discovery sees it.
A push signed by a proven peer (`x-agora-signed`) is charged to that peer, any other to its client
address: each source has its own CPU budget of signature checks and its own share of the table.
The answer names this node's peer id, which is how a pusher proves the URL it reached is this node.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from agoranet.core.errors import RequestError
from agoranet.net.gossip import GossipDiscovery, RateLimiter
from agoranet.net.signed_request import HEADER as SIGNED, request_signer


class GossipPush(BaseModel):
    records: list[Any] = Field(max_length=4096)


class NetworkRole:
    """Owns the node's discovery: starts its gossip rounds with the node and stops them with it."""

    def __init__(self, discovery: GossipDiscovery) -> None:
        self.discovery = discovery
        config = discovery.config
        self.push_limit = RateLimiter(config.pushes_per_s, config.push_burst)
        self.pushes_rate_limited = 0
        self.router = self._routes()

    async def start(self) -> None:
        await self.discovery.start()

    async def stop(self) -> None:
        await self.discovery.stop()

    def metrics(self) -> dict[str, float]:
        return self.discovery.metrics() | {"gossip_pushes_rate_limited_total": self.pushes_rate_limited}

    def _routes(self) -> APIRouter:
        r = APIRouter()

        @r.post("/agora/v1/gossip")
        async def gossip(push: GossipPush, request: Request) -> dict[str, Any]:
            sender = request.client.host if request.client else "unknown"
            if not self.push_limit.allow(sender):
                self.pushes_rate_limited += 1
                raise RequestError(f"too many gossip pushes from {sender}; slow down", status=429,
                                   code="rate_limited")
            try:
                signer = request_signer(request.headers.get(SIGNED), "POST", request.url.path, await request.body())
            except RequestError:
                signer = None  # a bad or stale signature only loses the pusher its own budget
            source = self.discovery.source_of(signer, sender)
            return {"records": await self.discovery.exchange_off_loop(push.records, source),
                    "peer": str(self.discovery.identity.peer_id)}

        @r.get("/agora/v1/peers")
        async def peers() -> dict[str, Any]:
            return self.discovery.stats()

        return r
