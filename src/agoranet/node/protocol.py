"""The OpenAI wire schema (requests, responses, SSE chunks, error bodies) shared by every role.

Routes only translate between these models and engine calls; nothing else builds these bodies.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import JSONResponse

from agoranet.core.errors import RequestError
from agoranet.engine.base import Generation, Sampling, TokenEvent

MAX_STOP_SEQUENCES = 4


class _Lenient(BaseModel):
    # Clients send fields we do not implement (frequency_penalty, user, …); ignore them as OpenAI does.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class AgoraExtension(_Lenient):
    """Agora's own request fields: a gateway continuing a generation another provider began."""

    request_id: str | None = Field(default=None, max_length=128)
    prefix_tokens: list[int] = Field(default_factory=list, max_length=1_000_000)
    stream_tokens: bool = False  # put each token's id on its stream chunk, so a gateway can fail over


class MaxPrice(_Lenient):
    """Most a user will pay, in micro-credits per 1M tokens (OpenRouter's `max_price`, in Agora units)."""

    prompt: float | None = Field(default=None, ge=0)
    completion: float | None = Field(default=None, ge=0)


class ProviderPreferences(_Lenient):
    """The OpenRouter-style `provider` object: how a gateway picks providers for one request.

    Providers are named by peer id (`12D3KooW…`) or by URL in `order`, `only` and `ignore`.
    """

    sort: Literal["price", "latency", "throughput"] | None = None
    order: list[str] | None = None
    only: list[str] | None = None
    ignore: list[str] | None = None
    max_price: MaxPrice | None = None
    allow_fallbacks: bool = True
    require_verified: bool = False  # only providers a verifier has checked and found honest


class _SamplingRequest(_Lenient):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)
    agora: AgoraExtension | None = None
    provider: dict[str, Any] | None = None  # routing preferences, read by gateways

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return stops

    def sampling(self, default_max_tokens: int, seed: int) -> Sampling:
        return Sampling(
            temperature=self.temperature, top_p=self.top_p, seed=self.seed if self.seed is not None else seed,
            max_tokens=self.max_tokens or default_max_tokens, stop=tuple(s for s in (self.stop or []) if s),
        )


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def model_post_init(self, _: Any) -> None:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs=true", param="top_logprobs")

    @property
    def wanted_top(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def wanted_top(self) -> int:
        return self.logprobs or 0


# -- responses ------------------------------------------------------------------------------------


class FastJSONResponse(JSONResponse):
    """A JSON answer rendered by pydantic-core (Rust; ~4× json.dumps): the hot routes' response.
    NaN and infinities, which JSON lacks, become null."""

    def render(self, content: Any) -> bytes:
        return pydantic_core.to_json(content, inf_nan_mode="null")


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(gen: Generation) -> dict[str, int]:
    n = gen.completion_tokens
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": n, "total_tokens": gen.prompt_tokens + n}


def _token_entry(token_text, token: int, logprob: float) -> dict[str, Any]:
    text = token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprob_content(token_text, tokens: list[int], logprobs: list[float],
                         tops: list[list[tuple[int, float]]], k: int) -> list[dict[str, Any]]:
    return [
        _token_entry(token_text, t, lp) | {"top_logprobs": [_token_entry(token_text, ti, tl) for ti, tl in top[:k]]}
        for t, lp, top in zip(tokens, logprobs, tops)
    ]


def completion_logprobs(token_text, tokens: list[int], logprobs: list[float],
                        tops: list[list[tuple[int, float]]], k: int, offset: int = 0) -> dict[str, Any]:
    texts = [token_text(t) for t in tokens]
    offsets, pos = [], offset
    for text in texts:
        offsets.append(pos)
        pos += len(text)
    return {
        "tokens": texts, "token_logprobs": logprobs, "text_offset": offsets,
        "top_logprobs": [{token_text(ti): tl for ti, tl in top[:k]} for top in tops],
    }


def chat_response(*, id: str, model: str, created: int, gen: Generation, logprobs: list | None,
                  agora: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0, "message": {"role": "assistant", "content": gen.text},
            "logprobs": {"content": logprobs} if logprobs is not None else None,
            "finish_reason": gen.finish_reason,
        }],
        "usage": usage(gen), "agora": agora,
    }


def completion_response(*, id: str, model: str, created: int, gen: Generation, text: str,
                        logprobs: dict | None, agora: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": gen.finish_reason}],
        "usage": usage(gen), "agora": agora,
    }


class ChunkWriter:
    """Builds the SSE data payloads of one streamed response, in the order the SDK expects."""

    def __init__(self, *, kind: Literal["chat", "completion"], id: str, model: str, token_text, top_k: int,
                 want_logprobs: bool, token_ids: bool = False) -> None:
        self.kind, self.id, self.model, self.token_text = kind, id, model, token_text
        self.top_k, self.want_logprobs, self.token_ids = top_k, want_logprobs, token_ids
        self.created = int(time.time())
        self._started = False

    def _base(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def first(self) -> str | None:
        """Chat streams open with a role-only delta."""
        if self.kind != "chat":
            return None
        return _data(self._base() | {"choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ]})

    def token(self, ev: TokenEvent) -> str | None:
        lp = None
        if self.want_logprobs and ev.token is not None:
            if self.kind == "chat":
                lp = {"content": chat_logprob_content(self.token_text, [ev.token], [ev.logprob],
                                                      [list(ev.top)], self.top_k)}
            else:
                lp = completion_logprobs(self.token_text, [ev.token], [ev.logprob], [list(ev.top)], self.top_k)
        if self.token_ids and ev.token is not None:
            # Every token gets a chunk (even one whose text is held back) so a gateway knows exactly
            # which tokens the text it has forwarded came from.
            return self._choice(ev.text, lp, None, extra={"agora": {"token": ev.token}})
        if not ev.text and lp is None:
            return None
        return self._choice(ev.text, lp, None)

    def relay(self, text: str, logprobs: Any) -> str | None:
        """A content chunk carrying text (and logprobs, already in wire form) another node produced."""
        if not text and logprobs is None:
            return None
        return self._choice(text, logprobs, None)

    def _choice(self, text: str, lp: Any, finish: str | None, extra: dict[str, Any] | None = None) -> str:
        if self.kind == "chat":
            delta = {"content": text} if text or finish is None else {}
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return _data(self._base() | {"choices": [choice]} | (extra or {}))

    def last(self, gen: Generation, *, include_usage: bool, agora: dict[str, Any]) -> list[str]:
        """The finish chunk, then (if asked) the usage chunk; the last one carries the receipt."""
        if not include_usage:
            finish = json.loads(self._choice("", None, gen.finish_reason)) | {"agora": agora}
            return [_data(finish)]
        return [
            self._choice("", None, gen.finish_reason),
            _data(self._base() | {"choices": [], "usage": usage(gen), "agora": agora}),
        ]


def error_chunk(message: str, *, code: str) -> str:
    """An SSE payload that makes the OpenAI SDK raise mid-stream with this message."""
    return _data(error_body(message, type="server_error", code=code))


def _data(payload: dict[str, Any]) -> str:
    # json.dumps(separators=(",", ":"), ensure_ascii=False)'s JSON (exponents may print as 1e-7, not 1e-07)
    # at a fifth of its cost: this runs for every token of every stream, at the provider and the gateway.
    return pydantic_core.to_json(payload, inf_nan_mode="constants").decode()


DONE = "[DONE]"
