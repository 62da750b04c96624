"""Verification cost against generation, for agora-tiny and a ≥ 50M-parameter model, in one run (CPU).

For each model the built-in engine (fp32, one thread) generates 64 new tokens per request, one request at
a time (batch 1) and eight together (batch 8, one engine batch), at temperature 0.8 (top_p 0.95) and 0;
right after each generation the verifier judges the signed receipts exactly as a verifier node does
(`ReplayVerifier.judge`, or `judge_many` for the eight: signature, request binding, prompt re-rendering,
batched teacher-forced replay, the rule's checks, signed verdicts). Generation and verification alternate,
so both see the same machine load; the figure is the median of the per-group ratios verification /
generation. "forward passes alone" times the replay's bare forward passes over the same rows (same packing)
once more: the part of verification no change to the judging can remove (fp32, compute-bound); "at bf16"
times those passes with the model in bfloat16 (AMX on CPUs that have it) — not what verifiers run (the
reference is fp32 and tolerances are calibrated against it), shown as the size of that lever. Goals (issues #15 and #19): ≤ 1/8 for one request, and for the receipts of a batch of 8.

Models:
  agora-tiny   the bundled model (3.2M parameters, byte vocabulary 260), shipped tolerances
  llama-58m    built here, nothing downloaded: tests/realmodel.py's byte-level BPE (vocab 1024) and a
               random-init Llama, 8 layers, hidden 768, 12 heads of 64, MLP 2048 (58M parameters), context 512

The 58M model has no shipped tolerances: the warm-up generations (batch 1 and 8) are replayed measuring
deviations, and the fp32 class gets 4× the worst of them (at least 0.01). That is a stand-in for
`agora verify calibrate`, enough for a cost run (every timed verdict must still pass), not a calibration.

    python benchmarks/verification_cost.py                 # 4 singles + 2 batches of 8 per temperature
    python benchmarks/verification_cost.py --groups 2      # quicker
    python benchmarks/verification_cost.py --profile out.prof   # also cProfile the 58M model's batch-8 judging
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/realmodel.py builds the tokenizer

from agoranet.core.identity import Identity  # noqa: E402
from agoranet.core.records import sign_record  # noqa: E402
from agoranet.engine.models import model_cid, resolve_model  # noqa: E402
from agoranet.engine.transformers_engine import TransformersEngine, load_causal_lm  # noqa: E402
from agoranet.node.calibration import HonestRun, honest_requests, honest_runs  # noqa: E402
from agoranet.node.judge import ReplayVerifier  # noqa: E402
from agoranet.verify.replay import MEASURE, REPLAY_TOKEN_BUDGET, ReplayJob, _replay_logits, check_receipts  # noqa: E402
from agoranet.verify.tolerances import SequenceStats, class_tolerance, tolerances_record  # noqa: E402

NEW_TOKENS = 64
GOAL = 1 / 8
SAMPLING = ((0.8, 0.95), (0.0, 1.0))  # (temperature, top_p)


def build_58m(out: Path) -> Path:
    """tests/realmodel.py's BPE tokenizer and a random-init Llama of 58M parameters, saved in `out`."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.realmodel import build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=12, head_dim=64, max_position_embeddings=512,
        initializer_range=0.05, tie_word_embeddings=False, bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=tok.token_to_id("<|endoftext|>"),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
    return out


def requests_for(cid: str, count: int, seed: int, temperature: float, top_p: float) -> list:
    reqs = honest_requests(count, seed=seed, model_cid=cid, max_tokens=NEW_TOKENS, temperatures=(temperature,),
                           top_ps=(top_p,))
    return [replace(r, sampling=replace(r.sampling, max_tokens=NEW_TOKENS)) for r in reqs]


