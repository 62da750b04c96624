"""The storage peers' HTTP wire format: paths and JSON bodies of `/agora/v1/blocks/...`.

Block bytes travel as `application/vnd.ipld.raw` bodies and are verified against their CID by
whoever receives them; everything else is one of the JSON models below. Writes (block upload, pin,
unpin, replica announcements) carry the operator token (`Authorization: Bearer …`) or a replication
peer's `x-agora-signed` signature (`agoranet.net.signed_request`).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["BLOCKS", "BLOCK_MEDIA_TYPE", "HasRequest", "HasResponse", "PinRequest", "PinResponse",
           "PinStatus", "ReplicaIntent", "StoreStatus"]

BLOCKS = "/agora/v1/blocks"
BLOCK_MEDIA_TYPE = "application/vnd.ipld.raw"


class HasRequest(BaseModel):
    cids: list[str] = Field(max_length=10_000)


class HasResponse(BaseModel):
    has: list[bool]


class PinRequest(BaseModel):
    """Pin a DAG here (replicas None), or place `replicas` copies across the peers."""

    replicas: int | None = Field(default=None, ge=1, le=64)
    sources: list[str] = Field(default_factory=list, description="peer URLs to fetch missing blocks from")


class PinResponse(BaseModel):
    cid: str
    holders: list[str]


class PinStatus(BaseModel):
    cid: str
    pinned: bool


class ReplicaIntent(BaseModel):
    """A peer's announcement that `cid` must be kept on `replicas` peers; `sources` hold it now."""

    replicas: int = Field(ge=1, le=64)
    sources: list[str] = Field(default_factory=list)


class StoreStatus(BaseModel):
    url: str | None
    peer: str | None = None  # the peer id that signs this peer's replication requests
    blocks: int
    pins: list[str]
    replicated: dict[str, int]
