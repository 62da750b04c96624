"""Provider role: sells inference from one engine over the OpenAI API, signing a receipt for every answer."""

from __future__ import annotations

import asyncio
import hashlib
import platform
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from fastapi.responses import JSONResponse, StreamingResponse
from sse_starlette.sse import EventSourceResponse

from agoranet.core.errors import AgoraError, RecordError, RequestError
from agoranet.core.identity import Identity
from agoranet.core.tasks import cancel_and_wait
from agoranet.core.records import (
    OfferBody, OfferedModel, PriceCharged, ReceiptBody, ReceiptSummaryBody, Record, SamplingParams,
    decode_canonical, sign_record, token_charge,
)
from agoranet.engine.base import Engine, Generation, GenerationRequest, Sampling, TokenEvent, check_context
from agoranet.engine.upstream import UPSTREAM_ENGINE, UPSTREAM_RULE
from agoranet.net.signed_request import HEADER as SIGNED, request_signer
from agoranet.node.log_role import LogRole
from agoranet.node.app import Cursor, PageSize
from agoranet.node.records_api import records_router
from agoranet.node.state import NodeState
from agoranet.verify.rules import RULE, RULE_DIGEST
from agoranet.wire.openai import (
    ChatCompletionRequest, ChunkWriter, CompletionRequest, ReceiptPart, chat_logprob_content, chat_response,
    completion_logprobs, completion_response, error_body, error_chunk,
)
from agoranet.wire.sse import DONE


@dataclass(frozen=True)
class ProviderConfig:
    public_url: str  # the node's URL
    input_per_mtok: int = 100_000  # micro-credits per 1M input tokens
    output_per_mtok: int = 200_000
    max_concurrency: int = 32  # at least the default --max-batch (32): a full batch must be admissible
    max_tokens: int = 512  # the most a request may ask for
    default_max_tokens: int = 64
    # The range the tolerance record of what it sells was calibrated over (0: none, e.g. an upstream engine):
    # verifiers never replay a receipt beyond it and count one against its provider, so such requests are
    # refused here, up front (offers state the range; gateways route by it).
    max_prompt_tokens: int = 0  # prompt + continued prefix tokens
    max_output_tokens: int = 0
    offer_ttl_s: int = 600
    # Where under the node's URL the provider's whole API is served: the root when it runs alone,
    # "/provider" beside a gateway (which owns /v1 there). Its offers name public_url + path.
    path: str = ""
    # Peer ids whose signed requests (`x-agora-signed`) alone get inference; None serves anyone. Beside a
    # gateway that requires keys it is the node's own id, so no one reaches the engine around the gateway.
    callers: frozenset[str] | None = None
    # A non-streamed answer still generating after this long is sent as 200 with a space every
    # keepalive_s until it is done: under a gateway's stall timeout (10 s by default). Such an answer
    # names its receipt in the body only (the x-agora-receipt header went out before it existed).
    keepalive_s: float = 5.0

    @property
    def url(self) -> str:
        """The URL of the provider's API, the one its offers name (what gateways and verifiers use)."""
        return self.public_url.rstrip("/") + self.path


CUT = "cancelled"  # the finish_reason of a partial receipt: the client left, the stream was cut


@dataclass
class _LiveStream:
    """A stream under way: what its receipt binds, and the token events sent so far."""

    request: GenerationRequest
    request_cid: str
    request_bytes: bytes
    started: int
    events: list[TokenEvent] = field(default_factory=list)
    cut: bool = False  # signed already (partial or full): nothing more is owed


class CutRequest(BaseModel):
    delivered: int = Field(ge=0, description="tokens of the stream the gateway relayed to its client")


def now_ms() -> int:
    return int(time.time() * 1000)


