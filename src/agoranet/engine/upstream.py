"""Upstream engine: sell inference from any OpenAI-compatible server a provider already runs
(vLLM, llama.cpp server, Ollama, SGLang, another Agora node).

Such servers return text, not the token ids and full logits replay needs, so receipts from this
engine bind the exact text, sampling parameters and the model the operator names; they are
signed and logged like any other, but only replay-verifiable when the model CID names real weights.

They are billed by the upstream's own token counts (`usage`): streamed with
`stream_options.include_usage`, or, for upstreams whose streams carry no usage (llama-cpp-python's
server), asked unstreamed, which every OpenAI-compatible server answers with `usage`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from agoranet.core.cid import DAG_CBOR, cid_of, parse_cid
from agoranet.core.errors import EngineError, InvalidCID, RequestError
from agoranet.core.records import encode_canonical
from agoranet.engine.base import Generation, GenerationRequest, TokenEvent
from agoranet.wire.openai import (
    Answer, ChatCompletionRequest, CompletionRequest, ModelList, StreamChunk, StreamOptions, error_message,
)
from agoranet.wire.sse import StreamTruncated, sse_payloads

log = logging.getLogger(__name__)

UPSTREAM_ENGINE = "upstream"  # the engine its offers name
UPSTREAM_PRECISION = "upstream"  # the precision class its offers and receipts name: no replayable numerics
UPSTREAM_RULE = "upstream"  # the sampling rule its offers and receipts name: the upstream server's own


def openai_client(base_url: str, api_key: str | None, timeout: float) -> tuple[str, httpx.AsyncClient]:
    """An OpenAI-compatible server's `/v1` base URL (added when `base_url` lacks it) and a client for it, with the
    bearer key when there is one: `timeout` bounds each read (a long answer), connecting takes at most 10 s."""
    url = base_url.rstrip("/")
    url = url if url.endswith("/v1") else url + "/v1"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    return url, httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))


class UpstreamEngine:
    name = UPSTREAM_ENGINE
    precision = UPSTREAM_PRECISION

    def __init__(self, base_url: str, *, model: str, api_key: str | None = None, model_cid: str | None = None,
                 context_length: int = 4096, timeout: float = 300.0) -> None:
        self.base_url, self._client = openai_client(base_url, api_key, timeout)
        self.model_name = model
        self.model_cid = model_cid or _name_cid(model)
        self.context_length = context_length
        self.vocab_size = 0  # the upstream reports text, not token ids
        # Whether the upstream's streams end with a usage chunk; found out by start()'s probe.
        self.usage_in_stream = True

    async def start(self) -> None:
        try:
            r = await self._client.get("/models")
            r.raise_for_status()
        except httpx.HTTPError as exc:
            raise EngineError(f"the upstream server at {self.base_url} does not answer GET /models: {exc}",
                              hint="start it first, or check --upstream") from exc
        try:
            served = [m.id for m in ModelList.model_validate_json(r.content).data]
        except ValueError as exc:
            raise EngineError(f"the upstream server at {self.base_url} answered GET /models with no model list",
                              hint="check that --upstream names an OpenAI-compatible server") from exc
        if served and self.model_name not in served:
            raise EngineError(f"the upstream at {self.base_url} serves {served}, not {self.model_name!r}",
                              hint="pass --upstream-model with one of those names")
        self.usage_in_stream = await self._streams_usage()
        if not self.usage_in_stream:
            log.warning("the upstream at %s sends no usage in streams; asking it unstreamed, so every answer is "
                        "billed by its token counts (clients still get a stream, in one piece)", self.base_url)

    async def _streams_usage(self) -> bool:
        """One 1-token streamed completion: does the upstream end its streams with `usage` when asked?"""
        probe = CompletionRequest(model=self.model_name, prompt="hi", max_tokens=1, stream=True,
                                  stream_options=StreamOptions(include_usage=True))
        try:
            async with self._client.stream("POST", "/completions", json=probe.model_dump(
                    mode="json", exclude_unset=True)) as r:
                if r.status_code >= 400:
                    return True  # no plain completions here: nothing learnt, keep streaming
                return any([StreamChunk.decode(data).usage is not None async for data in sse_payloads(r.aiter_lines())])
        except (httpx.HTTPError, ValueError, StreamTruncated):
            return True

    async def stop(self) -> None:
        await self._client.aclose()

    def token_text(self, token: int) -> str:
        return ""

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        return []  # the upstream renders and tokenizes; it does not say how

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        if request.prefix_tokens:
            raise RequestError("continuing from token ids is not possible through an upstream engine",
                               param="agora.prefix_tokens", code="unsupported")
        s = request.sampling
        fields: dict[str, Any] = {
            "model": self.model_name, "stream": True, "stream_options": {"include_usage": True},
            "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed, "max_tokens": s.max_tokens,
        }
        if s.stop:
            fields["stop"] = list(s.stop)
        upstream_req: ChatCompletionRequest | CompletionRequest
        if request.kind == "chat":
            path = "/chat/completions"
            fields["messages"] = [{"role": r, "content": c} for r, c in request.messages]
            if request.top_logprobs:
                fields |= {"logprobs": True, "top_logprobs": request.top_logprobs}
            upstream_req = ChatCompletionRequest.model_validate(fields)
        else:
            path = "/completions"
            upstream_req = CompletionRequest.model_validate(fields | {"prompt": request.prompt})
        # Only the fields set above are sent (exclude_unset): an upstream gets no defaults it may not know.
        body = upstream_req.model_dump(mode="json", exclude_unset=True)
        gen = Generation(prompt_tokens=0)
        completion_tokens = 0
        if not self.usage_in_stream:
            await self._unstreamed(path, body, request.kind, gen)
            if gen.text:
                yield TokenEvent(text=gen.text)
            yield gen
            return
        try:
            async with self._client.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise _upstream_error(r)
                async for data in sse_payloads(r.aiter_lines()):
                    chunk = StreamChunk.decode(data)
                    if (error := chunk.error) is not None:
                        raise EngineError(f"upstream failed mid-stream: {error}")
                    if (usage := chunk.usage) is not None:
                        gen.prompt_tokens = usage.prompt_tokens
                        completion_tokens = usage.completion_tokens
                    for text, _, finish_reason in chunk.deltas:
                        if text:
                            gen.text += text
                            yield TokenEvent(text=text)
                        if finish_reason:
                            gen.finish_reason = finish_reason
        except StreamTruncated:
            pass  # an upstream that closes without [DONE] has still said all it had (as before the wire module)
        except ValueError as exc:
            raise EngineError(f"the upstream server at {self.base_url} sent a stream chunk that is not one: {exc}",
                              hint="check that --upstream names an OpenAI-compatible server") from exc
        except httpx.HTTPError as exc:
            raise EngineError(f"lost the upstream server at {self.base_url}: {exc}",
                              hint="check that it is running") from exc
        gen.completion_tokens = completion_tokens  # upstreams report counts, not token ids
        yield gen

    async def _unstreamed(self, path: str, body: dict, kind: str, gen: Generation) -> None:
        """Ask for the whole answer at once: unstreamed answers always carry `usage`."""
        body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        try:
            r = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise EngineError(f"lost the upstream server at {self.base_url}: {exc}",
                              hint="check that it is running") from exc
        if r.status_code >= 400:
            raise _upstream_error(r)
        try:
            answer = Answer.model_validate_json(r.content)
        except ValueError as exc:
            raise EngineError(f"the upstream server at {self.base_url} sent an answer that is not one: {exc}",
                              hint="check that --upstream names an OpenAI-compatible server") from exc
        gen.prompt_tokens, gen.completion_tokens = answer.usage.prompt_tokens, answer.usage.completion_tokens
        gen.text, finish = answer.first(kind)  # type: ignore[arg-type]
        gen.finish_reason = finish or gen.finish_reason


def _upstream_error(r: httpx.Response) -> Exception:
    message = None
    try:
        message = error_message(r.json())
    except ValueError:
        pass
    message = message or r.text[:300]
    if 400 <= r.status_code < 500:
        return RequestError(f"upstream refused the request: {message}", status=r.status_code, code="upstream_error")
    return EngineError(f"upstream failed with HTTP {r.status_code}: {message}")


def _name_cid(model: str) -> str:
    """A model named by a CID keeps it; otherwise a stable CID of its name stands in."""
    try:
        return str(parse_cid(model))
    except InvalidCID:
        return str(cid_of(encode_canonical({"upstream_model": model}), DAG_CBOR))
