"""The built-in engine batches concurrent requests without changing what any of them gets."""

import asyncio
from dataclasses import replace

import pytest

from agoranet.engine.base import Generation, GenerationRequest, Sampling, TokenEvent
from agoranet.engine.models import resolve_model
from agoranet.engine.transformers_engine import TransformersEngine


async def generate(engine, i: int, prefix=()) -> Generation:
    req = GenerationRequest(request_id=f"r{i}", kind="completion", prompt="def " + "x" * (3 * i),
                            sampling=Sampling(temperature=0.9, seed=i, max_tokens=16 + i), prefix_tokens=prefix)
    async for ev in engine.generate(req):
        if isinstance(ev, Generation):
            return ev


@pytest.mark.slow
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


async def test_a_non_streamed_request_is_sent_its_first_token_and_the_generation_only():
    """A consumer that reads only the Generation (a non-streamed answer) is not woken for every token, and gets
    exactly what a streamed request gets."""
    engine = TransformersEngine(resolve_model("agora-tiny")[0], model_cid="test", threads=1)
    await engine.start()
    try:
        req = _request(3, 0.8, 20, 24)
        streamed = [ev async for ev in engine.generate(req)]
        quiet = [ev async for ev in engine.generate(replace(req, stream=False))]
    finally:
        await engine.stop()
    a, b = streamed[-1], quiet[-1]
    assert isinstance(a, Generation) and isinstance(b, Generation)
    assert len(streamed) == len(a.tokens) + 1 and len(a.tokens) > 1
    assert [type(ev) for ev in quiet] == [TokenEvent, Generation] and quiet[0] == streamed[0]
    assert (a.tokens, a.text, a.logprobs, a.top, a.finish_reason) == (b.tokens, b.text, b.logprobs, b.top,
                                                                      b.finish_reason)


def _request(i: int, temperature: float, prompt_len: int, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id=f"j{i}", kind="completion", prompt="import os\n" + "y" * prompt_len,
                             sampling=Sampling(temperature=temperature, top_p=0.95, seed=i, max_tokens=max_tokens))


async def _collect(engine, req: GenerationRequest, started: asyncio.Event | None = None, after: int = 0):
    got = 0
    async for ev in engine.generate(req):
        if isinstance(ev, Generation):
            return ev
        got += 1
        if started is not None and got == after:
            started.set()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
async def test_requests_joining_mid_batch_get_what_they_get_alone(temperature):
    """fp32: tokens identical and logprobs equal to 1e-4 whether a request runs alone or joins a running
    batch — with a longer prompt than the batch holds (rows move), chunked prefill, and rows leaving."""
    engine = TransformersEngine(resolve_model("agora-tiny")[0], model_cid="test", threads=1, max_batch=8)
    engine.prefill_chunk = 16  # several chunks for the longer prompts
    await engine.start()
    try:
        long_runner = _request(0, temperature, 3, 48)
        joiners = [_request(i, temperature, 5 + 17 * i, 6 + 3 * i) for i in range(1, 6)]
        alone = [await _collect(engine, r) for r in [long_runner, *joiners]]
        started = asyncio.Event()
        first = asyncio.create_task(_collect(engine, long_runner, started, after=8))
        await started.wait()
        rest = await asyncio.gather(*(_collect(engine, r) for r in joiners))
        together = [await first, *rest]
        assert engine.max_batch_seen >= 4
        for a, b in zip(alone, together):
            assert a.tokens == b.tokens and a.text == b.text
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4
            assert [t for t, _ in a.top[0]] == [t for t, _ in b.top[0]]
        assert engine._cache.cols <= engine.context_length + 1
    finally:
        await engine.stop()
