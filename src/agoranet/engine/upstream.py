"""Upstream engine: sell inference from any OpenAI-compatible server a provider already runs
(vLLM, llama.cpp server, Ollama, SGLang, another Agora node).

Such servers return text, not the token ids and full logits replay needs, so receipts from this
engine bind the exact text, sampling parameters and the model the operator names; they are
signed and logged like any other, but only replay-verifiable when the model CID names real weights.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from agoranet.core.cid import DAG_CBOR, cid_of, parse_cid
from agoranet.core.errors import EngineError, InvalidCID, RequestError
from agoranet.core.records import encode_canonical
from agoranet.engine.base import Generation, GenerationRequest, TokenEvent


class UpstreamEngine:
    name = "upstream"
    precision = "upstream"

    def __init__(self, base_url: str, *, model: str, api_key: str | None = None, model_cid: str | None = None,
                 context_length: int = 4096, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model_name = model
        self.model_cid = model_cid or _name_cid(model)
        self.context_length = context_length
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                         timeout=httpx.Timeout(timeout, connect=10.0))

    async def start(self) -> None:
        try:
            r = await self._client.get("/models")
            r.raise_for_status()
        except httpx.HTTPError as exc:
            raise EngineError(f"the upstream server at {self.base_url} does not answer GET /models: {exc}",
                              hint="start it first, or check --upstream") from exc
        served = [m.get("id") for m in r.json().get("data", [])]
        if served and self.model_name not in served:
            raise EngineError(f"the upstream at {self.base_url} serves {served}, not {self.model_name!r}",
                              hint="pass --upstream-model with one of those names")

    async def stop(self) -> None:
        await self._client.aclose()

    def token_text(self, token: int) -> str:
        return ""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        if request.prefix_tokens:
            raise RequestError("continuing from token ids is not possible through an upstream engine",
                               param="agora.prefix_tokens", code="unsupported")
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.model_name, "stream": True, "stream_options": {"include_usage": True},
            "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed, "max_tokens": s.max_tokens,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if request.kind == "chat":
            path = "/chat/completions"
            body["messages"] = [{"role": r, "content": c} for r, c in request.messages]
            if request.top_logprobs:
                body |= {"logprobs": True, "top_logprobs": request.top_logprobs}
        else:
            path = "/completions"
            body["prompt"] = request.prompt
        gen = Generation(prompt_tokens=0)
        completion_tokens = 0
        try:
            async with self._client.stream("POST", path, json=body) as r:
                if r.status_code >= 400:
                    await r.aread()
                    raise _upstream_error(r)
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise EngineError(f"upstream failed mid-stream: {chunk['error']}")
                    if chunk.get("usage"):
                        gen.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                        completion_tokens = chunk["usage"].get("completion_tokens", 0)
                    for choice in chunk.get("choices", []):
                        text = choice.get("delta", {}).get("content") if request.kind == "chat" else choice.get("text")
                        if text:
                            gen.text += text
                            yield TokenEvent(text=text)
                        if choice.get("finish_reason"):
                            gen.finish_reason = choice["finish_reason"]
        except httpx.HTTPError as exc:
            raise EngineError(f"lost the upstream server at {self.base_url}: {exc}",
                              hint="check that it is running") from exc
        gen.completion_tokens = completion_tokens  # upstreams report counts, not token ids
        yield gen


def _upstream_error(r: httpx.Response) -> Exception:
    try:
        message = r.json()["error"]["message"]
    except Exception:
        message = r.text[:300]
    if 400 <= r.status_code < 500:
        return RequestError(f"upstream refused the request: {message}", status=r.status_code, code="upstream_error")
    return EngineError(f"upstream failed with HTTP {r.status_code}: {message}")


def _name_cid(model: str) -> str:
    """A model named by a CID keeps it; otherwise a stable CID of its name stands in."""
    try:
        return str(parse_cid(model))
    except InvalidCID:
        return str(cid_of(encode_canonical({"upstream_model": model}), DAG_CBOR))
