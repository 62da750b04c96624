"""Gateway role: the provider's OpenAI API in front of every provider discovery finds.

Each request is routed by the user's `provider` preferences (OpenRouter-style) and by what the
gateway has seen of each provider (failures put it in a cool-down; latency and throughput are
tracked). The gateway fixes the request id and seed, so any provider continues the same sampling:
if one dies or stalls mid-stream, the next gets the prompt plus the token ids already forwarded
(`agora.prefix_tokens`) and the client sees one stream, with the receipts of every part at the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from agoranet.core.errors import RecordError, RequestError
from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, OfferedModel, ReceiptBody, Record, token_charge
from agoranet.engine.base import Generation
from agoranet.net.discovery import Discovery
from agoranet.net.peer import PeerClient, PeerRefused, PeerStream, PeerUnreachable
from agoranet.node.app import FastJSONResponse
from agoranet.node.audit import VerifierLink
from agoranet.node.credits_role import CreditsRole, Escrow, PriceBound, max_price, prompt_token_bound
from agoranet.node.keys import ApiKey, KeyStore
from agoranet.wire.openai import (
    Answer, ChatCompletionRequest, ChunkWriter, CompletionRequest, ProviderPreferences, ReceiptPart, error_chunk,
    gateway_summary,
)
from agoranet.wire.sse import DONE

log = logging.getLogger(__name__)

Kind = Literal["chat", "completion"]
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


@dataclass(frozen=True)
class GatewayConfig:
    require_keys: bool = False
    connect_timeout_s: float = 2.0
    stall_timeout_s: float = 10.0  # a provider silent this long mid-stream is treated as dead
    cooldown_s: float = 5.0  # first cool-down after a failure; doubles per consecutive failure
    max_cooldown_s: float = 120.0
    max_attempts: int = 4  # providers tried for one request, failovers included
    default_max_tokens: int = 64  # set explicitly, so a continuation knows how many tokens remain
    verifiers: tuple[str, ...] = ()  # verifier URLs: receipts go to them, their reputations steer routing
    reputation_interval_s: float = 2.0
    charge_credits: bool = False  # bill each request to its API key's credits (implies keys are required)
    verifier_fee_ppm: int = 0  # verifiers' fee, in millionths of the providers' charge, paid by the user


@dataclass
class ProviderHealth:
    """What this gateway has seen of one provider (by peer id)."""

    in_flight: int = 0
    failures: int = 0  # consecutive
    cooldown_until: float = 0.0
    ttft_ms: float | None = None  # moving averages
    tokens_per_s: float | None = None
    served: int = 0

    def healthy(self, now: float) -> bool:
        return now >= self.cooldown_until


@dataclass(frozen=True, eq=False)
class Candidate:
    offer: Record[OfferBody]
    model: OfferedModel

    @property
    def peer(self) -> str:
        return self.offer.signer

    @property
    def url(self) -> str:
        return self.offer.body.url.rstrip("/")

    @property
    def price(self) -> int:
        return self.model.input_per_mtok + self.model.output_per_mtok

    def named_by(self, names: list[str]) -> bool:
        return any(n.rstrip("/") in (self.peer, self.url) for n in names)


class Router:
    """Orders the providers of a model for one request: the user's preferences first, then health."""

    EWMA = 0.3

    def __init__(self, config: GatewayConfig, rng: random.Random | None = None,
                 verifiers: VerifierLink | None = None) -> None:
        self.config = config
        self.health: dict[str, ProviderHealth] = {}
        self.rng = rng or random.Random()
        self.verifiers = verifiers
        # Further reasons to shut a provider out, by peer id (e.g. its transparency log forked).
        self.exclusions: list[Callable[[str], bool]] = []

    def of(self, peer: str) -> ProviderHealth:
        return self.health.setdefault(peer, ProviderHealth())

    def plan(self, candidates: list[Candidate], prefs: ProviderPreferences) -> list[Candidate]:
        if self.exclusions:
            candidates = [c for c in candidates if not any(excluded(c.peer) for excluded in self.exclusions)]
        if self.verifiers is not None:  # a proven fraud shuts a provider out, whatever the user asked
            candidates = [c for c in candidates if not self.verifiers.excluded(c.peer)]
            if prefs.require_verified:
                candidates = [c for c in candidates if self.verifiers.verified(c.peer)]
        elif prefs.require_verified:
            candidates = []  # no verifier, so nothing is verified
        if prefs.only:
            candidates = [c for c in candidates if c.named_by(prefs.only)]
        if prefs.ignore:
            candidates = [c for c in candidates if not c.named_by(prefs.ignore)]
        if prefs.max_price:
            mp = prefs.max_price
            candidates = [c for c in candidates
                          if (mp.prompt is None or c.model.input_per_mtok <= mp.prompt)
                          and (mp.completion is None or c.model.output_per_mtok <= mp.completion)]
        now = time.monotonic()
        healthy = [c for c in candidates if self.of(c.peer).healthy(now)]
        cooling = sorted((c for c in candidates if not self.of(c.peer).healthy(now)),
                         key=lambda c: self.of(c.peer).cooldown_until)
        ordered = self._sort(healthy, prefs.sort) + cooling  # cooling providers only as a last resort
        if prefs.order:
            named: list[Candidate] = []
            for name in prefs.order:
                named += [c for c in ordered if c.named_by([name]) and all(c is not n for n in named)]
            ordered = named + ([c for c in ordered if all(c is not n for n in named)] if prefs.allow_fallbacks else [])
        elif not prefs.allow_fallbacks:
            ordered = ordered[:1]
        return ordered[: self.config.max_attempts]

    def _sort(self, cs: list[Candidate], sort: str | None) -> list[Candidate]:
        if sort == "price":
            return sorted(cs, key=lambda c: (c.price, self.of(c.peer).in_flight))
        if sort == "latency":  # unknown latency sorts first, so new providers get measured
            return sorted(cs, key=lambda c: (self.of(c.peer).ttft_ms or 0.0, c.price))
        if sort == "throughput":
            return sorted(cs, key=lambda c: (-(self.of(c.peer).tokens_per_s or float("inf")), c.price))
        # Default: cheapest first, but drawn at random weighted by (cheapest/price)^2 / (1 + in flight),
        # so load spreads and a provider twice the price still gets about a fifth of the traffic.
        if len(cs) <= 1:
            return cs
        cheapest = min(c.price for c in cs) + 1
        weights = [((cheapest / (c.price + 1)) ** 2) / (1 + self.of(c.peer).in_flight) for c in cs]
        first = self.rng.choices(cs, weights=weights)[0]
        return [first] + sorted((c for c in cs if c is not first), key=lambda c: c.price)

    def failed(self, peer: str) -> None:
        h = self.of(peer)
        h.failures += 1
        cooldown = min(self.config.cooldown_s * 2 ** (h.failures - 1), self.config.max_cooldown_s)
        h.cooldown_until = time.monotonic() + cooldown
        log.warning("provider %s failed (%d in a row); cooling down for %.0fs", peer, h.failures, cooldown)

    def succeeded(self, peer: str, *, ttft_s: float, tokens: int, duration_s: float) -> None:
        h = self.of(peer)
        h.failures, h.cooldown_until, h.served = 0, 0.0, h.served + 1
        h.ttft_ms = _ewma(h.ttft_ms, ttft_s * 1000, self.EWMA)
        if tokens and duration_s > 0:
            h.tokens_per_s = _ewma(h.tokens_per_s, tokens / duration_s, self.EWMA)


