"""Network role: serves the gossip exchange and membership view for this node's discovery."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from agoranet.net.gossip import GossipDiscovery


class GossipPush(BaseModel):
    records: list[Any] = Field(max_length=4096)


class NetworkRole:
    """Owns the node's discovery: starts its gossip rounds with the node and stops them with it."""

    def __init__(self, discovery: GossipDiscovery) -> None:
        self.discovery = discovery
        self.router = self._routes()

    async def start(self) -> None:
        await self.discovery.start()

    async def stop(self) -> None:
        await self.discovery.stop()

    def _routes(self) -> APIRouter:
        r = APIRouter()

        @r.post("/agora/v1/gossip")
        async def gossip(push: GossipPush) -> dict[str, Any]:
            return {"records": self.discovery.exchange(push.records)}

        @r.get("/agora/v1/peers")
        async def peers() -> dict[str, Any]:
            return self.discovery.stats()

        return r
