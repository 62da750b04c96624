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

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.background import BackgroundTask

from agoranet.core.cid import DAG_CBOR, cid_of
from agoranet.core.errors import RecordError, RequestError
from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, OfferedModel, ReceiptBody, Record, token_charge
from agoranet.engine.base import Generation, GenerationRequest
from agoranet.engine.upstream import UPSTREAM_ENGINE, UPSTREAM_PRECISION
from agoranet.net.discovery import Discovery
from agoranet.net.peer import PeerClient, PeerError, PeerRefused, PeerStream, PeerUnreachable
from agoranet.node.app import FastJSONResponse, HotEndpoint
from agoranet.node.audit import VerifierLink
from agoranet.node.credits_role import CreditsRole, Escrow, PriceBound, max_price, prompt_token_bound
from agoranet.node.gateway_metrics import GatewayMetrics, PartOutcome
from agoranet.node.keys import ApiKey, KeyStore
from agoranet.node.provider import CUT, generation_request, request_mismatch
from agoranet.verify.rules import RULES
from agoranet.wire.openai import (
    Answer, ChatCompletionRequest, ChunkWriter, CompletionRequest, ProviderPreferences, ReceiptPart, error_chunk,
    gateway_summary,
)
from agoranet.wire.sse import DONE

log = logging.getLogger(__name__)

MICROCREDITS_PER_CREDIT = 1_000_000

Kind = Literal["chat", "completion"]
PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


NOT_SAMPLING = frozenset({"max_tokens", "logprobs", "top_logprobs", "stream", "user"})  # cannot change a token


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
    # A provider is on probation until a verifier has passed one of its receipts or it has served this many
    # requests here: until then it is tried first for at most probation_share of requests, and at most
    # one provider on probation is tried per request (see Router.plan).
    probation_serves: int = 3
    probation_share: float = 0.1
    cut_timeout_s: float = 10.0  # how long a provider gets to sign the partial receipt of a stream cut by its client
    # Receipts in answers to clients: "compact" (CID, URL, the provider's signed summary) or "full" signed
    # records, unless a request asks otherwise with agora.receipt. The provider→gateway hop always carries
    # the full record, which the gateway checks, pays by, hands to verifiers and continues from.
    receipts: Literal["full", "compact"] = "compact"


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