def overcharged(receipt: ReceiptBody, offered: OfferedModel) -> int | None:
    """What the offer a receipt was routed by allows it to charge, when it charges more; else None.

    Its rates may not exceed the offer's, and its charge not the offer's price of its prompt tokens plus
    its output tokens (at most max_tokens when an upstream engine reports a count, not token ids)."""
    price = receipt.price
    completion = len(receipt.output_tokens) or receipt.sampling.max_tokens
    allowed = token_charge(receipt.prompt_tokens, completion, offered.input_per_mtok, offered.output_per_mtok)
    if (price.input_per_mtok > offered.input_per_mtok or price.output_per_mtok > offered.output_per_mtok
            or price.charged > allowed):
        return allowed
    return None


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


@dataclass
class _Job:
    """One client request on its way through providers."""

    kind: Kind
    req: ChatCompletionRequest | CompletionRequest
    body: dict[str, Any]  # what is sent upstream (agora.prefix_tokens and max_tokens change on failover)
    plan: list[Candidate]
    key: ApiKey | None
    request_id: str
    max_tokens: int
    tried: list[str] = field(default_factory=list)
    parts: list[ReceiptPart] = field(default_factory=list)  # one per provider that finished its part
    escrow: Escrow | None = None  # the credits held for this request, when the gateway charges