def stand_in_tolerances(model_dir: Path, cid: str, runs: list[HonestRun], tmp: Path) -> Path:
    """Tolerances for the built model from its warm-up runs (see the module docstring), as a signed record file."""
    reference = load_causal_lm(model_dir, "fp32")
    results = check_receipts(reference, [ReplayJob(r.prompt, r.body, MEASURE, r.request_bytes) for r in runs],
                             model_cid=cid)
    worst = (max(max(r.max_tok, r.max_spread) for r in results), max(r.max_lp for r in results),
             max(r.max_top for r in results), max(r.max_mass for r in results))
    measured = tuple(max(4 * w, 0.01) for w in worst)
    # per-sequence limits 4x the warm-up's too; the range is the whole context (the timed runs draw other prompts)
    context = int(json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings", 2048))
    stats = SequenceStats(flips=[r.flips for r in results], flip_margins=[r.flip_margin for r in results],
                          lp_means=[r.lp_mean for r in results], max_prompt_tokens=context,
                          max_output_tokens=NEW_TOKENS, batch_sizes=(1, 8))
    fp32 = class_tolerance("fp32", worst, worst, sequences=len(runs), confirm_sequences=0, headroom=4.0, floor=0.01,
                           stats=stats)
    path = tmp / "tolerances.json"
    record = tolerances_record(Identity.generate(), cid, [fp32], hardware="this machine, fp32 CPU",
                               method="verification_cost.py stand-in: 4x the worst warm-up deviation")
    path.write_text(json.dumps(record.to_json()))
    print(f"   stand-in fp32 tolerances tok/lp/top/mass {'/'.join(f'{m:.3g}' for m in measured)} "
          f"(worst warm-up {'/'.join(f'{w:.2g}' for w in worst)})")
    return path


def measure(name: str, model_dir: Path, groups: int, tmp: Path, profile: Path | None) -> dict:
    cid = model_cid(model_dir)
    engine = TransformersEngine(model_dir, model_cid=cid, model_name=name, precision="fp32", max_batch=8, threads=1)
    params = sum(p.numel() for p in engine.model.parameters())
    print(f"\n== {name}: {params / 1e6:.1f}M parameters, vocab {engine.vocab_size}, fp32, 1 thread ==")
    provider = Identity.generate()
    report: dict = {"parameters": params, "vocab": engine.vocab_size, "cells": {}}

    async def go() -> None:
        await engine.start()
        try:
            # warm-up (not timed): first passes, and the runs the built model's stand-in tolerances come from
            warm = await honest_runs(engine, requests_for(cid, 2, 11, 0.8, 0.95), 1)
            warm += await honest_runs(engine, requests_for(cid, 8, 12, 0.8, 0.95), 8)
            warm += await honest_runs(engine, requests_for(cid, 8, 13, 0.0, 1.0), 8)
            tol_files = [] if name == "agora-tiny" else [stand_in_tolerances(model_dir, cid, warm, tmp)]
            verifier = ReplayVerifier(Identity.generate(), models=[str(model_dir)], tolerance_files=tol_files,
                                      threads=1)
            verifier.judge_many([(sign_record(provider, r.body), r.request_bytes) for r in warm[:3]])
            bf16 = load_causal_lm(model_dir, "bf16")
            _replay_logits(bf16, [(warm[0].prompt, list(warm[0].body.output_tokens))], REPLAY_TOKEN_BUDGET)
            for temperature, top_p in SAMPLING:
                for batch in (1, 8):
                    count = groups * (1 if batch == 8 else 2) * batch
                    reqs = requests_for(cid, count, 1000 * batch + int(10 * temperature), temperature, top_p)
                    gen, ver, fwd, fwd16, ratios, tokens, rejected = [], [], [], [], [], [], 0
                    for i in range(0, len(reqs), batch):
                        t = time.perf_counter()
                        runs = await honest_runs(engine, reqs[i:i + batch], batch)
                        g = time.perf_counter() - t
                        items = [(sign_record(provider, r.body), r.request_bytes) for r in runs]
                        prof = cProfile.Profile() if profile and batch == 8 and name != "agora-tiny" else None
                        t = time.perf_counter()
                        if prof:
                            prof.enable()
                        judged = verifier.judge_many(items) if batch > 1 else [verifier.judge(*items[0])]
                        v = time.perf_counter() - t
                        if prof:
                            prof.disable()
                            prof.dump_stats(str(profile.with_suffix(f".T{temperature}.prof")))
                        # the bare forward passes of that replay (same rows and packing): the floor of its cost
                        t = time.perf_counter()
                        _replay_logits(verifier._model(cid)[0], [(r.prompt + list(r.body.prefix_tokens),
                                                                   list(r.body.output_tokens)) for r in runs],
                                       REPLAY_TOKEN_BUDGET)
                        fwd.append(time.perf_counter() - t)
                        t = time.perf_counter()  # the same passes at bf16 (AMX where the CPU has it): not a verifier
                        _replay_logits(bf16, [(r.prompt + list(r.body.prefix_tokens), list(r.body.output_tokens))
                                              for r in runs], REPLAY_TOKEN_BUDGET)
                        fwd16.append(time.perf_counter() - t)
                        rejected += sum(not j.verdict.body.ok for j in judged)
                        gen.append(g)
                        ver.append(v)
                        ratios.append(v / g)
                        tokens += [len(r.body.output_tokens) for r in runs]
                    cell = {"batch": batch, "temperature": temperature, "top_p": top_p, "groups": len(gen),
                            "tokens_median": statistics.median(tokens), "generation_s": statistics.median(gen),
                            "verification_s": statistics.median(ver), "ratio": statistics.median(ratios),
                            "forward_s": statistics.median(fwd),
                            "forward_ratio": statistics.median(f / g for f, g in zip(fwd, gen)),
                            "bf16_forward_ratio": statistics.median(f / g for f, g in zip(fwd16, gen)),
                            "rejected": rejected}
                    report["cells"][f"T{temperature}_b{batch}"] = cell
                    ok = "meets" if cell["ratio"] <= GOAL else "MISSES"
                    print(f"   T {temperature} batch {batch}: generation {cell['generation_s'] * 1e3:7.1f} ms, "
                          f"verification {cell['verification_s'] * 1e3:6.1f} ms, ratio {cell['ratio']:.3f} "
                          f"(forward passes alone {cell['forward_ratio']:.3f}, at bf16 {cell['bf16_forward_ratio']:.3f}) "
                          f"({ok} ≤ {GOAL:.3f}; {len(gen)} groups, median {cell['tokens_median']:g} tokens"
                          f"{f', {rejected} REJECTED' if rejected else ''})")
        finally:
            await engine.stop()

    asyncio.run(go())
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=2,
                    help="batches of 8 per temperature (singles: 2× as many requests)")
    ap.add_argument("--models", default="agora-tiny,llama-58m")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile the 58M model's batch-8 judging here")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name in args.models.split(","):
            model_dir = resolve_model("agora-tiny")[0] if name == "agora-tiny" else build_58m(tmp / name)
            report[name] = measure(name, model_dir, args.groups, tmp, args.profile)
    misses = [f"{m} {c}" for m, r in report.items() for c, cell in r["cells"].items() if cell["ratio"] > GOAL]
    rejected = sum(cell["rejected"] for r in report.values() for cell in r["cells"].values())
    print(f"\ngoal verification/generation ≤ {GOAL:.3f} (64 new tokens, batch 1 and 8): "
          + ("met everywhere" if not misses else f"missed in {', '.join(misses)}")
          + f"; honest receipts rejected: {rejected}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if not rejected else 1


if __name__ == "__main__":
    sys.exit(main())
