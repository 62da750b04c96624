"""The dashboard every node serves at `/`, its JSON status at `/agora/v1/status`, and `/metrics`.

Roles contribute what they know. Each role may have:

- `status() -> dict` (sync or async): sections merged into the status document. Lists are
  concatenated and maps merged, so several roles may add to `offers`, `peers` or `health`.
  Known sections: `offers` (`[{cid, record}]`, signed offer records), `peers` (rows, see `peer_row`),
  `health` (`{check: "ok" | problem}`), `log`, `storage`, `verification`, `credits`; the page renders
  any other section as a plain table, and leaves out what is absent.
- `metrics() -> dict[str, float]` and `collect_metrics()`: see `observe.py`.

The page itself is static (HTML + one vanilla JS module shipped in the package, no CDN): it polls
the status, pages through the log, checks inclusion proofs with WebCrypto, and streams chats.
"""

from __future__ import annotations

import inspect
import json
import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agoranet import __version__
from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, decode_record, verify_record
from agoranet.log.transparency import TransparencyLog
from agoranet.wire.openai import error_body
from agoranet.web.observe import NodeMetrics, role_name
from agoranet.web.peers import PeerWatch, peer_row

__all__ = ["Dashboard", "mount_dashboard", "STATUS_PATH", "LOG_PAGE_PATH"]

STATUS_PATH = "/agora/v1/status"
LOG_PAGE_PATH = "/agora/v1/status/log"
MAX_LOG_PAGE = 100
STATIC = resources.files("agoranet.web") / "static"


def mount_dashboard(app: FastAPI, *, identity: Identity | None = None, url: str | None = None,
                    watch: list[str] = (), watch_interval: float = 2.0) -> Dashboard:
    """Serve the dashboard, status and metrics on a node app made by `create_app`, before it starts.

    `watch` lists peer URLs whose status this node polls and shows (until gossip discovery does it).
    """
    roles: list[Any] = app.state.roles
    if watch:
        roles.append(PeerWatch(list(watch), interval=watch_interval))
    dashboard = Dashboard(roles, identity=identity or _identity_of(roles), url=url)
    roles.append(dashboard)  # started and stopped by the app's lifespan, like every role
    app.include_router(dashboard.router)
    app.mount("/dashboard", StaticFiles(directory=str(STATIC)), name="dashboard-static")
    app.add_middleware(dashboard.metrics.middleware)
    # Read-only GETs (log proofs, records, status) from any origin: a dashboard opened on a gateway
    # checks a receipt against the log of the provider that signed it, on another node.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET"])
    return dashboard


def _identity_of(roles: list[Any]) -> Identity | None:
    for role in roles:
        if isinstance(getattr(role, "identity", None), Identity):
            return role.identity
    return None


