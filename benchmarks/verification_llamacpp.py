"""Verification attack suite for the llama.cpp engine (`benchmarks/verification.py --engine llamacpp`).

A locally built BPE-tokenizer Llama (tests/realmodel.py: 2 layers, hidden 128, vocab 1024, random
init) is written as a Q8_0 GGUF, the file a provider serves; its declared precision class is
`gguf-q8_0`. Tolerances are calibrated for that class exactly as `agora verify calibrate --engine
llamacpp` does (the provider's engine, `LlamaCppEngine`, against replays of the same file by
`GGUFModel`), on sets independent of the ones judged here. Every receipt is then replayed by a
verifier holding the same GGUF, 8 receipts per `check_receipts` call (batched replay). Attacks claim the
honest file's CID, class and sampling:

  other weights        a model of the same shape and tokenizer with other random weights (Q8_0)
  noisy weights 1%     the model with Gaussian noise of 1% of each tensor's std (Q8_0)
  Q4_0 for Q8_0        the same weights quantized to Q4_0 (cheaper), sold as the Q8_0 file
  tampered token       one token replaced by one of the model's own top-5 alternatives, its logprob fixed up
  tampered logprob     one logprob (< -0.5) reported 0.5 nat more confident
  wrong temperature    sampled at half the claimed temperature
  ignored seed         sampled with another seed
  dropped prompt       the first half of the prompt text never computed

Goals (#14): 0 false rejections in ≥ 200 honest sequences; model swap and output edits ≥ 98%; the cost
of verification vs generation is reported. One llama.cpp thread throughout (a shared 2-core box).

    python benchmarks/verification.py --engine llamacpp            # 200 honest + 100 per attack
    python benchmarks/verification.py --engine llamacpp --quick    # 48 honest + 16 per attack
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/realmodel.py builds the model

from agoranet.engine.llamacpp_engine import GGUFModel, LlamaCppEngine  # noqa: E402
from agoranet.engine.models import model_cid  # noqa: E402
from agoranet.node.calibration import HonestRun, calibrate_precision, honest_requests, honest_runs  # noqa: E402
from agoranet.node.cheat import CheatingEngine  # noqa: E402
from agoranet.verify.replay import ReplayJob, check_receipts  # noqa: E402
from tampering import tamper_logprob, tamper_token  # noqa: E402  (benchmarks/tampering.py)
from tests.realmodel import build_model, write_gguf  # noqa: E402

SAMPLED = (0.7, 0.8, 1.0)
ALL_T = (0.0, 0.7, 0.8, 1.0)
TOP_PS = (1.0, 1.0, 0.95, 0.9)
MAX_TOKENS = 64


def noisy_copy(model_dir: Path, out: Path, scale: float) -> Path:
    """`model_dir` with Gaussian noise of `scale` × each tensor's std added to every weight."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    rng = np.random.default_rng(99)
    weights = load_file(str(model_dir / "model.safetensors"))
    save_file({k: (v + rng.standard_normal(v.shape).astype(v.dtype) * v.std() * scale).astype(v.dtype)
               for k, v in weights.items()}, str(out / "model.safetensors"))
    return out


def run(engine, requests: list) -> list[HonestRun]:
    return asyncio.run(honest_runs(engine, requests, 1))