class Provider:
    def __init__(self, identity: Identity, engine: Engine, state: NodeState, config: ProviderConfig,
                 log: LogRole) -> None:
        self.identity, self.engine, self.state, self.config, self.log = identity, engine, state, config, log
        self.active = 0
        self.served = 0
        self.prompt_tokens = 0  # over every receipt signed, for metrics
        self.completion_tokens = 0
        self._offer: Record[OfferBody] | None = None
        self._live: dict[str, _LiveStream] = {}  # streams under way, by response id
        self.router = self._routes()

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()

    # -- offer --------------------------------------------------------------------------------------

    def offer(self) -> Record[OfferBody]:
        """The signed offer, re-signed (and queued for the log) once half its lifetime has passed."""
        now = now_ms()
        ttl = self.config.offer_ttl_s * 1000
        if self._offer is None or now > self._offer.body.issued_ms + ttl // 2:
            e = self.engine
            body = OfferBody(
                url=self.config.url,
                models=[OfferedModel(cid=e.model_cid, name=e.model_name, input_per_mtok=self.config.input_per_mtok,
                                     output_per_mtok=self.config.output_per_mtok, context_length=e.context_length,
                                     vocab_size=e.vocab_size, max_prompt_tokens=self.config.max_prompt_tokens,
                                     max_output_tokens=self.config.max_output_tokens)],
                precision=e.precision, rule=engine_rule(e)[0], max_concurrency=self.config.max_concurrency,
                hardware=hardware_summary(),
                engine=e.name, issued_ms=now, expires_ms=now + ttl, nonce=secrets.token_hex(8),
            )
            offer = sign_record(self.identity, body)
            self.state.put(offer.encode(), "offer")
            self.log.submit(offer)
            self._offer = offer
        return self._offer

    # -- serving ------------------------------------------------------------------------------------

    def _check(self, req: ChatCompletionRequest | CompletionRequest) -> None:
        e = self.engine
        if req.model not in (e.model_name, e.model_cid):
            raise RequestError(f"model {req.model!r} is not served here; this provider serves {e.model_name!r} "
                               f"({e.model_cid})", status=404, code="model_not_found", param="model")
        if req.max_tokens is not None and req.max_tokens > self.config.max_tokens:
            raise RequestError(f"max_tokens is {req.max_tokens}; this provider allows at most {self.config.max_tokens}",
                               param="max_tokens", code="max_tokens_too_large")

    def _check_range(self, req: GenerationRequest) -> None:
        """Refuse a prompt (with any continued prefix) or max_tokens beyond the calibrated range of the tolerance
        record this provider sells under: verifiers would not judge the answer. After the context check (a
        request the model cannot take at all says so first), once the engine has rendered the prompt."""
        c, e = self.config, self.engine
        if not (c.max_prompt_tokens or c.max_output_tokens):
            return
        prompt = len(req.prompt_ids) + len(req.prefix_tokens)
        check_context(e.context_length, len(req.prompt_ids), len(req.prefix_tokens), req.sampling.max_tokens)
        if c.max_prompt_tokens and prompt > c.max_prompt_tokens:
            raise RequestError(f"the prompt is {prompt} tokens, above the calibrated range of this provider's "
                               f"{e.precision} class of {e.model_name!r} ({c.max_prompt_tokens} prompt tokens): "
                               f"verifiers could not judge its answer; shorten it to at most {c.max_prompt_tokens} "
                               "tokens", param="messages" if req.kind == "chat" else "prompt",
                               code="prompt_above_calibrated_range")
        if c.max_output_tokens and req.sampling.max_tokens > c.max_output_tokens:
            raise RequestError(f"max_tokens is {req.sampling.max_tokens}, above the calibrated range of this "
                               f"provider's {e.precision} class of {e.model_name!r} ({c.max_output_tokens} output "
                               f"tokens): verifiers could not judge a longer answer; ask for at most "
                               f"{c.max_output_tokens}", param="max_tokens", code="max_tokens_above_calibrated_range")

    @property
    def default_max_tokens(self) -> int:
        """max_tokens when a request names none: the configured default, within the calibrated range."""
        c = self.config
        return min(c.default_max_tokens, c.max_output_tokens) if c.max_output_tokens else c.default_max_tokens

    async def serve(self, kind: Literal["chat", "completion"], req: ChatCompletionRequest | CompletionRequest) -> Response:
        self._check(req)
        if self.active >= self.config.max_concurrency:
            raise RequestError(f"this provider is busy ({self.active} requests in flight); retry shortly",
                               status=429, code="rate_limited", type="rate_limit_error")
        gen_req = generation_request(kind, req, self.default_max_tokens, self.engine.model_cid)
        gen_req = replace(gen_req, prompt_ids=tuple(self.engine.prompt_tokens(gen_req)))  # receipts bind them
        self._check_range(gen_req)
        response_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        request_bytes = gen_req.canonical(self.engine.model_cid).encode()
        request_cid = str(self.state.put(request_bytes, "request"))
        self.active += 1
        started = now_ms()
        # a non-streamed answer reads only the Generation: the engine may skip the token events in between
        events = self.engine.generate(replace(gen_req, stream=bool(req.stream)))
        try:
            first = await anext(events)  # errors before the first token become a proper 4xx
        except BaseException:
            self.active -= 1
            await events.aclose()
            raise
        if req.stream:
            live = _LiveStream(gen_req, request_cid, request_bytes, started)
            return EventSourceResponse(self._stream(kind, req, response_id, live, first, events), sep="\n", ping=15)
        answer = asyncio.ensure_future(self._answer(kind, req, gen_req, response_id, request_cid, request_bytes, started, first,
                                                  events))
        await asyncio.wait({answer}, timeout=self.config.keepalive_s)
        if answer.done():
            body = answer.result()
            return JSONResponse(body, headers={"x-agora-receipt": body["agora"]["receipt_cid"]})
        # A long generation: commit to 200 now and send a space (JSON's own whitespace) while it runs, so
        # a gateway or client that times out on silence keeps waiting as long as the model keeps working.
        return StreamingResponse(self._keepalive(answer), media_type="application/json")

    async def _keepalive(self, answer: asyncio.Future[dict[str, Any]]) -> AsyncIterator[bytes]:
        try:
            while not (await asyncio.wait({answer}, timeout=self.config.keepalive_s))[0]:
                yield b" "
            try:
                yield JSONResponse(answer.result()).body
            except AgoraError as exc:  # too late for a status code: the OpenAI error body says it failed
                yield JSONResponse(error_body(str(exc), type="server_error", code=type(exc).__name__)).body
        finally:
            await cancel_and_wait(answer)  # the client left: stop the generation too

    async def _answer(self, kind, req, gen_req: GenerationRequest, response_id: str, request_cid: str,
                      request_bytes: bytes, started: int, first: TokenEvent | Generation,
                      events: AsyncIterator[TokenEvent | Generation]) -> dict[str, Any]:
        """The whole non-streamed response body: the rest of the generation, its receipt, the OpenAI fields."""
        try:
            gen = first if isinstance(first, Generation) else None
            async for item in events:
                if isinstance(item, Generation):
                    gen = item
        finally:
            self.active -= 1
            await events.aclose()
        assert gen is not None
        agora = await self._receipt(gen_req, request_cid, request_bytes, gen, started, full=_wants_full(req)) \
            | self._notices(req)
        model = self.engine.model_name
        created = started // 1000
        if kind == "chat":
            lp = chat_logprob_content(self.engine.token_text, gen.tokens, gen.logprobs, gen.top,
                                      req.wanted_top) if req.logprobs else None
            body = chat_response(id=response_id, model=model, created=created, gen=gen, logprobs=lp, agora=agora)
        else:
            lp = completion_logprobs(self.engine.token_text, gen.tokens, gen.logprobs, gen.top,
                                     req.wanted_top) if req.logprobs is not None else None
            text = (req.prompt_text() + gen.text) if req.echo else gen.text
            body = completion_response(id=response_id, model=model, created=created, gen=gen, text=text,
                                       logprobs=lp, agora=agora)
        return body

    async def _stream(self, kind, req, response_id: str, live: _LiveStream, first: TokenEvent | Generation,
                      events: AsyncIterator[TokenEvent | Generation]):
        writer = ChunkWriter(kind=kind, id=response_id, model=self.engine.model_name,
                             token_text=self.engine.token_text, top_k=req.wanted_top,
                             want_logprobs=bool(req.logprobs) if kind == "chat" else req.logprobs is not None,
                             token_ids=bool(req.agora and req.agora.stream_tokens))
        self._live[response_id] = live  # until it ends: a gateway whose client left cuts it (`cut`)
        try:
            if (opening := writer.first()) is not None:
                yield {"data": opening}
            item = first
            while True:
                if isinstance(item, Generation):
                    if live.cut:
                        return
                    live.cut = True  # from here on the full receipt is owed, not a partial one
                    agora = await self._receipt(live.request, live.request_cid, live.request_bytes, item,
                                                live.started, full=_wants_full(req)) | self._notices(req)
                    include_usage = bool(req.stream_options and req.stream_options.include_usage)
                    for chunk in writer.last(item, include_usage=include_usage, agora=agora):
                        yield {"data": chunk}
                    yield {"data": DONE}
                    return
                if (chunk := writer.token(item)) is not None:
                    yield {"data": chunk}
                if item.token is not None:
                    live.events.append(item)  # after its chunk went out: a cut bills only what was sent
                item = await anext(events)
        except AgoraError as exc:
            yield {"data": error_chunk(str(exc), code=type(exc).__name__)}
        finally:
            self._live.pop(response_id, None)
            self.active -= 1
            await events.aclose()

    async def cut(self, response_id: str, delivered: int) -> dict[str, Any]:
        """Stop a stream a gateway's client left, and sign a partial receipt for the `delivered` tokens it
        relayed (never more than this provider sent): a cut stream is paid for what was delivered."""
        live = self._live.get(response_id)
        if live is None or live.cut:
            raise RequestError(f"no stream {response_id!r} is running here (it ended, or was cut already)",
                               status=404, code="stream_not_found", param="response_id")
        if not 0 <= delivered <= len(live.events):
            raise RequestError(f"this stream sent {len(live.events)} tokens, so {delivered} cannot have been "
                               "delivered", param="delivered", code="delivered_out_of_range")
        counter = getattr(self.engine, "prompt_tokens", None)  # engines with token ids render the prompt
        if counter is None:
            raise RequestError("this provider's engine reports no token ids, so it cannot sign a partial receipt",
                               status=409, code="partial_receipt_unsupported")
        live.cut = True
        sent = live.events[:delivered]
        gen = Generation(prompt_tokens=len(counter(live.request)), tokens=[e.token for e in sent],
                         logprobs=[e.logprob for e in sent], top=[list(e.top) for e in sent],
                         text="".join(e.text for e in sent), finish_reason=CUT, completion_tokens=delivered)
        return await self._receipt(live.request, live.request_cid, live.request_bytes, gen, live.started, full=True)

    def _notices(self, req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
        """Why an answer lacks what was asked, where the engine cannot give it (never silently)."""
        wants_logprobs = req.logprobs if isinstance(req, ChatCompletionRequest) else req.logprobs is not None
        if wants_logprobs and self.engine.name == UPSTREAM_ENGINE:
            return {"notice": "logprobs are empty: this provider serves through an upstream engine, which reports "
                              "text, not token ids; route with provider.require_parameters=true to avoid it"}
        return {}

    async def _receipt(self, gen_req: GenerationRequest, request_cid: str, request_bytes: bytes, gen: Generation,
                       started: int, *, full: bool) -> dict[str, Any]:
        """Sign, store and log the receipt (and sign its summary); return the response's `agora` field once it is
        durable: compact (CID, URL, signed summary) unless `full` (the record and canonical request too)."""
        c = self.config
        completion = gen.completion_tokens
        charged = token_charge(gen.prompt_tokens, completion, c.input_per_mtok, c.output_per_mtok)
        body = receipt_body(self.engine, gen_req, request_cid, gen,
                            PriceCharged(input_per_mtok=c.input_per_mtok, output_per_mtok=c.output_per_mtok,
                                         charged=charged),
                            started_ms=started, finished_ms=now_ms())
        record = sign_record(self.identity, body)
        data = record.encode()  # once: the store, the log and the CID all use these bytes
        self.state.put(data, "receipt")
        await self.log.append(data)
        self.served += 1
        self.prompt_tokens += gen.prompt_tokens
        self.completion_tokens += completion
        part = ReceiptPart(record, sign_record(self.identity, ReceiptSummaryBody.of(record)), request_bytes)
        # Full: the canonical request travels with the receipt, so a gateway checks it is the request it sent.
        return part.json if full else part.compact(f"{c.url}/agora/v1/records/{record.cid}")

    # -- observability ------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """Dashboard sections: this provider's signed offer and whether it can take work now."""
        offer = self.offer()
        busy = self.active >= self.config.max_concurrency
        return {
            "offers": [{"cid": str(offer.cid), "record": offer.to_json()}],
            "health": {"provider": f"busy: {self.active}/{self.config.max_concurrency} requests in flight"
                       if busy else "ok"},
        }

    def metrics(self) -> dict[str, float]:
        """Flat readings for /metrics: `*_total` are counters, the rest gauges."""
        e = self.engine
        readings = {
            "receipts_total": self.served, "prompt_tokens_total": self.prompt_tokens,
            "completion_tokens_total": self.completion_tokens, "requests_in_flight": self.active,
            "max_concurrency": self.config.max_concurrency,
        }
        if hasattr(e, "steps"):  # the built-in engine's step-level batching
            readings |= {"engine_steps_total": e.steps, "engine_max_batch_seen": e.max_batch_seen,
                         "engine_batch_size": e.batch_size}
        return readings

    async def _admit(self, request: Request) -> None:
        """Refuse inference to anyone but `callers` (when set): their signature on this very request."""
        if self.config.callers is None:
            return
        signer = request_signer(request.headers.get(SIGNED), request.method, request.url.path, await request.body())
        if signer is None:
            raise RequestError("this provider serves only its node's gateway, which requires an API key: send "
                               "your request to the gateway's /v1 with Authorization: Bearer agk_…",
                               status=401, code="invalid_api_key", type="authentication_error")
        if signer not in self.config.callers:
            raise RequestError(f"{signer} may not use this provider directly", status=403, code="forbidden",
                               type="authentication_error")

    # -- routes -------------------------------------------------------------------------------------

    def _routes(self) -> APIRouter:
        r = APIRouter(prefix=self.config.path)

        @r.get("/v1/models")
        async def models() -> dict[str, Any]:
            e = self.engine
            return {"object": "list", "data": [{
                "id": e.model_name, "object": "model", "created": 0, "owned_by": str(self.identity.peer_id),
                "agora": {"cid": e.model_cid, "precision": e.precision, "engine": e.name},
            }]}

        @r.post("/v1/chat/completions")
        async def chat(req: ChatCompletionRequest, request: Request) -> Response:
            await self._admit(request)
            return await self.serve("chat", req)

        @r.post("/v1/completions")
        async def completions(req: CompletionRequest, request: Request) -> Response:
            await self._admit(request)
            return await self.serve("completion", req)

        @r.post("/agora/v1/streams/{response_id}/cut")
        async def cut(response_id: str, body: CutRequest) -> dict[str, Any]:
            return await self.cut(response_id, body.delivered)

        @r.post("/v1/embeddings")
        async def embeddings() -> Response:
            raise RequestError(f"embeddings are not offered here: this provider serves text generation with "
                               f"{self.engine.model_name!r} only", status=404, code="embeddings_not_offered")

        @r.get("/agora/v1/offer")
        async def offer() -> dict[str, Any]:
            rec = self.offer()
            return {"cid": str(rec.cid), "record": rec.to_json()}

        @r.get("/agora/v1/receipts")
        async def receipts(after: Cursor = 0, limit: PageSize = 100) -> dict[str, Any]:
            """The receipts this node signed, oldest first, for verifiers to audit (`next` is the cursor)."""
            return self.state.feed("receipt", after, limit, "receipts")

        r.include_router(records_router(self.state))  # receipts and the requests they bind
        return r


def _wants_full(req: ChatCompletionRequest | CompletionRequest) -> bool:
    """Whether the answer carries the full receipt: only when asked (agora.receipt=full), as gateways do."""
    return bool(req.agora and req.agora.receipt == "full")


def receipt_body(engine: Engine, req: GenerationRequest, request_cid: str, gen: Generation, price: PriceCharged, *,
                 started_ms: int, finished_ms: int) -> ReceiptBody:
    """What a provider signs for `gen`: the one place receipt bodies are built (calibration uses it too)."""
    s = req.sampling
    rule, digest = engine_rule(engine)
    return ReceiptBody(
        model=engine.model_cid, precision=engine.precision, rule=rule, rule_digest=digest, request=request_cid,
        request_id=req.request_id, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
        prefix_tokens=list(req.prefix_tokens),
        output_tokens=gen.tokens, output_text=gen.text, logprobs=gen.logprobs,
        # plain dicts, validated into TopLogprob by pydantic's core in one pass: half the cost of one
        # TopLogprob(...) call per alternative (~320 per 64-token answer), for the same body
        top_logprobs=[[{"token": t, "logprob": lp} for t, lp in top] for top in gen.top],
        sampling=SamplingParams(temperature=s.temperature, top_p=s.top_p, seed=s.seed, max_tokens=s.max_tokens,
                                stop=list(s.stop)),
        finish_reason=gen.finish_reason, price=price, started_ms=started_ms, finished_ms=finished_ms,
    )


def engine_rule(engine: Engine) -> tuple[str, str]:
    """The sampling rule an engine's tokens are chosen by, and its implementation's digest: Agora's rule for
    every engine that reports token ids, the upstream server's own sampling (never replayed) otherwise (and
    whatever rule a cheating test engine declares as its `rule`)."""
    if engine.name == UPSTREAM_ENGINE:
        return UPSTREAM_RULE, ""
    return getattr(engine, "rule", None) or RULE, RULE_DIGEST


def generation_request(kind: Literal["chat", "completion"], req: ChatCompletionRequest | CompletionRequest,
                       default_max_tokens: int, model_cid: str) -> GenerationRequest:
    """What an OpenAI request asks the engine for: the provider serves it, a gateway checks receipts by it."""
    ext = req.agora
    prefix = tuple(ext.prefix_tokens) if ext else ()
    sampling = Sampling(
        temperature=req.temperature, top_p=req.top_p, seed=req.seed if req.seed is not None else secrets.randbits(63),
        max_tokens=req.max_tokens or default_max_tokens, stop=tuple(s for s in (req.stop or []) if s),
    )
    if kind == "chat":
        assert isinstance(req, ChatCompletionRequest)
        gen_req = GenerationRequest(
            request_id="", kind="chat", sampling=sampling, top_logprobs=req.wanted_top,
            messages=tuple((m.role, m.text()) for m in req.messages), prefix_tokens=prefix,
        )
    else:
        assert isinstance(req, CompletionRequest)
        gen_req = GenerationRequest(
            request_id="", kind="completion", sampling=sampling, top_logprobs=req.wanted_top,
            prompt=req.prompt_text(), prefix_tokens=prefix,
        )
    # The sampling noise is keyed by the request id: a gateway continuing a generation passes the
    # original one; otherwise it is derived from what decides sampling, so the same request with the
    # same seed gives the same answer however it is asked (stream or not, logprobs or not, any provider).
    return replace(gen_req, request_id=(ext.request_id if ext and ext.request_id else derived_request_id(
        gen_req, model_cid)))


def request_mismatch(request_bytes: bytes, expected: GenerationRequest, model_cid: str) -> str | None:
    """Why a receipt's canonical request is not the one `expected` describes, or None when it is.

    Every field the expected request renders must be equal; the provider may add fields (what its
    engine rendered), which the verifier checks by replay."""
    try:
        got = decode_canonical(request_bytes)
    except RecordError as exc:
        return f"the canonical request does not decode: {exc}"
    if not isinstance(got, dict):
        return "the canonical request is not a map"
    want = decode_canonical(expected.canonical(model_cid).encode())
    wrong = [name for name, value in want.items() if got.get(name) != value]
    return f"the canonical request differs in {', '.join(wrong)}" if wrong else None


def derived_request_id(req: GenerationRequest, model_cid: str) -> str:
    """A request id that is a pure function of what decides the sampled tokens: model, prompt, temperature,
    top_p, seed and stop — not max_tokens (it only truncates), logprobs or streaming."""
    key = replace(req, request_id="", sampling=replace(req.sampling, max_tokens=0), top_logprobs=0, prefix_tokens=(),
                  prompt_ids=())
    return "req-" + hashlib.sha256(key.canonical(model_cid).encode()).hexdigest()[:32]


def hardware_summary() -> str:
    import torch  # here, not at the top: gateways import this module and need no torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.machine()}x{torch.get_num_threads()}"