class Dashboard:
    """The dashboard as a role: `/`, the status document, a readable page of the log, and `/metrics`."""

    def __init__(self, roles: list[Any], *, identity: Identity | None, url: str | None) -> None:
        self.roles = roles  # the node's live role list (this dashboard is in it too)
        self.peer_id = str(identity.peer_id) if identity else None
        self.url = url
        self.started = time.time()
        self.metrics = NodeMetrics(roles, {"peer_id": self.peer_id or "", "version": __version__})
        self._offer_views: dict[str, dict[str, Any]] = {}
        self.router = self._routes()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    @property
    def log(self) -> TransparencyLog | None:
        for role in self.roles:
            if isinstance(getattr(role, "log", None), TransparencyLog):
                return role.log
        return None

    # -- the status document ----------------------------------------------------------------------

    async def status(self, *, with_peers: bool = True) -> dict[str, Any]:
        sections: dict[str, Any] = {}
        for role in self.roles:
            fn = getattr(role, "status", None)
            if role is self or not callable(fn) or (isinstance(role, PeerWatch) and not with_peers):
                continue
            part = fn()
            if inspect.isawaitable(part):
                part = await part
            _merge(sections, part)
        checks: dict[str, str] = sections.pop("health", {})
        offers = [self.offer_view(o) for o in sections.pop("offers", [])]
        peers = sections.pop("peers", []) if with_peers else []
        roles = [role_name(r) for r in self.roles if r is not self and not isinstance(r, PeerWatch)]
        node = {"peer_id": self.peer_id, "url": self.url, "roles": roles, "version": __version__,
                "uptime_s": round(time.time() - self.started, 1)}
        health = {"status": "ok" if all(v == "ok" for v in checks.values()) else "degraded", "checks": checks}
        traffic = self.metrics.traffic.snapshot(self.metrics.counters())
        doc: dict[str, Any] = {"node": node, "health": health, "traffic": traffic, "offers": offers}
        if with_peers:
            peers = peers + _routed_peers(sections.get("routing", {}), peers, self.peer_id)
            me = peer_row(self.url or "", {"node": node, "health": health, "traffic": traffic, "offers": offers,
                                           **sections}, rtt_ms=0.0) | {"self": True}
            # Peers' offers join this node's in one table; each is re-checked here, whoever relayed it.
            relayed = [self.offer_view(o) for p in peers for o in p.get("offers", [])]
            seen: set[Any] = set()  # an offer gossip brought a gateway may also come with a watched peer
            doc["offers"] = [o for o in offers + relayed if not (o.get("cid") in seen or seen.add(o.get("cid")))]
            doc["peers"] = [{k: v for k, v in p.items() if k != "offers"} for p in (me, *peers)]
        return doc | sections

    def offer_view(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A signed offer flattened for display, its signature and CID checked here (never taken on trust)."""
        record = entry.get("record")
        if not isinstance(record, dict):
            return entry | {"verified": False, "error": "no signed record"}
        key = json.dumps(entry, sort_keys=True, default=str)  # the whole claim: a changed byte is a new check
        if (cached := self._offer_views.get(key)) is not None:
            return cached
        try:
            rec = verify_record(record, OfferBody)
            if str(rec.cid) != entry.get("cid"):
                raise AgoraError(f"offer CID {entry.get('cid')} does not match its record ({rec.cid})")
            b: OfferBody = rec.body
            view = {"cid": str(rec.cid), "provider": rec.signer, "url": b.url, "precision": b.precision,
                    "engine": b.engine, "hardware": b.hardware, "max_concurrency": b.max_concurrency,
                    "expires_ms": b.expires_ms, "models": [m.model_dump() for m in b.models], "verified": True,
                    "record": record}  # kept, so whoever reads this status can check the signature too
        except (AgoraError, ValueError) as exc:
            return {"cid": entry.get("cid"), "verified": False, "error": str(exc)[:200]}
        if len(self._offer_views) > 4096:
            self._offer_views.clear()
        self._offer_views[key] = view
        return view

    # -- a readable page of the log ---------------------------------------------------------------

    def log_page(self, start: int, end: int) -> dict[str, Any]:
        log = self.log
        if log is None:
            return {"size": 0, "start": 0, "end": 0, "entries": []}
        size = log.size
        start = min(start, size)
        end = max(start, min(end, size, start + MAX_LOG_PAGE))
        rows = [_entry_row(e.index, str(e.cid), e.record) for e in log.entries(start, end)]
        return {"size": size, "start": start, "end": end, "entries": rows}

    # -- routes -----------------------------------------------------------------------------------

    def _routes(self) -> APIRouter:
        r = APIRouter()

        @r.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(str(STATIC / "index.html"), headers={"cache-control": "no-cache"})

        @r.get(STATUS_PATH)
        async def status(peers: bool = True) -> JSONResponse:
            """This node's status; `peers=false` leaves out the peers it watches (what peers ask each other)."""
            return JSONResponse(await self.status(with_peers=peers))

        @r.get(LOG_PAGE_PATH)
        def log_page(start: int = Query(0, ge=0), end: int | None = Query(None, ge=0)) -> JSONResponse:
            """Log entries start ≤ index < end (at most 100), decoded to type, signer and a summary."""
            if end is not None and end < start:
                return JSONResponse(error_body(f"end ({end}) must not be before start ({start})", param="end",
                                               code="invalid_parameter"), 400)
            return JSONResponse(self.log_page(start, start + MAX_LOG_PAGE if end is None else end))

        @r.get("/metrics", include_in_schema=False)
        def metrics() -> Response:
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        return r


def _routed_peers(routing: dict[str, Any], known: list[dict[str, Any]], me: str | None) -> list[dict[str, Any]]:
    """Peer rows for the providers a gateway routes over that no watched status already shows."""
    seen = {p.get("peer_id") for p in known} | {me}
    rows = []
    for p in routing.get("providers", []):
        if p["peer"] in seen:
            continue
        seen.add(p["peer"])
        rows.append({"url": p["url"], "peer_id": p["peer"], "roles": ["provider"],
                     "health": "ok" if p["state"] == "ok" else "degraded", "error": None if p["state"] == "ok"
                     else p["state"], "rtt_ms": None, "last_seen_ms": None, "log_size": None, "via": "gossip",
                     "models": [{"cid": m["cid"], "name": m["name"]} for m in p["models"]],
                     "traffic": {"requests_per_s": None, "tokens_per_s": p["tokens_per_s"], "p50_ms": None,
                                 "p99_ms": None, "in_flight": p["in_flight"]}})
    return rows


def _merge(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        old = into.get(key)
        if isinstance(old, list) and isinstance(value, list):
            into[key] = old + value
        elif isinstance(old, dict) and isinstance(value, dict):
            into[key] = old | value
        else:
            into[key] = value


def _entry_row(index: int, cid: str, data: bytes) -> dict[str, Any]:
    try:
        rec = decode_record(data)
    except AgoraError as exc:
        return {"index": index, "cid": cid, "type": "?", "signer": None, "summary": f"undecodable: {exc}"[:200]}
    return {"index": index, "cid": cid, "type": rec.type, "signer": rec.signer, "summary": _summary(rec.type, rec.body)}


def _summary(type_name: str, body: Any) -> str:
    if type_name == "agora/receipt/1":
        return (f"{body.prompt_tokens} in, {len(body.output_tokens)} out tokens ({body.finish_reason}), "
                f"{body.price.charged} µcr, {body.precision}, model {body.model[:20]}…")
    if type_name == "agora/offer/1":
        return f"{', '.join(m.name for m in body.models)} at {body.url} ({body.engine}, {body.precision})"
    if type_name == "agora/credit-move/1":
        return f"{body.kind} {body.amount} µcr {body.debit} → {body.credit}"
    if type_name == "agora/tree-head/1":
        return f"size {body.size}"
    return ""
