"""The built-in engine batches concurrent requests without changing what any of them gets."""

import asyncio

import pytest

from agoranet.engine.base import Generation, GenerationRequest, Sampling
from agoranet.engine.models import resolve_model
from agoranet.engine.transformers_engine import TransformersEngine


async def generate(engine, i: int, prefix=()) -> Generation:
    req = GenerationRequest(request_id=f"r{i}", kind="completion", prompt="def " + "x" * (3 * i),
                            sampling=Sampling(temperature=0.9, seed=i, max_tokens=16 + i), prefix_tokens=prefix)
    async for ev in engine.generate(req):
        if isinstance(ev, Generation):
            return ev


async def test_batched_generations_equal_solo_ones():
    engine = TransformersEngine(resolve_model("agora-tiny")[0], model_cid="test", threads=2)
    await engine.start()
    try:
        solo = [await generate(engine, i) for i in range(5)]
        batched = await asyncio.gather(*(generate(engine, i) for i in range(5)))
        assert engine.max_batch_seen >= 3
        for a, b in zip(solo, batched):
            assert a.tokens == b.tokens and a.text == b.text
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
        # A continuation from a prefix of tokens reproduces the rest of the uninterrupted generation.
        full = solo[2]
        rest = await generate(engine, 2, prefix=tuple(full.tokens[:7]))
        assert full.tokens[:7] + rest.tokens[: len(full.tokens) - 7] == full.tokens
    finally:
        await engine.stop()


async def test_stopped_engine_refuses_new_work():
    engine = TransformersEngine(resolve_model("agora-tiny")[0], model_cid="test", threads=1)
    await engine.start()
    await engine.stop()
    with pytest.raises(Exception, match="shutting down"):
        await generate(engine, 0)