_NEVER_TRIED = ProviderHealth()  # read-only: what `Router.seen` answers for a provider never tried
MAX_HEALTH_RECORDS = 10_000


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
        """Named by peer id or URL, the URL with or without the `/v1` a provider prints for OpenAI clients."""
        return any(n.rstrip("/").removesuffix("/v1") in (self.peer, self.url) for n in names)


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
        """The record of a provider this gateway tries (created on first use)."""
        return self.health.setdefault(peer, ProviderHealth())

    def seen(self, peer: str) -> ProviderHealth:
        """What this gateway has seen of a provider, without remembering one never tried: a flood of offers
        from fresh keys must not grow the health table."""
        return self.health.get(peer) or _NEVER_TRIED

    def proven(self, peer: str) -> bool:
        """Off probation: a verifier passed one of its receipts, or it served `probation_serves` requests here."""
        return (self.verifiers is not None and self.verifiers.verified(peer)) or \
            self.seen(peer).served >= self.config.probation_serves

    def _probation(self, ordered: list[Candidate], now: float) -> list[Candidate]:
        """Proven providers first, but one healthy provider on probation, drawn at random, leads
        `probation_share` of requests; the rest on probation get none. With no proven provider yet, all
        are tried as ordered (a network has to start somewhere)."""
        proven = [c for c in ordered if self.proven(c.peer)]
        if not proven or len(proven) == len(ordered):
            return ordered
        unproven = [c for c in ordered if not self.proven(c.peer) and self.seen(c.peer).healthy(now)]
        trial = [self.rng.choice(unproven)] if unproven else []
        if trial and self.rng.random() < self.config.probation_share:
            return trial + proven
        return proven + trial

    def plan(self, candidates: list[Candidate], prefs: ProviderPreferences,
             why: list[str] | None = None) -> list[Candidate]:
        """The providers to try, in order; `why` collects what each filter left out (for a 404 that says so)."""
        def keep(kept: list[Candidate], reason: str) -> list[Candidate]:
            if why is not None and len(kept) < len(candidates):
                why.append(f"{len(candidates) - len(kept)} {reason}")
            return kept

        if self.exclusions:
            candidates = keep([c for c in candidates if not any(excluded(c.peer) for excluded in self.exclusions)],
                              "shut out (transparency log forked)")
        # Receipts under a rule no verifier judges would go unaudited (upstream offers apply none: never replayed).
        candidates = keep([c for c in candidates if c.offer.body.precision == UPSTREAM_PRECISION
                           or c.offer.body.rule in RULES], "applying a sampling rule no verifier judges")
        if self.verifiers is not None:  # a proven fraud shuts a provider out, whatever the user asked
            candidates = keep([c for c in candidates if not self.verifiers.excluded(c.peer)],
                              "shut out by a fraud proof or violation")
            # Never sell what no verifier can judge: an offer's (model, precision) needs tolerances somewhere.
            # Upstream offers declare a class that is never replayed (provider.require_verified avoids them).
            candidates = keep([c for c in candidates if c.offer.body.precision == UPSTREAM_PRECISION
                               or self.verifiers.judgeable(c.model.cid, c.offer.body.precision)],
                              "of a model or precision no verifier holds tolerances for")
            if prefs.require_verified:
                candidates = keep([c for c in candidates if self.verifiers.verified(c.peer)],
                                  "not yet verified by a verifier (provider.require_verified)" if self.verifiers.verifiers
                                  else "not verified: this gateway follows no verifier (provider.require_verified)")
        elif prefs.require_verified:  # no verifier, so nothing is verified
            candidates = keep([], "not verified: this gateway follows no verifier (provider.require_verified)")
        if prefs.quantizations:
            candidates = keep([c for c in candidates if c.offer.body.precision in prefs.quantizations],
                              f"not of precision {'/'.join(prefs.quantizations)} (provider.quantizations)")
        if prefs.only:
            candidates = keep([c for c in candidates if c.named_by(prefs.only)], "not named in provider.only")
        if prefs.ignore:
            candidates = keep([c for c in candidates if not c.named_by(prefs.ignore)], "named in provider.ignore")
        if prefs.max_price:
            mp = prefs.max_price
            candidates = keep([c for c in candidates
                               if (mp.prompt is None or c.model.input_per_mtok <= mp.prompt)
                               and (mp.completion is None or c.model.output_per_mtok <= mp.completion)],
                              "over provider.max_price")
        now = time.monotonic()
        healthy = [c for c in candidates if self.seen(c.peer).healthy(now)]
        cooling = sorted((c for c in candidates if not self.seen(c.peer).healthy(now)),
                         key=lambda c: self.seen(c.peer).cooldown_until)
        ordered = self._sort(healthy, prefs.sort) + cooling  # cooling providers only as a last resort
        if not prefs.order and not prefs.only:  # a user who names providers gets exactly those
            ordered = self._probation(ordered, now)
        if prefs.order:
            named: list[Candidate] = []
            for name in prefs.order:
                named += [c for c in ordered if c.named_by([name]) and all(c is not n for n in named)]
            ordered = named + ([c for c in ordered if all(c is not n for n in named)] if prefs.allow_fallbacks else [])
            if not ordered and candidates:
                keep([], "not named in provider.order (and provider.allow_fallbacks is false)")
        elif not prefs.allow_fallbacks:
            ordered = ordered[:1]
        return ordered[: self.config.max_attempts]

    def _sort(self, cs: list[Candidate], sort: str | None) -> list[Candidate]:
        if sort == "price":
            return sorted(cs, key=lambda c: (c.price, self.seen(c.peer).in_flight))
        if sort == "latency":  # unknown latency sorts first, so new providers get measured
            return sorted(cs, key=lambda c: (self.seen(c.peer).ttft_ms or 0.0, c.price))
        if sort == "throughput":
            return sorted(cs, key=lambda c: (-(self.seen(c.peer).tokens_per_s or float("inf")), c.price))
        # Default: cheapest first, but drawn at random weighted by (cheapest/price)^2 / (1 + in flight),
        # so load spreads and a provider twice the price still gets about a fifth of the traffic.
        if len(cs) <= 1:
            return cs
        cheapest = min(c.price for c in cs) + 1
        weights = [((cheapest / (c.price + 1)) ** 2) / (1 + self.seen(c.peer).in_flight) for c in cs]
        first = self.rng.choices(cs, weights=weights)[0]
        return [first] + sorted((c for c in cs if c is not first), key=lambda c: c.price)

    def failed(self, peer: str) -> None:
        if len(self.health) > MAX_HEALTH_RECORDS:  # forget providers that never served and are not cooling
            now = time.monotonic()
            for stale in [p for p, h in self.health.items() if not h.served and not h.in_flight and h.healthy(now)]:
                del self.health[stale]
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
    its output tokens (the count it states, at most max_tokens, when an upstream engine reports no token ids)."""
    price = receipt.price
    completion = len(receipt.output_tokens) or min(receipt.completion_tokens, receipt.sampling.max_tokens)
    allowed = token_charge(receipt.prompt_tokens, completion, offered.input_per_mtok, offered.output_per_mtok)
    if (price.input_per_mtok > offered.input_per_mtok or price.output_per_mtok > offered.output_per_mtok
            or price.charged > allowed):
        return allowed
    return None


def _generated_text(job: _Job, answer: Answer) -> str:
    """The generated text of a provider's plain answer (without an echoed prompt): what its receipt signs."""
    req = job.req
    if isinstance(req, CompletionRequest) and req.echo:
        return answer.text.removeprefix(req.prompt_text())
    return answer.text


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


