"""Stub engine for benchmarks and tests: canned byte tokens, emitted as fast as the loop allows.

It measures what everything around an engine costs (HTTP, SSE, receipts, gateways) with the model
taken out. Output is a pure function of the position, so a continuation from `prefix_tokens`
gives exactly what an uninterrupted run would, like the built-in engine's replay rule.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

from agoranet.core.cid import DAG_CBOR, cid_of
from agoranet.core.records import encode_canonical
from agoranet.engine.base import Generation, GenerationRequest, TokenEvent

CANNED = "def add(a, b):\n    return a + b\n\n"


class StubEngine:
    """Not a model: token i of every answer is byte i (mod len) of `text`; never use it to sell inference."""

    name = "stub"
    precision = "stub"

    def __init__(self, *, model_name: str = "stub", text: str = CANNED, token_delay_s: float = 0.0,
                 context_length: int = 4096) -> None:
        self.model_name = model_name
        self.model_cid = str(cid_of(encode_canonical({"stub_model": model_name, "text": text}), DAG_CBOR))
        self.context_length = context_length
        self.vocab_size = 256  # its tokens are bytes
        self._bytes = text.encode("utf-8")
        self._delay = token_delay_s

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def token_text(self, token: int) -> str:
        return bytes([token]).decode("utf-8", errors="backslashreplace")

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """One start token, then the prompt's bytes (message roles are not counted)."""
        text = request.prompt if request.kind == "completion" else "".join(c for _, c in request.messages)
        return [0, *text.encode()]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        prompt_tokens = len(self.prompt_tokens(request))
        start = len(request.prefix_tokens)
        gen = Generation(prompt_tokens=prompt_tokens, finish_reason="length")
        for i in range(request.sampling.max_tokens):
            token = self._bytes[(start + i) % len(self._bytes)]
            text = chr(token)
            gen.tokens.append(token)
            gen.logprobs.append(0.0)
            gen.top.append([(token, 0.0)])
            gen.text += text
            if self._delay:
                await asyncio.sleep(self._delay)
            yield TokenEvent(text=text, token=token, logprob=0.0, top=((token, 0.0),))
        gen.completion_tokens = len(gen.tokens)
        yield gen


class PacedEngine:
    """Another engine with its tokens spaced `delay_s` apart, so a stream lasts long enough to be cut
    (failover tests, demos). Everything but `generate` is the wrapped engine's."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        events = self.inner.generate(replace(request, stream=True))  # every token, to pace each one
        try:
            async for item in events:
                if isinstance(item, TokenEvent):
                    await asyncio.sleep(self.delay_s)
                yield item
        finally:
            await events.aclose()
