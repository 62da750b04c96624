"""TEST AND DEMO FACILITY ONLY: providers that cheat — an engine claiming the honest model, and hostile peers.

`agora provide --cheat KIND` wraps the built-in engine so its receipts still name the honest model
CID, precision and sampling parameters, but the work behind them is not what they claim. Verifiers
must catch every kind; the tests and `agora demo --cheater` use it to show that they do. The hostile
peers (sybil offers, a receipt replayer, a provider streaming an invalid token) attack the gateway's
routing and payments; tests/adversarial and benchmarks/adversarial.py use them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse

from agoranet.core.cid import DAG_PB, cid_of
from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, OfferedModel, sign_record

from agoranet.engine.base import Generation, GenerationRequest, TokenEvent
from agoranet.engine.transformers_engine import TransformersEngine
from agoranet.verify.rules import RULE

log = logging.getLogger(__name__)

CHEATS = {
    "model": "serve a cheaper, different model (weights perturbed by 20% noise) under the honest model's CID",
    "token": "replace the third output token with another byte",
    "logprobs": "report every logprob 1.0 nat more confident than the model's",
    "temperature": "sample at half the requested temperature (0.8 when greedy was asked)",
    "seed": "ignore the requested seed",
    "top_p": "ignore the requested top_p (sample from the whole distribution)",
    "prompt": "drop the first half of the prompt text (cheaper prefill)",
    "near_ties": "at greedy requests, take the runner-up token where it trails the best by 0.04-0.12 logit, at most "
                 "3 times (0.2 logit in all) per answer: steering within bf16's per-sequence flip allowance",
    # Escapes by declaration: receipts (and offer) declare what no verifier can judge.
    "fp16": "declare precision fp16, for which no tolerance record exists (hoping to be unjudgeable)",
    "precision": "declare a made-up precision class",
    "unknown_model": "name a model CID nobody stores (hoping no verifier can replay it)",
    "rule": "name the retired sampling rule agora-gumbel-v1 in receipts and offer (hoping to be judged by its slack)",
}
DECLARED_PRECISION = {"fp16": "fp16", "precision": "fp-whatever"}
UNKNOWN_MODEL = str(cid_of(b"agora: a model nobody stores", DAG_PB))
DECLARED_RULE = "agora-gumbel-v1"
TAMPERED_INDEX = 2
NEAR_TIE_GAP = (0.04, 0.12)  # logit: the runner-up gaps the near_ties cheat takes
NEAR_TIE_FLIPS, NEAR_TIE_BUDGET = 3, 0.2  # per answer: flips and summed gap (bf16's short-prompt limit is ~0.29)


class CheatingEngine:
    """Delegates to an honest TransformersEngine, then cheats as `kind` says."""

    def __init__(self, inner: TransformersEngine, kind: str) -> None:
        if kind not in CHEATS:
            raise ValueError(f"unknown cheat {kind!r}; choose one of {', '.join(CHEATS)}")
        self._inner, self.kind = inner, kind
        if kind in DECLARED_PRECISION:
            self.precision = DECLARED_PRECISION[kind]
        if kind == "unknown_model":
            self.model_cid = UNKNOWN_MODEL
        if kind == "rule":
            self.rule = DECLARED_RULE  # what provider.engine_rule reads: its receipts and offer name it
        log.warning("CHEATING PROVIDER (test/demo facility): %s", CHEATS[kind])
        if kind == "near_ties":
            honest_accept = inner._accept
            spent: dict[int, tuple[int, float]] = {}  # id(sequence) -> (flips taken, their summed gap)

            def steer(seqs: list[Any], logits: torch.Tensor) -> None:
                logits = logits.float().clone()
                for row, seq in enumerate(seqs):
                    taken, gaps = spent.get(id(seq), (0, 0.0)) if seq.tokens else (0, 0.0)
                    if seq.request.sampling.temperature > 0.0 or taken >= NEAR_TIE_FLIPS:
                        continue
                    top = logits[row].topk(2)
                    gap = float(top.values[0] - top.values[1])
                    if NEAR_TIE_GAP[0] <= gap <= NEAR_TIE_GAP[1] and gaps + gap <= NEAR_TIE_BUDGET:
                        # swap the two best logits: the runner-up is chosen and reported with the best's logprob
                        logits[row, top.indices[0]], logits[row, top.indices[1]] = top.values[1], top.values[0]
                        spent[id(seq)] = (taken + 1, gaps + gap)
                honest_accept(seqs, logits)

            inner._accept = steer  # type: ignore[method-assign]
        if kind == "model":
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in inner.model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * p.float().std().to(p.dtype) * 0.2)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    async def start(self) -> None:
        await self._inner.start()

    async def stop(self) -> None:
        await self._inner.stop()

    def _cheated_request(self, request: GenerationRequest) -> GenerationRequest:
        s = request.sampling
        if self.kind == "temperature":
            return replace(request, sampling=replace(s, temperature=s.temperature / 2 if s.temperature > 0 else 0.8))
        if self.kind == "seed":
            return replace(request, sampling=replace(s, seed=s.seed ^ 0x5EED))
        if self.kind == "top_p":
            return replace(request, sampling=replace(s, top_p=1.0))
        if self.kind == "prompt":
            if request.kind == "chat":
                msgs = tuple((role, text[len(text) // 2:]) for role, text in request.messages)
                return replace(request, messages=msgs, prompt_ids=())
            return replace(request, prompt=request.prompt[len(request.prompt) // 2:], prompt_ids=())
        return request

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        honest_prompt_tokens = len(self._inner.prompt_tokens(request))
        tok = self._inner.tokenizer
        async for item in self._inner.generate(self._cheated_request(request)):
            if isinstance(item, Generation):
                item.prompt_tokens = honest_prompt_tokens  # claim the work that was asked for
                if self.kind == "token" and len(item.tokens) > TAMPERED_INDEX:
                    item.tokens[TAMPERED_INDEX] = (item.tokens[TAMPERED_INDEX] + 1) % min(256, tok.vocab_size)
                    item.text = tok.decode([t for t in item.tokens if t not in tok.eos_tokens])
                elif self.kind == "logprobs":
                    item.logprobs = [min(0.0, lp + 1.0) for lp in item.logprobs]
            yield item


# -- hostile peers at the HTTP level: sybils and receipt replayers --------------------------------

HOSTILE = {
    "replay": "answer every request with made-up text and an old honest receipt of its own",
    "cache": "answer with an old honest answer verbatim (text, tokens, receipt): paid again for no work",
    "bad_token": "stream one token outside the model's vocabulary, then drop the connection",
}
MADE_UP = "trust me, this is the answer"


def sybil_records(identity: Identity, url: str, model: OfferedModel, *, ttl_s: float = 60.0,
                  seq: int = 0) -> list[dict[str, Any]]:
    """A validly signed offer of `model` at `url` and a heartbeat keeping it live: what one sybil gossips."""
    from agoranet.net.gossip import HeartbeatBody, now_ms

    now = now_ms()
    offer = sign_record(identity, OfferBody(
        url=url, models=[model], precision="fp32", rule=RULE, max_concurrency=16, hardware="cpu:sybil", engine="sybil",
        issued_ms=now, expires_ms=now + 3_600_000, nonce=secrets.token_hex(8)))
    beat = sign_record(identity, HeartbeatBody(url=url, roles=["provider"], offer=str(offer.cid), seq=seq,
                                               issued_ms=now, expires_ms=now + int(ttl_s * 1000)))
    return [offer.to_json(), beat.to_json()]


def hostile_provider_app(kind: str, *, receipt: dict[str, Any] | None = None) -> FastAPI:
    """A provider that cheats as `kind` says (see HOSTILE); `replay` needs an old `agora` answer field."""
    if kind not in HOSTILE:
        raise ValueError(f"unknown hostile provider {kind!r}; choose one of {', '.join(HOSTILE)}")
    if kind in ("replay", "cache") and receipt is None:
        raise ValueError("a replaying provider needs the `agora` field of an old honest answer")
    app = FastAPI()

    async def answer(request: Request) -> Response:
        req = await request.json()
        chat = "messages" in req
        if not req.get("stream"):
            text = receipt["receipt"]["body"]["output_text"] if kind == "cache" and receipt else MADE_UP
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": text, "finish_reason": "length"})
            return JSONResponse({"id": "cmpl-x", "object": "chat.completion" if chat else "text_completion",
                                 "created": 0, "model": req["model"], "choices": [choice], "agora": receipt,
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        def chunk(text: str, extra: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, str]:
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "finish_reason": finish})
            return {"data": json.dumps({"id": "cmpl-x", "object": "chunk", "created": 0, "model": req["model"],
                                        "choices": [choice], **(extra or {})})}

        async def events():
            if kind == "bad_token":
                yield chunk("x", {"agora": {"token": 1 << 30}})
                await asyncio.sleep(0.05)
                raise ConnectionAbortedError("a sybil dies mid-stream")
            assert receipt is not None
            body = receipt["receipt"]["body"]
            for i, token in enumerate(body["output_tokens"]):
                text = (body["output_text"] if i == 0 else "") if kind == "cache" else MADE_UP[token % len(MADE_UP)]
                yield chunk(text, {"agora": {"token": token}})
            yield chunk("", {"agora": receipt}, finish="length")
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), sep="\n")

    app.add_api_route("/v1/chat/completions", answer, methods=["POST"])
    app.add_api_route("/v1/completions", answer, methods=["POST"])
    return app
