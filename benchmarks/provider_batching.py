"""Provider batching: output tokens/s with 8 concurrent requests vs the same 8 sent one after another.

Both arms run in the same process against the same provider (real HTTP, official openai SDK),
on the bundled model; the anchor is the sequential arm. Goal: concurrent ≥ 3× sequential.

    python benchmarks/provider_batching.py [--requests 8] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import openai

from agoranet.core.identity import Identity
from agoranet.node.node import ProviderOptions, build_provider_node
from agoranet.node.server import BackgroundServer, bind, url_of

GOAL = 3.0


async def run_arm(client: openai.AsyncOpenAI, n: int, max_tokens: int, concurrent: bool) -> float:
    async def one(i: int) -> int:
        r = await client.chat.completions.create(
            model="agora-tiny", messages=[{"role": "user", "content": f"request {i}: parse a config file"}],
            max_tokens=max_tokens, temperature=0.8, seed=i)
        return r.usage.completion_tokens

    t0 = time.perf_counter()
    if concurrent:
        tokens = sum(await asyncio.gather(*(one(i) for i in range(n))))
    else:
        tokens = 0
        for i in range(n):
            tokens += await one(i)
    return tokens / (time.perf_counter() - t0)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        Identity.generate().save(home / "identity.key")
        sock = bind()
        app, provider = build_provider_node(home, url_of(sock), ProviderOptions(threads=args.threads),)
        with BackgroundServer(app, sock) as server:
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="bench", max_retries=0)
            await run_arm(client, 2, 8, concurrent=True)  # warm up
            seq, conc = [], []
            for _ in range(args.repeats):
                seq.append(await run_arm(client, args.requests, args.max_tokens, concurrent=False))
                conc.append(await run_arm(client, args.requests, args.max_tokens, concurrent=True))
            await client.close()
            print(f"device: {provider.engine.model.device}, torch threads {__import__('torch').get_num_threads()}, "
                  f"{args.requests} requests × {args.max_tokens} tokens, {args.repeats} repeats")
            print(f"sequential (anchor): median {statistics.median(seq):8.1f} tok/s  runs {[round(x) for x in seq]}")
            print(f"concurrent:          median {statistics.median(conc):8.1f} tok/s  runs {[round(x) for x in conc]}")
            ratio = statistics.median(conc) / statistics.median(seq)
            print(f"ratio concurrent/sequential: {ratio:.2f}× (goal ≥ {GOAL}×: {'met' if ratio >= GOAL else 'NOT met'});"
                  f" largest batch {provider.engine.max_batch_seen}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    asyncio.run(main(ap.parse_args()))