class Gateway:
    def __init__(self, identity: Identity, discovery: Discovery, config: GatewayConfig | None = None,
                 keys: KeyStore | None = None, credits: CreditsRole | None = None) -> None:
        self.identity, self.discovery = identity, discovery
        self.config = config or GatewayConfig()
        self.keys = keys
        self.credits = credits
        if self.config.charge_credits and (credits is None or keys is None):
            raise ValueError("a gateway that charges credits needs a key store and a credit ledger")
        self.verifiers = VerifierLink(list(self.config.verifiers), interval_s=self.config.reputation_interval_s)
        self.routing = Router(self.config, verifiers=self.verifiers)  # which providers, in what order
        self.client: PeerClient | None = None
        self.failovers = 0
        self.router = self._routes()  # the HTTP routes, as every role's `router`
        # Served by app.HotRoutes straight from ASGI (the routes in `_routes` document them).
        self.hot_routes = {PATHS["chat"]: partial(self._hot, "chat", ChatCompletionRequest),
                           PATHS["completion"]: partial(self._hot, "completion", CompletionRequest)}

    async def start(self) -> None:
        self.client = PeerClient(connect_timeout_s=self.config.connect_timeout_s,
                                 read_timeout_s=self.config.stall_timeout_s)
        await self.verifiers.start()

    async def stop(self) -> None:
        await self.verifiers.stop()
        if self.client is not None:
            await self.client.aclose()

    # -- planning -------------------------------------------------------------------------------------

    async def _candidates(self, model: str | None) -> list[Candidate]:
        offers = await self.discovery.find_offers(model)
        return [Candidate(o, m) for o in offers for m in o.body.models if model is None or model in (m.cid, m.name)]

    async def _job(self, kind: Kind, req: ChatCompletionRequest | CompletionRequest, authorization: str | None) -> _Job:
        key = None
        if self.config.require_keys or self.config.charge_credits:
            if self.keys is None:
                raise RequestError("this gateway requires API keys but has no key store", status=500)
            key = self.keys.authorize(authorization)
        prefs = ProviderPreferences.model_validate(req.provider or {})
        candidates = await self._candidates(req.model)
        if not candidates:
            raise RequestError(f"no live provider offers model {req.model!r}; GET /v1/models lists what the "
                               "network serves", status=404, code="model_not_found", param="model")
        plan = self.routing.plan(candidates, prefs)
        if not plan:
            raise RequestError(f"{len(candidates)} providers serve {req.model!r} but none matches your `provider` "
                               "preferences (only/ignore/max_price/order)", status=404, code="no_provider_matches",
                               param="provider")
        body = req.model_dump(mode="json", exclude_none=True, exclude={"provider", "agora", "stream_options"})
        max_tokens = req.max_tokens or self.config.default_max_tokens
        body.pop("max_completion_tokens", None)
        body.pop("stream", None)
        body |= {"seed": req.seed if req.seed is not None else secrets.randbits(63), "max_tokens": max_tokens}
        # A pure function of what is asked (seed included), so the same request gives the same answer
        # through this gateway, streamed or not, on any provider; every part of a failover shares it.
        request_id = (req.agora.request_id if req.agora and req.agora.request_id else
                      "gw-" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32])
        body |= {"stream": req.stream, "agora": {"request_id": request_id, "prefix_tokens": [], "stream_tokens": True}}
        if req.stream:
            body["stream_options"] = {"include_usage": True}
        return _Job(kind, req, body, plan, key, request_id, max_tokens)

    # -- credits --------------------------------------------------------------------------------------

    async def _hold(self, job: _Job) -> None:
        """Hold the request's maximum price (see credits_role) from its key's account, or refuse with 402."""
        if not self.config.charge_credits or job.key is None or self.credits is None:
            return
        amount = max_price(prompt_token_bound(job.req), job.max_tokens,
                           [PriceBound(c.model.input_per_mtok, c.model.output_per_mtok, c.model.context_length)
                            for c in job.plan],
                           fee_ppm=self.config.verifier_fee_ppm)
        job.escrow = await self.credits.hold(job.key.id, job.request_id, amount)

    def _settle_args(self, job: _Job) -> tuple[list[Record[ReceiptBody]], str | None]:
        return [p.receipt for p in job.parts], self.verifiers.fee_payee()

    async def _settle(self, job: _Job) -> None:
        """Pay the receipts' charges from the hold and refund the rest (all of it when nothing was served)."""
        if job.escrow is not None and self.credits is not None and not job.escrow.settled:
            receipts, payee = self._settle_args(job)
            await self.credits.settle(job.escrow, receipts, verifier_peer=payee)

    def _settle_now(self, job: _Job) -> None:
        """The same, blocking: for a stream that was cancelled and may await nothing more."""
        if job.escrow is not None and self.credits is not None and not job.escrow.settled:
            receipts, payee = self._settle_args(job)
            self.credits.settle_now(job.escrow, receipts, verifier_peer=payee)

    def _next(self, job: _Job) -> Candidate | None:
        for c in job.plan:
            if c.peer not in job.tried:
                job.tried.append(c.peer)
                return c
        return None

    def _receipt_part(self, cand: Candidate, read: Callable[[], ReceiptPart]) -> ReceiptPart | None:
        """Check a provider's receipt is signed by the key that made the offer we routed by."""
        try:
            part = read()
        except RecordError:
            log.warning("provider %s sent no valid receipt", cand.peer)
            self.routing.failed(cand.peer)
            return None
        receipt = part.receipt
        if receipt.signer != cand.peer:
            log.warning("receipt from %s is signed by %s, not the offer's key", cand.url, receipt.signer)
            self.routing.failed(cand.peer)
            return None
        if (allowed := overcharged(receipt.body, cand.model)) is not None:
            log.warning("receipt from %s charges %d, more than its offer allows (%d); it is not paid",
                        cand.url, receipt.body.price.charged, allowed)
            self.routing.failed(cand.peer)
            return None
        self.verifiers.submit(receipt, cand.url)
        return part

    def _agora(self, job: _Job) -> dict[str, Any]:
        e = job.escrow
        credits = ({"held": e.held, "charged": e.charged, "verifier_fee": e.fee, "balance": e.balance}
                   if e is not None and e.settled else None)
        return gateway_summary(job.parts, request_id=job.request_id, gateway=str(self.identity.peer_id),
                               credits=credits)

    def _meter(self, job: _Job, tokens: int) -> None:
        if job.key is not None and self.keys is not None:
            charged = sum(p.receipt.body.price.charged for p in job.parts)
            self.keys.record_usage(job.key.id, tokens=tokens, charged=charged)

    async def _hot(self, kind: Kind, schema: type[ChatCompletionRequest] | type[CompletionRequest],
                   request: Request) -> Response:
        req = schema.model_validate_json(await request.body())
        return await self.serve(kind, req, request.headers.get("authorization"))

    # -- plain requests -------------------------------------------------------------------------------

    async def serve(self, kind: Kind, req: ChatCompletionRequest | CompletionRequest,
                    authorization: str | None) -> Response:
        job = await self._job(kind, req, authorization)
        await self._hold(job)
        streaming = False
        try:
            if req.stream:
                response = await self._serve_stream(job)
                streaming = True  # the stream settles its hold when it ends
                return response
            return await self._serve_plain(job)
        finally:
            if not streaming:
                await self._settle(job)

    async def _serve_plain(self, job: _Job) -> Response:
        kind, req = job.kind, job.req
        assert self.client is not None
        last_error: Exception | None = None
        while (cand := self._next(job)) is not None:
            health = self.routing.of(cand.peer)
            health.in_flight += 1
            started = time.monotonic()
            try:
                body = await self.client.post_json(cand.url, PATHS[kind], job.body)
            except PeerUnreachable as exc:
                self.routing.failed(cand.peer)
                last_error = exc
                continue
            except PeerRefused as exc:
                if exc.status in (400, 401, 403, 413, 422):  # the request's fault, not the provider's
                    return JSONResponse(exc.body, exc.status)
                if exc.status != 429:  # busy is no failure; just try the next one
                    self.routing.failed(cand.peer)
                last_error = exc
                continue
            finally:
                health.in_flight -= 1
            elapsed = time.monotonic() - started
            try:
                answer = Answer.model_validate(body)
            except ValueError as exc:
                self.routing.failed(cand.peer)
                last_error = RequestError(f"provider {cand.peer} answered something that is not an answer: {exc}")
                continue
            part = self._receipt_part(cand, partial(ReceiptPart.read, answer.agora))
            if part is None:
                last_error = RequestError(f"provider {cand.peer} answered without a valid receipt")
                continue
            job.parts.append(part)
            self.routing.succeeded(cand.peer, ttft_s=elapsed, tokens=answer.usage.completion_tokens,
                                        duration_s=elapsed)
            self._meter(job, answer.usage.total_tokens)
            await self._settle(job)
            body["agora"] = self._agora(job)  # the rest of the answer goes to the client as the provider wrote it
            return FastJSONResponse(body, headers={"x-agora-receipt": str(part.receipt.cid)})
        raise RequestError(f"every provider tried for {req.model!r} failed ({len(job.tried)} tried); last error: "
                           f"{last_error}", status=502, code="providers_failed", type="server_error")

    # -- streams --------------------------------------------------------------------------------------

    async def _open(self, job: _Job) -> tuple[Candidate, PeerStream] | None:
        """Open the stream on the next provider that answers; None when none is left."""
        assert self.client is not None
        while (cand := self._next(job)) is not None:
            try:
                return cand, await self.client.open_stream(cand.url, PATHS[job.kind], job.body)
            except PeerUnreachable:
                self.routing.failed(cand.peer)
            except PeerRefused as exc:
                if exc.status in (400, 401, 403, 413, 422) and not job.body["agora"]["prefix_tokens"]:
                    raise RequestError(str(exc), status=exc.status, code="provider_refused") from exc
                if exc.status != 429:
                    self.routing.failed(cand.peer)
        return None

    async def _serve_stream(self, job: _Job) -> Response:
        opened = await self._open(job)
        if opened is None:
            raise RequestError(f"no provider for {job.req.model!r} could be reached ({len(job.tried)} tried)",
                               status=502, code="providers_failed", type="server_error")
        # Settling is idempotent: the stream settles when it ends; the background task covers a stream
        # whose generator never started (the client left at once). It is async on purpose: a sync one
        # takes a worker thread per response, and under 500 concurrent streams those queued up
        # without bound (the load benchmark's gateway memory grew ~2.7 MiB/s).
        return EventSourceResponse(self._relay(job, *opened), sep="\n", ping=15,
                                   background=BackgroundTask(self._settle, job))

    async def _relay(self, job: _Job, cand: Candidate, stream: PeerStream):
        req = job.req
        want_lp = bool(req.logprobs) if job.kind == "chat" else req.logprobs is not None
        writer = ChunkWriter(kind=job.kind, id=f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                             model=req.model, token_text=None, top_k=req.wanted_top, want_logprobs=want_lp)
        tokens: list[int] = []  # ids of every token whose text the client has been sent
        prompt_tokens, completion_tokens, finish = 0, 0, "length"
        try:
            if (opening := writer.first()) is not None:
                yield {"data": opening}
            while True:
                health = self.routing.of(cand.peer)
                health.in_flight += 1
                started, first_at, part_tokens, part_done = time.monotonic(), None, 0, False
                part_text = False  # whether this part relayed text (an upstream engine's has no token ids)
                try:
                    async for chunk in stream.chunks():
                        if (error := chunk.error) is not None:
                            raise PeerUnreachable(f"provider failed mid-stream: {error}")
                        for text, logprobs, finish_reason in chunk.deltas(job.kind):
                            if finish_reason:
                                finish = finish_reason
                            part_text = part_text or bool(text)
                            if (out := writer.relay(text, logprobs if want_lp else None)) is not None:
                                yield {"data": out}
                        if (token := chunk.token) is not None:
                            tokens.append(token)
                            part_tokens += 1
                            first_at = first_at or time.monotonic()
                        if (usage := chunk.usage) is not None:
                            prompt_tokens = prompt_tokens or usage.prompt_tokens
                            completion_tokens += usage.completion_tokens
                        if chunk.has_receipt:
                            if (part := self._receipt_part(cand, chunk.receipt)) is not None:
                                job.parts.append(part)
                            part_done = True
                except (PeerUnreachable, ValueError) as exc:  # ValueError: a chunk field of the wrong type
                    log.warning("stream from %s broke after %d tokens: %s", cand.url, len(tokens), exc)
                    self.routing.failed(cand.peer)
                else:
                    if part_done:
                        now = time.monotonic()
                        self.routing.succeeded(cand.peer, ttft_s=(first_at or now) - started,
                                                    tokens=part_tokens, duration_s=now - (first_at or now))
                        break
                    self.routing.failed(cand.peer)
                finally:
                    health.in_flight -= 1
                    await stream.aclose()
                if part_text and not part_tokens:
                    # Text with no token ids (a provider in front of vLLM, Ollama…): where it stopped is
                    # unknown in tokens, so another provider could only start over and repeat it.
                    yield {"data": error_chunk("the provider failed mid-stream and its engine does not report "
                                               "token ids, so no other provider can continue the answer "
                                               "without repeating it; retry the request", code="provider_failed")}
                    return
                # Continue the same generation elsewhere from the tokens already forwarded.
                remaining = job.max_tokens - len(tokens)
                if remaining <= 0:
                    finish = "length"
                    break
                self.failovers += 1
                job.body = job.body | {"max_tokens": remaining,
                                       "agora": job.body["agora"] | {"prefix_tokens": list(tokens)}}
                opened = await self._open(job)  # the plan already holds only what the preferences allow
                if opened is None:
                    yield {"data": error_chunk(f"the provider failed after {len(tokens)} tokens and no other "
                                               f"provider could continue ({len(job.tried)} tried)",
                                               code="providers_failed")}
                    return
                cand, stream = opened
                log.info("continuing request %s on %s after %d tokens", job.request_id, cand.url, len(tokens))
            await self._settle(job)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = Generation(prompt_tokens=prompt_tokens, finish_reason=finish, completion_tokens=completion_tokens)
            for out in writer.last(gen, include_usage=include_usage, agora=self._agora(job)):
                yield {"data": out}
            yield {"data": DONE}
            self._meter(job, prompt_tokens + completion_tokens)
        except asyncio.CancelledError:
            await stream.aclose()  # the client went away: stop the provider's generation too
            raise
        finally:
            self._settle_now(job)  # failed or cancelled: pay what receipts came, refund the rest

    # -- routes ---------------------------------------------------------------------------------------

    async def providers(self) -> list[dict[str, Any]]:
        """Every live provider discovery knows of, with what this gateway has seen of it."""
        out = []
        now = time.monotonic()
        for rec in await self.discovery.find_offers(None):
            signer = rec.signer
            h = self.routing.of(signer)
            out.append({"peer": signer, "url": rec.body.url, "models": [m.model_dump() for m in rec.body.models],
                        "healthy": h.healthy(now), "failures": h.failures, "served": h.served,
                        "in_flight": h.in_flight, "ttft_ms": h.ttft_ms, "tokens_per_s": h.tokens_per_s})
        return out

    def _routes(self) -> APIRouter:
        r = APIRouter()

        @r.get("/v1/models")
        async def models() -> dict[str, Any]:
            seen: dict[str, dict[str, Any]] = {}
            for c in await self._candidates(None):
                entry = seen.setdefault(c.model.name, {
                    "id": c.model.name, "object": "model", "created": 0, "owned_by": "agora",
                    "agora": {"cid": c.model.cid, "providers": 0, "min_output_per_mtok": c.model.output_per_mtok}})
                entry["agora"]["providers"] += 1
                entry["agora"]["min_output_per_mtok"] = min(entry["agora"]["min_output_per_mtok"],
                                                            c.model.output_per_mtok)
            return {"object": "list", "data": list(seen.values())}

        # Documented here; requests to these two paths are served by `hot_routes` (see app.HotRoutes).
        @r.post("/v1/chat/completions")
        async def chat(req: ChatCompletionRequest, request: Request) -> Response:
            return await self.serve("chat", req, request.headers.get("authorization"))

        @r.post("/v1/completions")
        async def completions(req: CompletionRequest, request: Request) -> Response:
            return await self.serve("completion", req, request.headers.get("authorization"))

        @r.get("/agora/v1/providers")
        async def providers() -> dict[str, Any]:
            return {"providers": await self.providers(), "failovers": self.failovers}

        return r
