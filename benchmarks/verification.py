"""Verification attack suite: false rejections, detection per attack, and verification cost, one run.

For each provider precision class the real built-in engine generates honest 64-token sequences (a
quarter one at a time, the rest 16 to a batch with left padding; prompts and seeds independent of
the calibration sets) and attacked ones; every receipt is replayed at the fp32 reference with the
shipped tolerances of its claimed class. Attacks claim the honest model CID, precision and sampling:

  random-init model    a different model of the same architecture (untrained)
  noisy weights 5%/1%  the model with Gaussian noise of 5% / 1% of each tensor's std (another checkpoint)
  int8 weights         every weight matrix fake-quantized to int8 per output row (cheaper hardware)
  tampered token       one token replaced by one of the model's own top-5 alternatives, its logprob fixed up
  tampered logprob     one logprob (< -0.5) reported 0.5 nat more confident
  wrong temperature    sampled at half the claimed temperature
  ignored seed         sampled with another seed
  ignored top_p        sampled from the whole distribution where top_p 0.9 or 0.5 was asked (T 0.7)
  dropped prompt       the first half of the prompt text never computed

Targets: 0 false rejections in ≥ 400 honest sequences per class; model swap and output edits ≥ 98%;
wrong temperature / ignored seed ≥ 90%; verification ≤ 1/8 of generation for 64 new tokens, both for one
request and for the receipts of a batch of 8 generated together (replayed together, batched replay).
Every verdict here comes from batched replay (`check_receipts`, 8 receipts per call).

    python benchmarks/verification.py            # full: 400 honest + 100 per attack, per class
    python benchmarks/verification.py --quick    # 48 honest + 16 per attack, fp32 and bf16
    python benchmarks/verification.py --engine llamacpp [--quick]   # a GGUF (benchmarks/verification_llamacpp.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from agoranet.core.records import TopLogprob
from agoranet.engine.models import model_cid, resolve_model
from agoranet.engine.tokenizer import ByteTokenizer
from agoranet.engine.transformers_engine import TransformersEngine, load_causal_lm
from agoranet.node.calibration import HonestRun, honest_requests, honest_runs
from agoranet.node.cheat import CheatingEngine
from agoranet.verify.replay import ReplayJob, check_receipts
from agoranet.verify.tolerances import default_tolerances, load_tolerances, tolerance_for

MODEL_DIR = resolve_model("agora-tiny")[0]
MODEL_CID = model_cid(MODEL_DIR)
TOK = ByteTokenizer.from_dir(MODEL_DIR)
SAMPLED = (0.7, 0.8, 1.0)  # attacks on the sampling rule need sampling
ALL_T = (0.0, 0.7, 0.8, 1.0)
TOP_PS = (1.0, 1.0, 0.95, 0.9)


# -- attacked models ------------------------------------------------------------------------------

def random_init(model: torch.nn.Module) -> None:
    torch.manual_seed(1234)
    other = AutoModelForCausalLM.from_config(model.config)
    model.load_state_dict({k: v.to(model.dtype) for k, v in other.state_dict().items()})


def noisy(scale: float):
    def apply(model: torch.nn.Module) -> None:
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for p in model.parameters():
                p.add_((torch.randn(p.shape, generator=g) * p.float().std() * scale).to(p.dtype))
    return apply


def int8_weights(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                w = p.float()
                step = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
                p.copy_((torch.round(w / step).clamp(-127, 127) * step).to(p.dtype))


# -- generation -----------------------------------------------------------------------------------

def engine_for(precision: str, weights=None, cheat: str | None = None):
    engine = TransformersEngine(MODEL_DIR, model_cid=MODEL_CID, precision=precision, max_batch=16, threads=1)
    if weights is not None:
        weights(engine.model)
    return CheatingEngine(engine, cheat) if cheat else engine


def run(engine, requests, single_share: float = 0.0) -> list[HonestRun]:
    async def go():
        await engine.start()
        try:
            k = int(len(requests) * single_share)
            return await honest_runs(engine, requests[:k], 1) + await honest_runs(engine, requests[k:], 16)
        finally:
            await engine.stop()
    return asyncio.run(go())


def tamper_token(runs: list[HonestRun], rng: random.Random) -> list[tuple[HonestRun, int]]:
    out = []
    for r in runs:
        b = r.body
        i = rng.randrange(len(b.output_tokens) - 1)  # never the final token (keep finish_reason consistent)
        alternatives = [t for t in b.top_logprobs[i] if t.token != b.output_tokens[i] and t.token != TOK.eos]
        new = rng.choice(alternatives)
        tokens, logprobs = list(b.output_tokens), list(b.logprobs)
        tokens[i], logprobs[i] = new.token, new.logprob
        body = b.model_copy(update={"output_tokens": tokens, "logprobs": logprobs,
                                    "output_text": TOK.decode([t for t in tokens if t != TOK.eos])})
        out.append((replace(r, body=body), i))
    return out


def tamper_logprob(runs: list[HonestRun], rng: random.Random) -> list[tuple[HonestRun, int]]:
    out = []
    for r in runs:
        b = r.body
        candidates = [i for i, lp in enumerate(b.logprobs) if lp < -0.5]
        if not candidates:
            continue
        i = rng.choice(candidates)
        logprobs = list(b.logprobs)
        logprobs[i] += 0.5
        tops = [list(t) for t in b.top_logprobs]  # keep the top-k list consistent with the lie
        tops[i] = [TopLogprob(token=t.token, logprob=logprobs[i]) if t.token == b.output_tokens[i] else t
                   for t in tops[i]]
        out.append((replace(r, body=b.model_copy(update={"logprobs": logprobs, "top_logprobs": tops})), i))
    return out


# -- judging --------------------------------------------------------------------------------------

def judge(reference, runs: list[HonestRun], tol, batch: int = 8) -> list:
    """Replay receipts as a verifier does: `batch` of them at a time in padded passes (batched replay)."""
    results = []
    for i in range(0, len(runs), batch):
        jobs = [ReplayJob(r.prompt, r.body, tol, r.request_bytes) for r in runs[i:i + batch]]
        results += check_receipts(reference, jobs, model_cid=MODEL_CID, decode=TOK.decode, eos_token=TOK.eos)
    return results


def cost_ratio(reference, tol, n: int) -> dict[str, float]:
    """Median generation time of 64 new tokens (batch 1, fp32 engine) vs median verification time."""
    requests = honest_requests(n, seed=4242, model_cid=MODEL_CID, max_tokens=64, temperatures=SAMPLED)
    requests = [replace(r, sampling=replace(r.sampling, max_tokens=64)) for r in requests]
    engine = engine_for("fp32")
    gen_times, runs = [], []

    async def go():
        await engine.start()
        try:
            for req in requests:
                t = time.perf_counter()
                runs.extend(await honest_runs(engine, [req], 1))
                gen_times.append(time.perf_counter() - t)
        finally:
            await engine.stop()
    asyncio.run(go())
    ver_times = []
    for r in runs:
        t = time.perf_counter()
        judge(reference, [r], tol)
        ver_times.append(time.perf_counter() - t)
    tokens = statistics.median(len(r.body.output_tokens) for r in runs)
    g, v = statistics.median(gen_times), statistics.median(ver_times)
    return {"generation_s": g, "verification_s": v, "ratio": v / g, "tokens": tokens} | batch_cost_ratio(reference, tol, n)


def batch_cost_ratio(reference, tol, n: int, batch: int = 8) -> dict[str, float]:
    """Generating `batch` requests concurrently (one engine batch) vs replaying their receipts together."""
    requests = honest_requests(n, seed=4343, model_cid=MODEL_CID, max_tokens=64, temperatures=SAMPLED)
    requests = [replace(r, sampling=replace(r.sampling, max_tokens=64)) for r in requests]
    groups = [requests[i:i + batch] for i in range(0, len(requests) - batch + 1, batch)]
    engine = engine_for("fp32")
    ratios, gen_times, ver_times = [], [], []

    async def generate(group):
        t = time.perf_counter()
        runs = await honest_runs(engine, group, batch)
        return runs, time.perf_counter() - t

    async def go():
        await engine.start()
        try:
            for group in groups:  # interleaved: generate a batch, verify it, next batch
                runs, g = await generate(group)
                t = time.perf_counter()
                verdicts = judge(reference, runs, tol, batch)
                v = time.perf_counter() - t
                assert all(x.ok for x in verdicts), "an honest receipt was rejected in the cost run"
                gen_times.append(g)
                ver_times.append(v)
                ratios.append(v / g)
        finally:
            await engine.stop()
    asyncio.run(go())
    return {"batch": batch, "batch_generation_s": statistics.median(gen_times),
            "batch_verification_s": statistics.median(ver_times), "batch_ratio": statistics.median(ratios)}


def main() -> int:
    if "--engine" in sys.argv and sys.argv[sys.argv.index("--engine") + 1:][:1] == ["llamacpp"]:
        from verification_llamacpp import main as llamacpp_main  # a GGUF replayed by llama.cpp

        return llamacpp_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="transformers", choices=["transformers", "llamacpp"],
                    help="the providers' engine (llamacpp: see benchmarks/verification_llamacpp.py)")
    ap.add_argument("--quick", action="store_true", help="small sets (fp32 and bf16), for a smoke run")
    ap.add_argument("--precisions", default=None, help="comma-separated provider precision classes")
    ap.add_argument("--honest", type=int, default=None, help="honest sequences per class (default 400)")
    ap.add_argument("--attacks", type=int, default=None, help="sequences per attack per class (default 100)")
    ap.add_argument("--tolerances", type=Path, default=None, help="tolerances record (default: shipped)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    precisions = (args.precisions or ("fp32,bf16" if args.quick else "fp32,bf16,fp16")).split(",")
    n_honest = args.honest or (48 if args.quick else 400)
    n_attack = args.attacks or (16 if args.quick else 100)
    torch.set_num_threads(1)  # one thread: on a shared 2-core box torch's 2 threads are many times slower
    record = load_tolerances(args.tolerances) if args.tolerances else default_tolerances(MODEL_CID)
    if record is None:
        print("no tolerances for agora-tiny: run `agora verify calibrate` first", file=sys.stderr)
        return 1
    reference = load_causal_lm(MODEL_DIR, "fp32")
    rng = random.Random(7)
    report: dict = {"model": MODEL_CID, "tolerances": str(record.cid), "classes": {}}
    t_start = time.perf_counter()
    print(f"agora-tiny {MODEL_CID}; receipts replayed at fp32 with tolerances record {record.cid}")

    for precision in precisions:
        tol = tolerance_for(record.body, precision)
        print(f"\n== provider precision {precision}: τ_tok {tol.tok:.4g}  τ_lp {tol.lp:.4g}  τ_top {tol.top:.4g}  "
              f"τ_mass {tol.mass:.4g} ==")
        honest_reqs = honest_requests(n_honest, seed=9001, model_cid=MODEL_CID, max_tokens=64,
                                      temperatures=ALL_T, top_ps=TOP_PS)
        t = time.perf_counter()
        honest = run(engine_for(precision), honest_reqs, single_share=0.25)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        results = judge(reference, honest, tol)
        rejected = [r for r in results if not r.ok]
        cls: dict = {"tolerances": {"tok": tol.tok, "lp": tol.lp, "top": tol.top},
                     "honest": {"sequences": len(honest), "false_rejections": len(rejected),
                                "frr": len(rejected) / len(honest),
                                "worst": [max(r.max_tok for r in results), max(r.max_lp for r in results),
                                          max(r.max_top for r in results)]},
                     "attacks": {}}
        print(f"honest: {len(honest)} sequences (batch 1 and 16, left padding), {len(rejected)} rejected "
              f"(FRR {len(rejected) / len(honest):.2%}); worst honest deviations tok/lp/top "
              f"{cls['honest']['worst'][0]:.3g}/{cls['honest']['worst'][1]:.3g}/{cls['honest']['worst'][2]:.3g}"
              f"  [gen {gen_s:.0f}s, verify {time.perf_counter() - t:.0f}s]")
        for r in rejected[:3]:
            print(f"   rejected: {r.failure.kind} at {r.failure.position}: {r.failure.detail}")

        attack_reqs = honest_requests(n_attack, seed=31337, model_cid=MODEL_CID, max_tokens=64, temperatures=ALL_T,
                                      top_ps=TOP_PS)
        sampled_reqs = honest_requests(n_attack, seed=4711, model_cid=MODEL_CID, max_tokens=64, temperatures=SAMPLED,
                                       top_ps=TOP_PS)
        nucleus_reqs = honest_requests(n_attack, seed=5151, model_cid=MODEL_CID, max_tokens=64, temperatures=(0.7,),
                                       top_ps=(0.9, 0.5))
        base = run(engine_for(precision), attack_reqs)
        base_sampled = run(engine_for(precision), sampled_reqs)
        base_nucleus = run(engine_for(precision), nucleus_reqs)
        honest_tokens = {r.body.request: r.body.output_tokens for r in base + base_sampled + base_nucleus}
        attacks: dict[str, tuple[list[HonestRun], list[int] | None, str]] = {
            "random-init model": (run(engine_for(precision, random_init), attack_reqs), None, "model swap"),
            "noisy weights 5%": (run(engine_for(precision, noisy(0.05)), attack_reqs), None, "model swap"),
            "noisy weights 1%": (run(engine_for(precision, noisy(0.01)), attack_reqs), None, "model swap"),
            "int8 weights": (run(engine_for(precision, int8_weights), attack_reqs), None, "quantization"),
        }
        pairs = tamper_token(base, rng)
        attacks["tampered token"] = ([p[0] for p in pairs], [p[1] for p in pairs], "output edit")
        pairs = tamper_logprob(base, rng)
        attacks["tampered logprob"] = ([p[0] for p in pairs], [p[1] for p in pairs], "output edit")
        attacks["wrong temperature"] = (run(engine_for(precision, cheat="temperature"), sampled_reqs), None, "sampling")
        attacks["ignored seed"] = (run(engine_for(precision, cheat="seed"), sampled_reqs), None, "sampling")
        attacks["ignored top_p"] = (run(engine_for(precision, cheat="top_p"), nucleus_reqs), None, "sampling")
        attacks["dropped prompt"] = (run(engine_for(precision, cheat="prompt"), attack_reqs), None, "prompt")
        for name, (runs, positions, group) in attacks.items():
            res = judge(reference, runs, tol)
            detected = sum(not r.ok for r in res)
            at_position = None if positions is None else sum(
                (not r.ok) and r.failure.position == p for r, p in zip(res, positions))
            kinds: dict[str, int] = {}
            for r in res:
                if not r.ok:
                    kinds[r.failure.kind] = kinds.get(r.failure.kind, 0) + 1
            # an attack whose tokens came out exactly as the honest run's changed nothing a user sees
            same = sum(r.body.output_tokens == honest_tokens.get(r.body.request) for r in runs) if positions is None else 0
            cls["attacks"][name] = {"group": group, "sequences": len(runs), "detected": detected,
                                    "rate": detected / len(runs), "at_edited_position": at_position,
                                    "same_tokens_as_honest": same, "kinds": kinds}
            where = "" if at_position is None else f", {at_position} at the edited position"
            print(f"  {name:<18} detected {detected:>4}/{len(runs):<4} {detected / len(runs):7.1%}{where}"
                  f"  [{same} produced the honest tokens exactly]  {kinds}")
        cls["not_detectable"] = [name for name, a in cls["attacks"].items() if a["rate"] < 0.9]
        report["classes"][precision] = cls

    cost = cost_ratio(reference, tolerance_for(record.body, "fp32"), 8 if args.quick else 24)
    report["cost"] = cost
    print(f"\ncost: generating {cost['tokens']:.0f} new tokens (batch 1, fp32) takes {cost['generation_s'] * 1000:.0f} ms, "
          f"verifying them {cost['verification_s'] * 1000:.1f} ms: ratio {cost['ratio']:.3f} (goal ≤ 0.125)")
    print(f"cost, batch of {cost['batch']}: generating them concurrently takes {cost['batch_generation_s'] * 1000:.0f} ms, "
          f"replaying their receipts together {cost['batch_verification_s'] * 1000:.1f} ms: median ratio "
          f"{cost['batch_ratio']:.3f} (goal ≤ {1 / cost['batch']:.3f})")

    print("\nwhat this shows:")
    for precision, cls in report["classes"].items():
        frr = cls["honest"]
        print(f"  {precision}: {frr['false_rejections']} false rejections in {frr['sequences']} honest sequences.")
        if cls["not_detectable"]:
            print(f"  {precision}: NOT detectable (below 90%): {', '.join(cls['not_detectable'])}.")
    print("  Always undetectable by replay: token swaps between candidates whose scores differ by less than τ_tok,\n"
          "  logprob edits smaller than τ_lp, and which tokens sit at the edge of the top-p nucleus: within τ_tok of\n"
          "  it, or where its mass's log-odds is within τ_mass/T. A provider may always run a cheaper model\n"
          "  whose outputs stay within its class's tolerances: bf16/fp16 tolerances accept any deviation of that size.")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
