"""One FastAPI app per node: the roles' routers under one lifespan, OpenAI-style errors, size limits."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import pydantic_core
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agoranet.core.errors import AgoraError, EngineError, RequestError
from agoranet.wire.openai import error_body
from agoranet.node.state import CURSOR_MAX, FEED_PAGE

# Query parameters of the record feeds (receipts, verdicts, fraud proofs): bounded, so a wild
# value is a 400, not an SQLite overflow.
Cursor = Annotated[int, Query(ge=0, le=CURSOR_MAX, description="`next` of the previous page")]
PageSize = Annotated[int, Query(ge=1, le=FEED_PAGE)]

log = logging.getLogger(__name__)


class FastJSONResponse(JSONResponse):
    """A JSON answer rendered by pydantic-core (Rust; ~4× json.dumps): the hot routes' response.
    NaN and infinities, which JSON lacks, become null."""

    def render(self, content: Any) -> bytes:
        return pydantic_core.to_json(content, inf_nan_mode="null")


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Reject request bodies over their path's limit with 413 before they are read into memory.

    `limit` holds wherever `by_prefix` names no larger or smaller one (the longest matching prefix
    wins), so a node whose storage role takes 4 MiB blocks still refuses a 4 MiB chat request.
    """

    def __init__(self, app: ASGIApp, limit: int, by_prefix: dict[str, int] | None = None) -> None:
        self.app, self.limit = app, limit
        self.by_prefix = sorted((by_prefix or {}).items(), key=lambda item: -len(item[0]))

    def limit_for(self, path: str) -> int:
        return next((n for prefix, n in self.by_prefix if path.startswith(prefix)), self.limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._reject(send, limit)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await self._reject(send, limit)

    async def _reject(self, send: Send, limit: int) -> None:
        body = error_body(f"request body is larger than this node's limit of {limit} bytes for this path",
                          code="request_too_large")
        response = JSONResponse(body, status_code=413)
        await response(scope={"type": "http"}, receive=None, send=send)  # type: ignore[arg-type]


Role = Any  # a role has .router (APIRouter) and async start()/stop(); optionally status(), metrics(), hot_routes
# ({path: HotEndpoint}), and body_limits ({path prefix: bytes} for routes that take bodies larger than the default)
HotHandler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class HotEndpoint:
    """A POST route served by HotRoutes: its handler, and the JSON body it takes (for the OpenAPI docs)."""

    handler: HotHandler
    body: type[BaseModel]
    summary: str


def _documented(path: str, hot: HotEndpoint) -> APIRoute:
    """The route that puts a hot path in the OpenAPI schema and docs; HotRoutes answers before routing
    ever reaches it."""
    async def endpoint(**_: Any) -> Response:
        raise RuntimeError(f"{path} is served by HotRoutes")
    endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("body", inspect.Parameter.KEYWORD_ONLY, annotation=hot.body)])
    return APIRoute(path, endpoint, methods=["POST"], summary=hot.summary, name=hot.summary)


@dataclass(frozen=True)
class HotRoute:
    """The route a hot path was served by, in the scope where FastAPI puts its matched route."""

    path: str


class HotRoutes:
    """Serves a node's hottest POST routes straight from ASGI, past FastAPI's routing and per-request
    dependency machinery (~0.13 ms of a gateway's ~0.6 ms CPU per request). `create_app` declares each
    path once more from its `HotEndpoint`, only so that the OpenAPI schema and docs describe it; errors
    get the same answers through `error_response`."""

    def __init__(self, app: ASGIApp, routes: dict[str, HotHandler]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or (handler := self.routes.get(scope["path"])) is None:
            return await self.app(scope, receive, send)
        scope["route"] = HotRoute(scope["path"])  # what FastAPI's routing would set: metrics label by it
        try:
            response = await handler(Request(scope, receive))
        except BodyTooLarge:
            raise  # BodyLimit, outside, answers 413
        except Exception as exc:
            response = error_response(exc)
        await response(scope, receive, send)


def create_app(roles: list[Role], *, max_request_bytes: int, title: str = "Agora node",
               routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The node's app: every role's routes (and `routers`, routes of no one role), started in list order."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for role in app.state.roles:
                try:
                    await role.start()
                except AgoraError as exc:  # e.g. an upstream that does not answer: serve_forever says why
                    app.state.startup_error = exc
                    raise
                stack.push_async_callback(role.stop)
            yield

    app = FastAPI(title=title, lifespan=lifespan, docs_url="/docs", redoc_url=None)
    # The roles this node runs, in start order: a layer above (the dashboard) may add one before startup.
    app.state.roles = list(roles)
    for router in [*(role.router for role in roles), *routers]:
        app.include_router(router)
    _install_error_handlers(app)
    hot: dict[str, HotEndpoint] = {path: h for role in roles for path, h in getattr(role, "hot_routes", {}).items()}
    app.router.routes += [_documented(path, h) for path, h in hot.items()]
    if hot:
        app.add_middleware(HotRoutes, routes={path: h.handler for path, h in hot.items()})
    limits = {prefix: n for role in roles for prefix, n in getattr(role, "body_limits", {}).items()}
    app.add_middleware(BodyLimit, limit=max_request_bytes, by_prefix=limits)  # added last: outside HotRoutes
    return app


def error_response(exc: Exception) -> JSONResponse:
    """The OpenAI-style answer for an exception a request raised; the one mapping every route uses."""
    if isinstance(exc, (RequestValidationError, ValidationError)):
        errors = exc.errors()
        err = errors[0] if errors else {"msg": "invalid request", "loc": ()}
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body("the request body is not valid JSON", code="invalid_json"), 400)
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {err['msg']}" if param else str(err["msg"])
        return JSONResponse(error_body(message, param=param, code="invalid_value"), 400)
    if isinstance(exc, RequestError):
        headers = {"retry-after": "1"} if exc.status == 429 else None
        return JSONResponse(error_body(str(exc), type=exc.type, param=exc.param, code=exc.code), exc.status, headers)
    if isinstance(exc, EngineError):
        return JSONResponse(error_body(str(exc), type="server_error", code="engine_error"), 502)
    if isinstance(exc, AgoraError):
        return JSONResponse(error_body(str(exc), type="agora_error", code=type(exc).__name__), 400)
    if isinstance(exc, StarletteHTTPException):
        if isinstance(exc.detail, dict) and "error" in exc.detail:  # already an OpenAI-style body (storage routes)
            return JSONResponse(exc.detail, exc.status_code)
        return JSONResponse(error_body(str(exc.detail), type="invalid_request_error", code=str(exc.status_code)),
                            exc.status_code)
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(error_body("internal error; the node logged the details", type="server_error"), 500)


def _install_error_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    for kind in (RequestValidationError, RequestError, EngineError, AgoraError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, handle)
