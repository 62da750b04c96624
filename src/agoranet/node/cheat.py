"""TEST AND DEMO FACILITY ONLY: a provider engine that cheats while claiming the honest model.

`agora provide --cheat KIND` wraps the built-in engine so its receipts still name the honest model
CID, precision and sampling parameters, but the work behind them is not what they claim. Verifiers
must catch every kind; the tests and `agora demo --cheater` use it to show that they do.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace

import torch

from agoranet.engine.base import Generation, GenerationRequest, TokenEvent
from agoranet.engine.transformers_engine import TransformersEngine

log = logging.getLogger(__name__)

CHEATS = {
    "model": "serve a cheaper, different model (weights perturbed by 20% noise) under the honest model's CID",
    "token": "replace the third output token with another byte",
    "logprobs": "report every logprob 1.0 nat more confident than the model's",
    "temperature": "sample at half the requested temperature (0.8 when greedy was asked)",
    "seed": "ignore the requested seed",
    "prompt": "drop the first half of the prompt text (cheaper prefill)",
}
TAMPERED_INDEX = 2


class CheatingEngine:
    """Delegates to an honest TransformersEngine, then cheats as `kind` says."""

    def __init__(self, inner: TransformersEngine, kind: str) -> None:
        if kind not in CHEATS:
            raise ValueError(f"unknown cheat {kind!r}; choose one of {', '.join(CHEATS)}")
        self._inner, self.kind = inner, kind
        log.warning("CHEATING PROVIDER (test/demo facility): %s", CHEATS[kind])
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
        if self.kind == "prompt":
            if request.kind == "chat":
                msgs = tuple((role, text[len(text) // 2:]) for role, text in request.messages)
                return replace(request, messages=msgs)
            return replace(request, prompt=request.prompt[len(request.prompt) // 2:])
        return request

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        honest_prompt_tokens = len(self._inner.prompt_tokens(request))
        async for item in self._inner.generate(self._cheated_request(request)):
            if isinstance(item, Generation):
                item.prompt_tokens = honest_prompt_tokens  # claim the work that was asked for
                if self.kind == "token" and len(item.tokens) > TAMPERED_INDEX:
                    item.tokens[TAMPERED_INDEX] = (item.tokens[TAMPERED_INDEX] + 1) % 256
                    item.text = self._inner.tokenizer.decode(
                        [t for t in item.tokens if t != self._inner.tokenizer.eos])
                elif self.kind == "logprobs":
                    item.logprobs = [min(0.0, lp + 1.0) for lp in item.logprobs]
            yield item