def judge(reference: GGUFModel, cid: str, runs: list[HonestRun], tol, batch: int = 8) -> list:
    results = []
    for i in range(0, len(runs), batch):
        jobs = [ReplayJob(r.prompt, r.body, tol, r.request_bytes) for r in runs[i:i + batch]]
        results += check_receipts(reference, jobs, model_cid=cid, decode=reference.decode,
                                  eos_token=reference.eos_tokens)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="llamacpp", choices=["llamacpp"])
    ap.add_argument("--quick", action="store_true", help="small sets, for a smoke run")
    ap.add_argument("--honest", type=int, default=None, help="honest sequences (default 200)")
    ap.add_argument("--attacks", type=int, default=None, help="sequences per attack (default 100)")
    ap.add_argument("--calibrate", type=int, default=None, help="calibration and confirmation sequences, each (default 200)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    n_honest = args.honest or (48 if args.quick else 200)
    n_attack = args.attacks or (16 if args.quick else 100)
    n_cal = args.calibrate or (48 if args.quick else 200)
    torch.set_num_threads(1)  # as llama.cpp: one thread on a shared 2-core box
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="agora-llamacpp-bench-"))
    try:
        model_dir = build_model(work / "tiny-bpe-llama")
        q8 = write_gguf(model_dir, work / "tiny-q8_0.gguf", "Q8_0")
        cid = model_cid(q8)
        other_q8 = write_gguf(build_model(work / "other", seed=1), work / "other-q8_0.gguf", "Q8_0")
        noisy_q8 = write_gguf(noisy_copy(model_dir, work / "noisy", 0.01), work / "noisy-q8_0.gguf", "Q8_0")
        q4 = write_gguf(model_dir, work / "tiny-q4_0.gguf", "Q4_0")

        def engine(path: Path = q8, cheat: str | None = None):
            e = LlamaCppEngine(path, model_cid=cid, model_name="tiny-q8_0", threads=1)
            e.precision = "gguf-q8_0"  # every attacker claims the honest file's class
            return CheatingEngine(e, cheat) if cheat else e  # type: ignore[arg-type]

        reference = GGUFModel(q8, threads=1, all_logits=True)
        precision = reference.precision
        t = time.perf_counter()
        tol = asyncio.run(calibrate_precision(q8, cid, precision, reference, sequences=n_cal, confirm=n_cal,
                                              max_tokens=MAX_TOKENS, seed=1, engine=engine(),
                                              headroom=2.25))  # llama.cpp's honest tail is heavy, like bf16's
        print(f"{q8.name} ({q8.stat().st_size // 1024} KiB, {cid}); class {precision}; llama-cpp-python "
              f"{__import__('llama_cpp').__version__}")
        print(f"calibrated on {tol.sequences} + confirmed on {tol.confirm_sequences} sequences of {MAX_TOKENS} tokens "
              f"[{time.perf_counter() - t:.0f}s]: τ_tok {tol.tok:.4g}  τ_lp {tol.lp:.4g}  τ_top {tol.top:.4g}")
        report: dict = {"engine": "llamacpp", "model": cid, "precision": precision, "max_tokens": MAX_TOKENS,
                        "tolerances": {"tok": tol.tok, "lp": tol.lp, "top": tol.top, "calibration": tol.sequences,
                                       "confirmation": tol.confirm_sequences}}

        honest_reqs = honest_requests(n_honest, seed=9001, model_cid=cid, max_tokens=MAX_TOKENS, temperatures=ALL_T,
                                      top_ps=TOP_PS)
        t = time.perf_counter()
        honest = run(engine(), honest_reqs)
        gen_s = time.perf_counter() - t
        t = time.perf_counter()
        results = judge(reference, cid, honest, tol)
        ver_s = time.perf_counter() - t
        rejected = [r for r in results if not r.ok]
        worst = [max(r.max_tok for r in results), max(r.max_lp for r in results), max(r.max_top for r in results)]
        tokens = sum(len(r.body.output_tokens) for r in honest)
        report["honest"] = {"sequences": len(honest), "tokens": tokens, "false_rejections": len(rejected),
                            "worst": worst, "generation_s": gen_s, "verification_s": ver_s}
        print(f"honest: {len(honest)} sequences ({tokens} tokens), {len(rejected)} rejected; worst honest deviations "
              f"tok/lp/top {worst[0]:.3g}/{worst[1]:.3g}/{worst[2]:.3g}  [gen {gen_s:.1f}s, verify {ver_s:.1f}s]")
        for r in rejected[:3]:
            print(f"   rejected: {r.failure.kind} at {r.failure.position}: {r.failure.detail}")

        rng = random.Random(7)
        attack_reqs = honest_requests(n_attack, seed=31337, model_cid=cid, max_tokens=MAX_TOKENS, temperatures=ALL_T,
                                      top_ps=TOP_PS)
        sampled_reqs = honest_requests(n_attack, seed=4711, model_cid=cid, max_tokens=MAX_TOKENS,
                                       temperatures=SAMPLED, top_ps=TOP_PS)
        base = run(engine(), attack_reqs)
        honest_tokens = {r.body.request: r.body.output_tokens for r in base + run(engine(), sampled_reqs)}
        attacks: dict[str, tuple[list[HonestRun], list[int] | None, str]] = {
            "other weights": (run(engine(other_q8), attack_reqs), None, "model swap"),
            "noisy weights 1%": (run(engine(noisy_q8), attack_reqs), None, "model swap"),
            "Q4_0 for Q8_0": (run(engine(q4), attack_reqs), None, "model swap"),
        }
        pairs = tamper_token(base, reference.eos_tokens, reference.decode, rng)
        attacks["tampered token"] = ([p[0] for p in pairs], [p[1] for p in pairs], "output edit")
        pairs = tamper_logprob(base, rng)
        attacks["tampered logprob"] = ([p[0] for p in pairs], [p[1] for p in pairs], "output edit")
        attacks["wrong temperature"] = (run(engine(cheat="temperature"), sampled_reqs), None, "sampling")
        attacks["ignored seed"] = (run(engine(cheat="seed"), sampled_reqs), None, "sampling")
        attacks["dropped prompt"] = (run(engine(cheat="prompt"), attack_reqs), None, "prompt")
        report["attacks"] = {}
        for name, (runs, positions, group) in attacks.items():
            res = judge(reference, cid, runs, tol)
            detected = sum(not r.ok for r in res)
            at_position = None if positions is None else sum(
                (not r.ok) and r.failure.position == p for r, p in zip(res, positions))
            kinds: dict[str, int] = {}
            for r in res:
                if not r.ok:
                    kinds[r.failure.kind] = kinds.get(r.failure.kind, 0) + 1
            same = sum(r.body.output_tokens == honest_tokens.get(r.body.request) for r in runs) if positions is None else 0
            report["attacks"][name] = {"group": group, "sequences": len(runs), "detected": detected,
                                       "rate": detected / len(runs), "at_edited_position": at_position,
                                       "same_tokens_as_honest": same, "kinds": kinds}
            where = "" if at_position is None else f", {at_position} at the edited position"
            print(f"  {name:<18} detected {detected:>4}/{len(runs):<4} {detected / len(runs):7.1%}{where}"
                  f"  [{same} produced the honest tokens exactly]  {kinds}")

        # cost: one request at a time (the engine serves one sequence at a time), 64 new tokens
        cost_reqs = [replace(r, sampling=replace(r.sampling, max_tokens=MAX_TOKENS)) for r in honest_requests(
            8 if args.quick else 24, seed=4242, model_cid=cid, max_tokens=MAX_TOKENS, temperatures=SAMPLED)]
        gen_times, ver_times, runs = [], [], []
        e = engine()
        for req in cost_reqs:
            t = time.perf_counter()
            runs += run(e, [req])
            gen_times.append(time.perf_counter() - t)
        fwd_times = []
        for r in runs:
            t = time.perf_counter()
            assert judge(reference, cid, [r], tol)[0].ok
            ver_times.append(time.perf_counter() - t)
            t = time.perf_counter()  # the replay's llama.cpp pass alone, without the rule's per-position checks
            reference(torch.tensor([list(r.prompt) + list(r.body.output_tokens[:-1])]))
            fwd_times.append(time.perf_counter() - t)
        batch_gen, batch_ver = [], []
        for i in range(0, len(runs) - 7, 8):
            batch_gen.append(sum(gen_times[i:i + 8]))
            t = time.perf_counter()
            judge(reference, cid, runs[i:i + 8], tol)
            batch_ver.append(time.perf_counter() - t)
        g, v = statistics.median(gen_times), statistics.median(ver_times)
        report["cost"] = {"tokens": statistics.median(len(r.body.output_tokens) for r in runs), "generation_s": g,
                          "verification_s": v, "ratio": v / g, "replay_forward_s": statistics.median(fwd_times), "batch8_generation_s": statistics.median(batch_gen),
                          "batch8_verification_s": statistics.median(batch_ver),
                          "batch8_ratio": statistics.median(batch_ver) / statistics.median(batch_gen)}
        c = report["cost"]
        print(f"\ncost: generating {c['tokens']:.0f} new tokens takes {g * 1000:.1f} ms, verifying them "
              f"{v * 1000:.1f} ms: ratio {v / g:.3f}; 8 receipts replayed together {c['batch8_verification_s'] * 1000:.1f}"
              f" ms vs {c['batch8_generation_s'] * 1000:.0f} ms to generate them: ratio {c['batch8_ratio']:.3f}")
        print(f"      of one verification, llama.cpp's replay pass takes {c['replay_forward_s'] * 1000:.1f} ms "
              f"(ratio {c['replay_forward_s'] / g:.3f}); the rest is the rule's per-position checks in torch, which "
              f"dominate for a model this small")
        report["total_s"] = time.perf_counter() - t_start
        print(f"total {report['total_s']:.0f}s")
        if args.json:
            args.json.write_text(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
