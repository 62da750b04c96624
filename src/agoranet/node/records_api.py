"""`GET /agora/v1/records/{cid}`: any record or canonical request a node stored, as JSON or DAG-CBOR bytes.

Providers serve the receipts they signed and the requests those bind; verifiers the receipts they
audited, their verdicts and fraud proofs. A node running both keeps them in one `NodeState`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from agoranet.core.errors import RequestError
from agoranet.core.records import decode_canonical, decode_record
from agoranet.node.state import NodeState
from agoranet.wire.agora import CBOR

__all__ = ["CBOR", "records_router"]


def records_router(state: NodeState) -> APIRouter:
    r = APIRouter()

    @r.get("/agora/v1/records/{cid}")
    async def record(cid: str, request: Request) -> Response:
        found = state.get(cid)
        if found is None:
            raise RequestError(f"no record {cid[:80]!r} on this node", status=404, code="not_found", param="cid")
        kind, data = found
        if CBOR in request.headers.get("accept", ""):
            return Response(data, media_type=CBOR)
        if kind == "request":
            return JSONResponse({"cid": cid, "kind": kind, "request": _jsonable(decode_canonical(data))})
        return JSONResponse({"cid": cid, "kind": kind, "record": decode_record(data).to_json()})

    return r


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
