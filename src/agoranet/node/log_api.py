"""HTTP view of a node's transparency log: signed head, proofs and entries under /agora/v1/log.

Routes only translate HTTP to `TransparencyLog` calls; bad parameters get OpenAI-style error bodies.
Hashes and record bytes travel as lowercase hex.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from agoranet.core.errors import InvalidCID
from agoranet.log.errors import EntryNotFound, ProofRequestError
from agoranet.log.transparency import MAX_PAGE, TransparencyLog
from agoranet.wire.openai import error_body

__all__ = ["log_router", "PREFIX"]

PREFIX = "/agora/v1/log"


def _error(status: int, message: str, *, param: str | None, code: str) -> JSONResponse:
    return JSONResponse(error_body(message, param=param, code=code), status_code=status)


class _BadParam(Exception):
    def __init__(self, param: str, message: str) -> None:
        self.param = param
        self.message = message


def _int(value: str | None, param: str, *, default: int | None = None) -> int:
    if value is None or value == "":
        if default is None:
            raise _BadParam(param, f"query parameter {param!r} is required")
        return default
    try:
        number = int(value)
    except ValueError:
        raise _BadParam(param, f"{param} must be a whole number, got {value[:40]!r}") from None
    if number < 0:
        raise _BadParam(param, f"{param} must be at least 0, got {number}")
    return number


def _answer(build: Callable[[], dict[str, Any]]) -> JSONResponse:
    try:
        return JSONResponse(build())
    except _BadParam as exc:
        return _error(400, exc.message, param=exc.param, code="invalid_parameter")
    except InvalidCID as exc:
        return _error(400, str(exc), param="cid", code="invalid_cid")
    except EntryNotFound as exc:
        return _error(404, str(exc), param="cid", code="not_found")
    except ProofRequestError as exc:
        return _error(400, str(exc), param=exc.param, code="beyond_log_size")


def log_router(log: TransparencyLog) -> APIRouter:
    """The log's four read-only endpoints; mount with `app.include_router(log_router(log))`."""
    router = APIRouter(prefix=PREFIX, tags=["log"])

    @router.get("/head")
    def head(size: str | None = None) -> JSONResponse:
        """The log's signed tree head, now (or for an earlier `size`)."""
        return _answer(lambda: log.head(_int(size, "size", default=log.size)).to_json())

    @router.get("/proof/inclusion")
    def inclusion(cid: str | None = None, size: str | None = None) -> JSONResponse:
        def build() -> dict[str, Any]:
            if not cid:
                raise _BadParam("cid", "query parameter 'cid' is required")
            n = _int(size, "size", default=log.size)
            index, path = log.inclusion_proof(cid, n)
            return {"cid": cid, "index": index, "size": n, "proof": [h.hex() for h in path]}

        return _answer(build)

    @router.get("/proof/consistency")
    def consistency(first: str | None = None, second: str | None = None) -> JSONResponse:
        def build() -> dict[str, Any]:
            m, n = _int(first, "first"), _int(second, "second", default=log.size)
            if m > n:
                raise _BadParam("first", f"first ({m}) must not exceed second ({n})")
            return {"first": m, "second": n, "proof": [h.hex() for h in log.consistency_proof(m, n)]}

        return _answer(build)

    @router.get("/entries")
    def entries(start: str | None = None, end: str | None = None) -> JSONResponse:
        """Entries start ≤ index < end; at most MAX_PAGE per call, so page on from the last index + 1."""
        def build() -> dict[str, Any]:
            first = _int(start, "start")
            last = _int(end, "end", default=first + MAX_PAGE)
            if last < first:
                raise _BadParam("end", f"end ({last}) must not be before start ({first})")
            size = log.size
            if first > size:
                raise _BadParam("start", f"start ({first}) is beyond the log's {size} entries")
            page = log.entries(first, min(last, size))
            return {
                "start": first, "end": first + len(page), "size": size,
                "entries": [{"index": e.index, "cid": str(e.cid), "record": e.record.hex()} for e in page],
            }

        return _answer(build)

    return router