@dataclass
class _Part:
    """One provider's part of a streamed answer: what it relayed, for its receipt to be checked against."""

    cand: Candidate
    stream: PeerStream
    response_id: str | None = None  # the provider's id of its stream (to cut it)
    tokens: list[int] = field(default_factory=list)
    text: str = ""


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
    reserved: int = 0  # tokens of the key's quota held at admission, released when the request ends
    used_tokens: int = 0  # prompt + completion tokens served, once known
    finished: bool = False
    refused: str = ""  # why the last receipt refused was refused
    started: float = field(default_factory=time.monotonic)
    ttft_s: float | None = None  # to the first token the client was sent (streams)
    receipt_urls: dict[str, str] = field(default_factory=dict)  # receipt CID -> where its provider serves it


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
        self.stats = GatewayMetrics()
        self.router = self._routes()  # the HTTP routes, as every role's `router`
        # Served by app.HotRoutes straight from ASGI (create_app documents them in the OpenAPI schema).
        self.hot_routes = {
            PATHS["chat"]: HotEndpoint(partial(self._hot, "chat", ChatCompletionRequest), ChatCompletionRequest,
                                       "Chat completion, routed to a provider"),
            PATHS["completion"]: HotEndpoint(partial(self._hot, "completion", CompletionRequest), CompletionRequest,
                                             "Completion, routed to a provider")}

    async def start(self) -> None:
        self.client = PeerClient(connect_timeout_s=self.config.connect_timeout_s,
                                 read_timeout_s=self.config.stall_timeout_s, signer=self.identity)
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
        prefs = req.provider or ProviderPreferences()
        candidates = await self._candidates(req.model)
        if not candidates:
            raise RequestError(f"no live provider offers model {req.model!r}; GET /v1/models lists what the "
                               "network serves", status=404, code="model_not_found", param="model")
        why: list[str] = []
        plan = candidates
        if prefs.require_parameters and (req.logprobs if kind == "chat" else req.logprobs is not None):
            # An upstream engine reports text, not token ids: its logprobs come back empty.
            plan = [c for c in plan if c.offer.body.engine != UPSTREAM_ENGINE]
            if len(plan) < len(candidates):
                why.append(f"{len(candidates) - len(plan)} cannot return logprobs (upstream engine; "
                           "provider.require_parameters)")
        if req.max_tokens is not None:  # a provider refuses more than its tolerance record's range: ask none that must
            fits = [c for c in plan if not c.model.max_output_tokens or req.max_tokens <= c.model.max_output_tokens]
            if len(fits) < len(plan):
                why.append(f"{len(plan) - len(fits)} calibrated for fewer output tokens than max_tokens "
                           f"{req.max_tokens} (their answers could not be verified)")
            plan = fits
        plan = self.routing.plan(plan, prefs, why)
        if not plan:
            n = len(candidates)
            raise RequestError(f"{n} provider{'s' if n != 1 else ''} serve{'' if n != 1 else 's'} {req.model!r} but "
                               f"none is left to route to: {'; '.join(why)}", status=404, code="no_provider_matches",
                               param="provider")
        body = req.model_dump(mode="json", exclude_none=True, exclude={"provider", "agora", "stream_options"})
        # unasked, as many as every provider planned can serve within its calibrated range
        max_tokens = req.max_tokens or min([self.config.default_max_tokens,
                                            *(c.model.max_output_tokens for c in plan if c.model.max_output_tokens)])
        body.pop("max_completion_tokens", None)
        body.pop("stream", None)
        body |= {"seed": req.seed if req.seed is not None else secrets.randbits(63), "max_tokens": max_tokens}
        # A pure function of what decides the sampled tokens (seed included; not max_tokens, which only
        # truncates, nor logprobs), so the same request gives the same answer through this gateway,
        # streamed or not, on any provider; every part of a failover shares it.
        sampled = {k: v for k, v in body.items() if k not in NOT_SAMPLING}
        request_id = (req.agora.request_id if req.agora and req.agora.request_id else
                      "gw-" + hashlib.sha256(json.dumps(sampled, sort_keys=True).encode()).hexdigest()[:32])
        # The full receipt, always: it is checked against what was relayed, paid, audited and continued from.
        body |= {"stream": req.stream, "agora": {"request_id": request_id, "prefix_tokens": [], "stream_tokens": True,
                                                 "receipt": "full"}}
        if req.stream:
            body["stream_options"] = {"include_usage": True}
        job = _Job(kind, req, body, plan, key, request_id, max_tokens)
        if key is not None and self.keys is not None:
            job.reserved = self.keys.reserve(key, self._prompt_bound(job) + max_tokens)
        return job

    @staticmethod
    def _prompt_bound(job: _Job, plan: list[Candidate] | None = None) -> int:
        """At least the prompt tokens any of the planned providers can count (see credits_role)."""
        contexts = [c.model.context_length for c in (plan or job.plan)]
        bound = prompt_token_bound(job.req)
        return min(bound, max(contexts)) if contexts and all(contexts) else bound

    # -- credits --------------------------------------------------------------------------------------

    async def _hold(self, job: _Job) -> None:
        """Hold the request's maximum price (see credits_role) from its key's account, or refuse with 402.

        Only providers the key can afford stay in the plan, and the hold is the dearest of those: a provider
        asking an absurd price is never tried, rather than making every request unaffordable."""
        if not self.config.charge_credits or job.key is None or self.credits is None:
            return

        def cost(c: Candidate) -> int:
            return max_price(prompt_token_bound(job.req), job.max_tokens,
                             [PriceBound(c.model.input_per_mtok, c.model.output_per_mtok, c.model.context_length)],
                             fee_ppm=self.config.verifier_fee_ppm)

        costs = {c.peer: cost(c) for c in job.plan}
        balance = await self.credits.balance(job.key.id)
        affordable = [c for c in job.plan if costs[c.peer] <= balance]
        if affordable:
            job.plan = affordable
        amount = max(costs[c.peer] for c in affordable) if affordable else min(costs.values())
        job.escrow = await self.credits.hold(job.key.id, job.request_id, amount)

    def _settle_args(self, job: _Job) -> tuple[list[Record[ReceiptBody]], str | None]:
        return [p.receipt for p in job.parts], self.verifiers.fee_payee()

    async def _settle(self, job: _Job) -> None:
        """Pay the receipts' charges from the hold and refund the rest (all of it when nothing was served)."""
        if job.escrow is not None and self.credits is not None and not job.escrow.settled:
            receipts, payee = self._settle_args(job)
            self._settled(await self.credits.settle(job.escrow, receipts, verifier_peer=payee))

    def _settle_now(self, job: _Job) -> None:
        """The same, blocking: for a stream that was cancelled and may await nothing more."""
        if job.escrow is not None and self.credits is not None and not job.escrow.settled:
            receipts, payee = self._settle_args(job)
            self._settled(self.credits.settle_now(job.escrow, receipts, verifier_peer=payee))

    def _settled(self, escrow: Escrow) -> None:
        self.stats.settled(escrow.payments, escrow.held - sum(amount for _, amount in escrow.payments))

    def _part(self, cand: Candidate, outcome: PartOutcome) -> None:
        """One attempt at `cand` ended; a failure (not a refusal of the request, nor busy) cools it down."""
        self.stats.part(cand.peer, cand.model.name, outcome)
        if outcome not in ("ok", "rejected", "busy"):
            self.routing.failed(cand.peer)

    def _finish(self, job: _Job) -> None:
        """Once per request, however it ended: settle, count its tokens and charge against its key, and
        release the quota its admission reserved."""
        self._settle_now(job)
        if job.finished:
            return
        job.finished = True
        if job.key is not None and self.keys is not None:
            charged = sum(p.receipt.body.price.charged for p in job.parts)
            self.keys.record_usage(job.key.id, tokens=job.used_tokens, charged=charged, release=job.reserved)

    async def _close(self, job: _Job) -> None:
        """A stream response's background task: covers a stream whose generator never started."""
        await self._settle(job)
        self._finish(job)

    def _next(self, job: _Job) -> Candidate | None:
        for c in job.plan:
            if c.peer not in job.tried:
                job.tried.append(c.peer)
                return c
        return None

    async def _receipt_part(self, job: _Job, cand: Candidate, read: Callable[[], ReceiptPart], *,
                            tokens: list[int] | None, text: str, cut: bool = False) -> ReceiptPart | None:
        """The part to pay for when a provider's receipt is bound to this exchange, else None (and the
        provider is blamed): signed by the offer's key, within the offer's prices, for the request this
        gateway sent (same canonical request, hence request id, prefix and sampling), for exactly the
        tokens (`tokens`, when the provider streamed ids) and text relayed, and never paid before."""
        why = None
        try:
            part: ReceiptPart | None = read()
        except RecordError:
            part, why = None, "no valid receipt"
        if part is None:
            pass
        elif not (request_bytes := part.request):
            why = "a receipt without the canonical request it binds"
        elif (receipt := part.receipt).signer != cand.peer:
            why = f"a receipt signed by {receipt.signer}, not the offer's key"
        elif (receipt.body.model, receipt.body.precision) != (cand.model.cid, cand.offer.body.precision):
            # sold as one class, declared as another (say, bf16's looser tolerances under an fp32 price)
            why = (f"a receipt declaring model {receipt.body.model} at {receipt.body.precision!r}, not the "
                   f"{cand.offer.body.precision!r} {cand.model.cid} its offer sells")
        elif receipt.body.rule != cand.offer.body.rule:
            why = f"a receipt naming sampling rule {receipt.body.rule[:80]!r}, not the {cand.offer.body.rule!r} its offer applies"
        elif (allowed := overcharged(receipt.body, cand.model)) is not None:
            why = f"a receipt charging {receipt.body.price.charged}, more than its offer allows ({allowed})"
        elif str(cid_of(request_bytes, DAG_CBOR)) != receipt.body.request:
            why = "a canonical request that is not the one its receipt binds"
        elif (mismatch := request_mismatch(request_bytes, self._sent(job, cand), cand.model.cid)) is not None:
            why = f"a receipt for another request: {mismatch}"
        elif receipt.body.request_id != job.request_id:
            why = f"a receipt for request id {receipt.body.request_id!r}, not {job.request_id!r}"
        elif tokens is not None and receipt.body.output_tokens != tokens:
            why = f"a receipt for {len(receipt.body.output_tokens)} tokens other than the {len(tokens)} it streamed"
        elif not (text.startswith(receipt.body.output_text) if cut else receipt.body.output_text == text):
            why = "a receipt whose text is not the text it answered"
        elif cut and receipt.body.finish_reason != CUT:
            why = f"a partial receipt finishing {receipt.body.finish_reason!r}"
        elif self.credits is not None and await self.credits.paid(str(receipt.cid)):
            why = f"receipt {receipt.cid}, which was paid already"
        if why is not None:
            job.refused = f"provider {cand.peer} sent {why}"
            log.warning("provider %s sent %s; its answer is not paid", cand.url, why)
            self._part(cand, "bad_receipt")
            return None
        assert part is not None
        self.verifiers.submit(part.receipt, cand.url, cand.offer)
        b = part.receipt.body
        self.stats.part(cand.peer, cand.model.name, "ok")
        self.stats.receipt(cand.peer, cand.model.name, prompt_tokens=b.prompt_tokens,
                           completion_tokens=len(b.output_tokens) or b.completion_tokens, charged=b.price.charged)
        job.receipt_urls[str(part.receipt.cid)] = f"{cand.url}/agora/v1/records/{part.receipt.cid}"
        return part

    def _sent(self, job: _Job, cand: Candidate) -> GenerationRequest:
        """The generation the provider was asked for, as it reads it from the body this gateway sent."""
        schema = ChatCompletionRequest if job.kind == "chat" else CompletionRequest
        return generation_request(job.kind, schema.model_validate(job.body), job.max_tokens, cand.model.cid)

    def _agora(self, job: _Job) -> dict[str, Any]:
        e = job.escrow
        credits = ({"held": e.held, "charged": e.charged, "verifier_fee": e.fee, "balance": e.balance}
                   if e is not None and e.settled else None)
        asked = job.req.agora.receipt if job.req.agora else None
        parts = [p.json for p in job.parts] if (asked or self.config.receipts) == "full" else \
            [p.compact(job.receipt_urls.get(str(p.receipt.cid))) for p in job.parts]
        return gateway_summary(parts, request_id=job.request_id, gateway=str(self.identity.peer_id), credits=credits)

    def _cost(self, job: _Job) -> float:
        """What the request cost, in credits (OpenRouter's `usage.cost`): the receipts' charges and any
        verifier fee a charging gateway took, or the receipts' charges alone where nothing is billed."""
        if job.escrow is not None and job.escrow.settled:
            micro = job.escrow.charged + job.escrow.fee
        else:
            micro = sum(p.receipt.body.price.charged for p in job.parts)
        return micro / MICROCREDITS_PER_CREDIT

    async def _hot(self, kind: Kind, schema: type[ChatCompletionRequest] | type[CompletionRequest],
                   request: Request) -> Response:
        req = schema.model_validate_json(await request.body())
        return await self.serve(kind, req, request.headers.get("authorization"))

    # -- plain requests -------------------------------------------------------------------------------

    async def serve(self, kind: Kind, req: ChatCompletionRequest | CompletionRequest,
                    authorization: str | None) -> Response:
        started = time.monotonic()
        try:
            job = await self._job(kind, req, authorization)
        except RequestError as exc:
            self.stats.finished(kind, exc.code or str(exc.status), time.monotonic() - started)
            raise
        streaming = False
        try:
            await self._hold(job)
            if req.stream:
                response = await self._serve_stream(job)
                streaming = True  # the stream settles its hold, and counts itself, when it ends
                return response
            response = await self._serve_plain(job)
            self.stats.finished(kind, "ok" if response.status_code < 400 else "provider_refused",
                                time.monotonic() - started)
            return response
        except RequestError as exc:
            self.stats.finished(kind, exc.code or str(exc.status), time.monotonic() - started)
            raise
        finally:
            if not streaming:
                await self._settle(job)
                self._finish(job)

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
                self._part(cand, "unreachable")
                last_error = exc
                continue
            except PeerRefused as exc:
                if exc.status in (400, 401, 403, 413, 422):  # the request's fault, not the provider's
                    self._part(cand, "rejected")
                    return JSONResponse(exc.body, exc.status)
                self._part(cand, "busy" if exc.status == 429 else "error")  # busy is no failure: try the next
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
            part = await self._receipt_part(job, cand, partial(ReceiptPart.read, answer.agora), tokens=None,
                                            text=_generated_text(job, answer))
            if part is None:
                last_error = RequestError(f"provider {cand.peer} answered without a receipt bound to this request")
                continue
            job.parts.append(part)
            self.routing.succeeded(cand.peer, ttft_s=elapsed, tokens=answer.usage.completion_tokens,
                                        duration_s=elapsed)
            job.used_tokens = answer.usage.total_tokens
            await self._settle(job)
            body["agora"] = self._agora(job)  # the rest of the answer goes to the client as the provider wrote it
            if isinstance(body.get("usage"), dict):
                body["usage"]["cost"] = self._cost(job)
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
                self._part(cand, "unreachable")
            except PeerRefused as exc:
                if exc.status in (400, 401, 403, 413, 422):
                    self._part(cand, "rejected")
                    if not job.body["agora"]["prefix_tokens"]:
                        raise RequestError(str(exc), status=exc.status, code="provider_refused") from exc
                    # A continuation refused: the prefix was checked against the offer before it was sent,
                    # so this is no sign of a broken provider; whoever produced a bad token was blamed then.
                    log.warning("%s refused to continue request %s: %s", cand.url, job.request_id, exc)
                else:
                    self._part(cand, "busy" if exc.status == 429 else "error")  # busy is no failure
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
                                   background=BackgroundTask(self._close, job))

    async def _relay(self, job: _Job, cand: Candidate, stream: PeerStream):
        req = job.req
        want_lp = bool(req.logprobs) if job.kind == "chat" else req.logprobs is not None
        writer = ChunkWriter(kind=job.kind, id=f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                             model=req.model, token_text=None, top_k=req.wanted_top, want_logprobs=want_lp)
        tokens: list[int] = []  # ids of every token whose text the client has been sent
        prompt_tokens, completion_tokens, finish = 0, 0, "length"
        part = _Part(cand, stream)
        outcome = "providers_failed"  # unless the stream reaches its end (or names another error below)
        try:
            if (opening := writer.first()) is not None:
                yield {"data": opening}
            while True:
                cand, stream = part.cand, part.stream
                health = self.routing.of(cand.peer)
                health.in_flight += 1
                started, first_at, part_done, bound = time.monotonic(), None, False, True
                last_at = started
                ttft, itl = self.stats.ttft.labels(cand.model.name), self.stats.itl.labels(cand.model.name)
                vocab = cand.model.vocab_size
                try:
                    async for chunk in stream.chunks():
                        if (error := chunk.error) is not None:
                            raise PeerUnreachable(f"provider failed mid-stream: {error}")
                        part.response_id = part.response_id or chunk.id
                        # Checked before its text is relayed: a bad token is its producer's fault, and must
                        # never become the prefix another provider is asked to continue.
                        if (token := chunk.token) is not None and (
                                token < 0 or (vocab and token >= vocab) or len(tokens) >= job.max_tokens):
                            raise PeerUnreachable(f"sent token {token}, which its offer's vocabulary "
                                                  f"({vocab or 'unknown'}) or max_tokens ({job.max_tokens}) rule out")
                        for text, logprobs, finish_reason in chunk.deltas:
                            if finish_reason:
                                finish = finish_reason
                            part.text += text
                            if (out := writer.relay(text, logprobs if want_lp else None)) is not None:
                                yield {"data": out}
                        if token is not None:
                            tokens.append(token)
                            part.tokens.append(token)
                            now = time.monotonic()
                            if first_at is None:
                                first_at = now
                                ttft.observe(now - started)
                                job.ttft_s = job.ttft_s if job.ttft_s is not None else now - job.started
                            else:
                                itl.observe(now - last_at)
                            last_at = now
                        if (usage := chunk.usage) is not None:
                            prompt_tokens = prompt_tokens or usage.prompt_tokens
                            completion_tokens += usage.completion_tokens
                        if chunk.has_receipt:
                            got = await self._receipt_part(job, cand, chunk.receipt, text=part.text,
                                                           tokens=part.tokens if part.tokens else None)
                            if got is not None:
                                job.parts.append(got)
                            part_done, bound = True, got is not None
                except (PeerUnreachable, ValueError) as exc:  # ValueError: a chunk field of the wrong type
                    log.warning("stream from %s broke after %d tokens: %s", cand.url, len(tokens), exc)
                    self._part(cand, "broken_stream")
                else:
                    if part_done and bound:
                        now = time.monotonic()
                        self.routing.succeeded(cand.peer, ttft_s=(first_at or now) - started,
                                                    tokens=len(part.tokens), duration_s=now - (first_at or now))
                    elif not part_done:
                        self._part(cand, "broken_stream")
                finally:
                    health.in_flight -= 1
                # Not in `finally`: a stream its client cut stays open until its provider signs for it (below).
                await stream.aclose()
                if part_done and bound:
                    break
                if not bound:
                    outcome = "receipt_refused"
                    # What the client was sent is not what the receipt signs: it must not pass for a paid,
                    # verifiable answer, and it cannot be continued (its text is already out).
                    yield {"data": error_chunk(f"{job.refused}; the answer streamed is not paid and should not "
                                               "be trusted; retry the request", code="receipt_refused")}
                    return
                if part.text and not part.tokens:
                    outcome = "provider_failed"
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
                self.stats.failovers.inc()
                job.body = job.body | {"max_tokens": remaining,
                                       "agora": job.body["agora"] | {"prefix_tokens": list(tokens)}}
                opened = await self._open(job)  # the plan already holds only what the preferences allow
                if opened is None:
                    yield {"data": error_chunk(f"the provider failed after {len(tokens)} tokens and no other "
                                               f"provider could continue ({len(job.tried)} tried)",
                                               code="providers_failed")}
                    return
                part = _Part(*opened)
                log.info("continuing request %s on %s after %d tokens", job.request_id, part.cand.url, len(tokens))
            await self._settle(job)
            job.used_tokens = prompt_tokens + completion_tokens
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            gen = Generation(prompt_tokens=prompt_tokens, finish_reason=finish, completion_tokens=completion_tokens)
            self._finish(job)  # counted against its key before the client sees the end, as it is billed
            for out in writer.last(gen, include_usage=include_usage, agora=self._agora(job), cost=self._cost(job)):
                yield {"data": out}
            yield {"data": DONE}
            outcome = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            # The client went away: have the provider sign for what was delivered, then stop it.
            with anyio.move_on_after(self.config.cut_timeout_s, shield=True):
                await self._cut(job, part)
            await part.stream.aclose()
            raise
        finally:
            self._finish(job)  # failed or cancelled: pay what receipts came, refund the rest
            self.stats.finished(job.kind, outcome, time.monotonic() - job.started, job.ttft_s)

    async def _cut(self, job: _Job, part: _Part) -> None:
        """Ask the provider of a stream whose client left for the partial receipt of the tokens relayed;
        when it has finished and signed its full receipt already, read that from the stream instead
        (the provider did the work and cannot know the client left)."""
        assert self.client is not None
        if job.finished or job.parts or not part.tokens or part.response_id is None:
            return  # settled already, or nothing was delivered, or a text-only engine (it cannot sign a part)
        try:
            answer = await self.client.post_json(part.cand.url, f"/agora/v1/streams/{part.response_id}/cut",
                                                 {"delivered": len(part.tokens)})
        except PeerRefused as exc:
            if exc.status == 404:  # finished already: its receipt is on its way
                return await self._drain(job, part)
            log.warning("%s signed no partial receipt for a cut stream of request %s: %s", part.cand.url,
                        job.request_id, exc)
            self.routing.failed(part.cand.peer)
            return
        except PeerError as exc:
            log.warning("%s signed no partial receipt for a cut stream of request %s: %s", part.cand.url,
                        job.request_id, exc)
            self.routing.failed(part.cand.peer)
            return
        got = await self._receipt_part(job, part.cand, partial(ReceiptPart.read, answer), tokens=part.tokens,
                                       text=part.text, cut=True)
        if got is not None:
            job.parts.append(got)
            body = got.receipt.body
            job.used_tokens = body.prompt_tokens + len(body.output_tokens)

    async def _drain(self, job: _Job, part: _Part) -> None:
        """Read the rest of a finished stream whose client left, to pay the full receipt at its end."""
        try:
            async for chunk in part.stream.chunks():
                if (token := chunk.token) is not None:
                    part.tokens.append(token)
                for text, _, _ in chunk.deltas:
                    part.text += text
                if chunk.has_receipt:
                    got = await self._receipt_part(job, part.cand, chunk.receipt, text=part.text, tokens=part.tokens)
                    if got is not None:
                        job.parts.append(got)
                        body = got.receipt.body
                        job.used_tokens = body.prompt_tokens + len(body.output_tokens)
                    return
        except (PeerUnreachable, ValueError) as exc:
            log.warning("the finished stream of request %s from %s broke before its receipt: %s", job.request_id,
                        part.cand.url, exc)

    # -- routes ---------------------------------------------------------------------------------------

    async def providers(self) -> list[dict[str, Any]]:
        """Every live provider discovery knows of, with what this gateway has seen of it."""
        out = []
        now = time.monotonic()
        for rec in await self.discovery.find_offers(None):
            signer = rec.signer
            h = self.routing.seen(signer)
            out.append({"peer": signer, "url": rec.body.url, "models": [m.model_dump() for m in rec.body.models],
                        "healthy": h.healthy(now), "failures": h.failures, "served": h.served,
                        "in_flight": h.in_flight, "ttft_ms": h.ttft_ms, "tokens_per_s": h.tokens_per_s})
        return out

    # -- observability ------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """Dashboard sections: the signed offers it routes over, and how each provider fares here."""
        offers = await self.discovery.find_offers(None)
        return {"offers": [{"cid": str(o.cid), "record": o.to_json()} for o in offers],
                "routing": self.routing_table(offers),
                "health": {"gateway": "ok" if offers else "no live provider offers anything yet"}}

    def routing_table(self, offers: list[Record[OfferBody]], window_s: float = 60.0) -> dict[str, Any]:
        """Every provider this gateway can route to: its offer, state, traffic share, speed and reputation."""
        now = time.monotonic()
        served = sum(t.served for t in self.stats.providers.values()) or 1
        rows = []
        for rec in offers:
            peer, b = rec.signer, rec.body
            h, t = self.routing.of(peer), self.stats.of(peer)
            standing = self.verifiers.standing.get(peer)
            if standing is not None and standing.excluded or self.verifiers.excluded(peer):
                state = "excluded: a verifier holds a fraud proof, window proof or violation"
            elif any(excluded(peer) for excluded in self.routing.exclusions):
                state = "excluded: its transparency log forked"
            elif b.precision != UPSTREAM_PRECISION and b.rule not in RULES:
                state = f"no traffic: it applies sampling rule {b.rule[:80]!r}, which no verifier judges"
            elif b.precision != UPSTREAM_PRECISION and not any(self.verifiers.judgeable(m.cid, b.precision)
                                                                  for m in b.models):
                state = f"no traffic: no verifier holds tolerances for its model at {b.precision}"
            elif not h.healthy(now):
                state = f"cooling down {h.cooldown_until - now:.0f} s after {h.failures} failures"
            else:
                state = "ok"
            rows.append({
                "peer": peer, "url": b.url, "precision": b.precision, "engine": b.engine, "hardware": b.hardware,
                "models": [m.model_dump() for m in b.models], "state": state, "failures": h.failures,
                "in_flight": h.in_flight, "requests": t.requests, "served": t.served, "errors": t.errors,
                "share": round(t.served / served, 4), "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens, "charged": t.charged, "ttft_ms": h.ttft_ms,
                "tokens_per_s": h.tokens_per_s,
                "reputation": None if standing is None else {
                    "verified": standing.verified, "passed": standing.passed, "excluded": standing.excluded,
                    "violations": len(standing.violations)},
            })
        return {"providers": rows, "failovers": self.failovers, "verifiers": list(self.config.verifiers),
                "charges_credits": self.config.charge_credits, "requires_keys": self._requires_keys,
                "latency": self.stats.latency(window_s)}

    @property
    def _requires_keys(self) -> bool:
        return self.config.require_keys or self.config.charge_credits

    def metrics(self) -> dict[str, float]:
        """Flat readings for /metrics and the dashboard's rates (`*_total` are counters)."""
        return {"gateway_prompt_tokens_total": self.stats.prompt_tokens,
                "gateway_completion_tokens_total": self.stats.completion_tokens,
                "gateway_requests_in_flight": sum(h.in_flight for h in self.routing.health.values())}

    def collect_metrics(self):
        return self.stats.collect(self.verifiers.standing)

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

        @r.post("/v1/embeddings")
        async def embeddings() -> Response:
            raise RequestError("embeddings are not offered on Agora: providers sell text generation only "
                               "(/v1/chat/completions, /v1/completions)", status=404, code="embeddings_not_offered")

        @r.get("/agora/v1/providers")
        async def providers() -> dict[str, Any]:
            return {"providers": await self.providers(), "failovers": self.failovers}

        return r
