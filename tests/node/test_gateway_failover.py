"""Mid-stream failover: a provider SIGKILLed while streaming; every client stream still completes with
exactly the text an uninterrupted greedy run gives, continued by the other provider."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from ..conftest import fetch_receipt, provider_process, start_gateway, wait_for

from agoranet.engine.models import resolve_model
from agoranet.engine.tokenizer import ByteTokenizer

TOK = ByteTokenizer.from_dir(resolve_model("agora-tiny")[0])
PROMPTS = [f"write a function that {what}" for what in ("reverses a list", "adds two numbers", "reads a file",
                                                        "sorts a dict", "counts words")]


def start_network(root, *, delay_ms: int, concurrency: int):
    gw_server, gateway = start_gateway(root / "gw", stall_timeout_s=5.0)
    extra = ["--token-delay-ms", str(delay_ms), "--max-batch", str(concurrency), "--max-concurrency", str(concurrency)]
    a = provider_process(root / "a", gw_server.url, price_out=100_000, extra=extra)
    b = provider_process(root / "b", gw_server.url, price_out=400_000, extra=extra)
    for p in (a, b):
        p.wait_ready()
    ids = [httpx.get(f"{p.url}/agora/v1/offer").json()["record"]["signer"] for p in (a, b)]
    wait_for(lambda: set(ids) <= set(gateway.discovery.members()), what="both providers to be discovered")
    return gw_server, gateway, a, b, ids


def greedy(url: str, prompt: str, max_tokens: int) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "agora-tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0})
    return r.json()["choices"][0]["message"]["content"]


async def streams_with_a_kill(gw_url: str, victim, n: int, max_tokens: int) -> list[tuple[str, dict]]:
    """n concurrent greedy streams routed to the cheap provider, which is killed once all are under way."""
    client = openai.AsyncOpenAI(base_url=f"{gw_url}/v1", api_key="unused", max_retries=0, timeout=120)
    seen = [0] * n

    async def one(i: int) -> tuple[str, dict]:
        stream = await client.chat.completions.create(
            model="agora-tiny", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=max_tokens, temperature=0, stream=True, extra_body={"provider": {"sort": "price"}})
        text, agora = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                seen[i] = len(text)
            agora = (chunk.model_extra or {}).get("agora", agora)
        return text, agora

    async def killer() -> None:
        while not all(seen) and max(seen) < max_tokens // 2:
            await asyncio.sleep(0.02)
        victim.kill()

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    kill = asyncio.create_task(killer())
    try:
        results = await asyncio.gather(*tasks)
    finally:
        await kill
        await client.close()
    return results


def check_failover(tmp_path, n: int, max_tokens: int, delay_ms: int) -> None:
    gw_server, gateway, a, b, (id_a, id_b) = start_network(tmp_path, delay_ms=delay_ms, concurrency=max(n, 4))
    try:
        expected = {p: greedy(b.url, p, max_tokens) for p in PROMPTS[:n]}
        results = asyncio.run(streams_with_a_kill(gw_server.url, a, n, max_tokens))
        continued = 0
        for i, (text, agora) in enumerate(results):
            assert text == expected[PROMPTS[i % len(PROMPTS)]], f"stream {i} differs from the greedy run"
            last = fetch_receipt(agora["receipts"][-1]).body  # by CID from the provider that finished it
            # The last part's receipt binds the tokens it continued from, so it covers the whole answer.
            assert TOK.decode(last.prefix_tokens + last.output_tokens) == text
            if last.prefix_tokens:
                continued += 1
                assert agora["provider"] == id_b and len(last.prefix_tokens) < max_tokens
        print(f"{continued} of {n} streams were continued on the second provider")
        assert continued >= 1, "the kill came too late: no stream was cut mid-way"
        assert gateway.failovers >= continued
    finally:
        for p in (a, b):
            p.stop()
        gw_server.stop()


@pytest.mark.slow
def test_provider_killed_mid_stream_streams_complete_with_the_greedy_text(tmp_path):
    check_failover(tmp_path, n=3, max_tokens=40, delay_ms=40)


@pytest.mark.slow
def test_fifty_streams_survive_a_provider_killed_mid_stream(tmp_path):
    check_failover(tmp_path, n=50, max_tokens=48, delay_ms=40)
