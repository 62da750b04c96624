"""The storage peer's HTTP API under `/agora/v1/blocks`: routes translate HTTP to store and replicator calls.

Reads are open to anyone. Writes — a block upload, a pin, an unpin, a replica announcement — need the
node's operator token (`Authorization: Bearer`, from `$AGORA_HOME/operator.token`) or the signature
of one of this peer's replication peers (`x-agora-signed`, by the peer id its URL reports). Each
replication peer has a quota of bytes uploaded and announcements per second; the operator has none.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, HTTPException, Request, Response

from agoranet.core.errors import AgoraError, InvalidCID, RequestError
from agoranet.net.gossip import RateLimiter
from agoranet.net.signed_request import HEADER as SIGNED, request_signer
from agoranet.net.storage_client import fetch_dag
from agoranet.wire.storage import (
    BLOCK_MEDIA_TYPE, BLOCKS, HasRequest, HasResponse, PinRequest, PinResponse, PinStatus, ReplicaIntent, StoreStatus,
)
from agoranet.node.operator import OPERATOR_TOKEN_FILE, is_operator
from agoranet.node.replication import StorageReplicator
from agoranet.store import BlockMismatch, BlockNotFound, Blockstore, CorruptBlock, KuboError, PinError
from agoranet.store.blockstore import as_cid
from agoranet.wire.openai import error_body

__all__ = ["StorageAccess", "storage_router", "storage_app"]

MAX_BLOCK = 4 << 20  # kubo refuses blocks over 4 MiB for the same reason: bound memory per request


def _error(status: int, message: str, code: str) -> HTTPException:
    return HTTPException(status, detail=error_body(message, code=code,
                                                   type="invalid_request_error" if status < 500 else "server_error"))


def _cid(text: str):
    try:
        return as_cid(text)
    except InvalidCID as exc:
        raise _error(400, str(exc), "invalid_cid") from exc


@dataclass(frozen=True)
class StorageAccess:
    """Who may write here (the operator's token; replication peers by signature) and each peer's quota."""

    operator_token: str | None = None  # None: only replication peers write
    peer_bytes_per_s: float = float(16 << 20)  # block bytes a replication peer may upload, refilled per second
    peer_burst_bytes: int = 256 << 20
    peer_announces_per_s: float = 2.0  # replica announcements (each may make this peer fetch a DAG)
    peer_announce_burst: int = 100


def storage_router(store: Blockstore, replicator: StorageReplicator | None = None,
                   access: StorageAccess | None = None) -> APIRouter:
    """Routes for has/get/put of blocks, local and replicated pins, and replica announcements."""
    router = APIRouter(prefix=BLOCKS, tags=["storage"])
    access = access or StorageAccess()
    uploads = RateLimiter(access.peer_bytes_per_s, access.peer_burst_bytes)
    announces = RateLimiter(access.peer_announces_per_s, access.peer_announce_burst)

    async def writer(request: Request, body: bytes) -> str | None:
        """The replication peer making this write, None for the operator; 401/403 for anyone else."""
        if is_operator(request.headers.get("authorization"), access.operator_token):
            return None
        try:
            signer = request_signer(request.headers.get(SIGNED), request.method, request.url.path, body)
        except RequestError as exc:
            raise _error(401, str(exc), "invalid_signature") from None
        if signer is None:
            raise _error(401, f"writing to this storage peer needs its operator token (Authorization: Bearer "
                              f"<$AGORA_HOME/{OPERATOR_TOKEN_FILE}>) or a replication peer's signature", "unauthorized")
        if replicator is None or not await replicator.is_peer(signer):
            raise _error(403, f"{signer} is not one of this storage peer's replication peers", "not_a_peer")
        return signer

    def charge(limiter: RateLimiter, peer: str | None, cost: float, what: str) -> None:
        if peer is not None and not limiter.allow(peer, cost):
            raise _error(429, f"replication peer {peer} is over its quota of {what}; retry later", "quota_exceeded")

    @router.get("", response_model=StoreStatus)
    def status() -> StoreStatus:
        return StoreStatus(url=replicator.url if replicator else None,
                           peer=str(replicator.identity.peer_id) if replicator and replicator.identity else None,
                           blocks=len(store.cids()),
                           pins=[str(c) for c in store.pins()],
                           replicated=dict(replicator.intents) if replicator else {})

    @router.post("/has", response_model=HasResponse)
    def has_many(body: HasRequest) -> HasResponse:
        return HasResponse(has=[store.has(_cid(c)) for c in body.cids])

    @router.head("/{cid}")
    def has(cid: str) -> Response:
        return Response(status_code=200 if store.has(_cid(cid)) else 404)

    @router.get("/{cid}")
    def get(cid: str) -> Response:
        # Sync route: runs in the thread pool, where a corrupt copy may be healed from peers.
        try:
            data = store.get(_cid(cid))
        except (BlockNotFound, CorruptBlock) as exc:
            raise _error(404, str(exc), "block_not_found") from exc
        except KuboError as exc:
            raise _error(502, str(exc), "kubo_failed") from exc
        return Response(content=data, media_type=BLOCK_MEDIA_TYPE)

    @router.put("/{cid}", status_code=201)
    async def put(cid: str, request: Request) -> Response:
        parsed = _cid(cid)
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > MAX_BLOCK:
                raise _error(413, f"blocks are limited to {MAX_BLOCK} bytes", "block_too_large")
        charge(uploads, await writer(request, bytes(data)), len(data), "uploaded bytes")
        try:
            await asyncio.to_thread(store.put_block, parsed, bytes(data))
        except BlockMismatch as exc:
            raise _error(400, str(exc), "block_mismatch") from exc
        except KuboError as exc:  # the block is not kept here either: see Blockstore
            raise _error(502, str(exc), "kubo_failed") from exc
        return Response(status_code=201)

    @router.get("/{cid}/pin", response_model=PinStatus)
    def pin_status(cid: str) -> PinStatus:
        return PinStatus(cid=str(_cid(cid)), pinned=store.is_pinned(_cid(cid)))

    @router.post("/{cid}/pin", response_model=PinResponse)
    async def pin(cid: str, body: PinRequest, request: Request) -> PinResponse:
        parsed = _cid(cid)
        charge(announces, await writer(request, await request.body()), 1, "pins and announcements")
        if body.replicas is not None:
            if replicator is None:
                raise _error(400, "this peer does not replicate; pin without replicas", "no_replication")
            holders = await replicator.pin(parsed, body.replicas, body.sources)
            return PinResponse(cid=str(parsed), holders=holders)
        try:
            if body.sources and await asyncio.to_thread(store.missing, parsed):
                await fetch_dag(store, parsed, body.sources)
            await asyncio.to_thread(store.pin, parsed)
        except PinError as exc:
            raise _error(409, str(exc), "dag_incomplete") from exc
        except AgoraError as exc:
            raise _error(502, str(exc), "fetch_failed") from exc
        return PinResponse(cid=str(parsed), holders=[replicator.url] if replicator else [])

    @router.delete("/{cid}/pin", response_model=PinStatus)
    async def unpin(cid: str, request: Request) -> PinStatus:
        parsed = _cid(cid)
        charge(announces, await writer(request, b""), 1, "pins and announcements")
        store.unpin(parsed)
        if replicator is not None:
            replicator.forget(parsed)
        return PinStatus(cid=str(parsed), pinned=False)

    @router.post("/{cid}/replicas", status_code=204)
    async def replicas(cid: str, body: ReplicaIntent, request: Request) -> Response:
        if replicator is None:
            raise _error(400, "this peer does not replicate", "no_replication")
        charge(announces, await writer(request, await request.body()), 1, "pins and announcements")
        try:
            await replicator.accept(_cid(cid), body)
        except AgoraError as exc:
            raise _error(502, str(exc), "replication_failed") from exc
        return Response(status_code=204)

    return router


def storage_app(store: Blockstore, replicator: StorageReplicator | None = None,
                access: StorageAccess | None = None) -> FastAPI:
    """A standalone storage peer: the router, plus the replicator's re-check loop in the lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if replicator is None:
            yield
            return
        async with asyncio.TaskGroup() as group:
            loop = group.create_task(replicator.run())
            try:
                yield
            finally:
                loop.cancel()

    app = FastAPI(title="Agora storage peer", lifespan=lifespan)
    app.include_router(storage_router(store, replicator, access))
    return app
