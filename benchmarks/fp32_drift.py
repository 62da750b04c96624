"""Honest fp32 drift between a provider and a verifier on CPU: what the fp32 class's tolerance floor rests on.

An honest fp32 provider and the fp32 verifier run the same weights; their logits differ only by float32
summation order, which changes with what really varies between them: the provider's batch (1, 8 or 16
sequences, left-padded to the longest prompt) and its torch intra-op threads (1, 2 or 4), incremental
decoding with a KV cache against the verifier's one prefill; the verifier replays at 1 thread, one receipt
at a time or 8 together (right-padded rows, shared prompt KV). Prompts up to 960 tokens, outputs up to
256 (`range_requests`: a quarter short prompts, a quarter long prompts with 64 new tokens, half 256 new
tokens), T 0 … 1.3, top-p 1 / 0.95 / 0.8.

For every (provider threads, batch) cell it replays each sequence with MEASURE tolerances (accept
everything, record the deviations) and reports the worst token drift (claimed-token margin and the
drift of any logit difference among listed tokens), |Δlogprob|, top-k deviation, nucleus-mass log-odds
drift, mean |Δlogprob| per sequence and the flips above FLIP_EPS, per verifier mode. The fp32 floor
(`PRECISION_FLOORS` in verify.tolerances) is the headroom times the worst of all cells.

    python benchmarks/fp32_drift.py                         # 40 sequences per cell, 9 cells
    python benchmarks/fp32_drift.py --per 16 --threads 1,4 --batches 1,16 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import torch

from agoranet.engine.models import model_cid, resolve_model
from agoranet.engine.tokenizer import ByteTokenizer
from agoranet.engine.transformers_engine import TransformersEngine, load_causal_lm
from agoranet.node.calibration import honest_runs, range_requests, worst
from agoranet.verify.replay import MEASURE, FLIP_EPS, ReplayJob, check_receipt, check_receipts

MODEL_DIR = resolve_model("agora-tiny")[0]
MODEL_CID = model_cid(MODEL_DIR)
TOK = ByteTokenizer.from_dir(MODEL_DIR)
CONTEXT = 1024
FIELDS = ("tok", "lp", "top", "mass")


def cell(reference, threads: int, batch: int, n: int, seed: int) -> dict:
    reqs = range_requests(n, seed=seed, model_cid=MODEL_CID, context=CONTEXT, max_tokens=256,
                          top_ps=(1.0, 1.0, 0.95, 0.8))
    engine = TransformersEngine(MODEL_DIR, model_cid=MODEL_CID, precision="fp32", max_batch=16, threads=threads)

    async def go():
        await engine.start()
        try:
            return await honest_runs(engine, reqs, batch)
        finally:
            await engine.stop()

    t = time.perf_counter()
    torch.set_num_threads(threads)
    runs = asyncio.run(go())
    gen_s = time.perf_counter() - t
    torch.set_num_threads(1)  # the verifier
    single = [check_receipt(reference, r.prompt, r.body, MEASURE, model_cid=MODEL_CID, request_bytes=r.request_bytes,
                            decode=TOK.decode, eos_token=TOK.eos) for r in runs]
    batched = []
    for i in range(0, len(runs), 8):
        jobs = [ReplayJob(r.prompt, r.body, MEASURE, r.request_bytes) for r in runs[i:i + 8]]
        batched += check_receipts(reference, jobs, model_cid=MODEL_CID, decode=TOK.decode, eos_token=TOK.eos)
    out = {"threads": threads, "batch": batch, "sequences": len(runs), "generation_s": round(gen_s, 1),
           "positions": sum(len(r.body.output_tokens) for r in runs),
           "max_prompt_tokens": max(r.body.prompt_tokens for r in runs),
           "max_output_tokens": max(len(r.body.output_tokens) for r in runs)}
    for mode, results in (("single", single), ("batched", batched)):
        assert all(r.ok for r in results), "a MEASURE replay failed (text or admission), not drift"
        out[mode] = dict(zip(FIELDS, worst(results))) | {
            "lp_mean": max(r.lp_mean for r in results), "flips": sum(r.flips for r in results),
            "max_margin": max(r.max_tok for r in results)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per", type=int, default=40, help="honest sequences per (threads, batch) cell")
    ap.add_argument("--threads", default="1,2,4", help="provider torch intra-op threads")
    ap.add_argument("--batches", default="1,8,16", help="provider batch sizes (left padding)")
    ap.add_argument("--headroom", type=float, default=2.25)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    reference = load_causal_lm(MODEL_DIR, "fp32")
    cells = []
    seed = 5150
    for threads in map(int, args.threads.split(",")):
        for batch in map(int, args.batches.split(",")):
            seed += 17
            c = cell(reference, threads, batch, args.per, seed)
            cells.append(c)
            s, b = c["single"], c["batched"]
            print(f"threads {threads} batch {batch:2d}: {c['sequences']} seq, {c['positions']} positions, prompts ≤ "
                  f"{c['max_prompt_tokens']}, gen {c['generation_s']} s | single tok {s['tok']:.2e} lp {s['lp']:.2e} "
                  f"top {s['top']:.2e} mass {s['mass']:.2e} lp_mean {s['lp_mean']:.1e} flips {s['flips']} | "
                  f"batched tok {b['tok']:.2e} lp {b['lp']:.2e} top {b['top']:.2e} mass {b['mass']:.2e} "
                  f"flips {b['flips']}", flush=True)
    overall = {f: max(max(c["single"][f], c["batched"][f]) for c in cells) for f in (*FIELDS, "lp_mean")}
    floor = args.headroom * max(overall[f] for f in FIELDS)
    print(f"worst over {sum(c['sequences'] for c in cells)} sequences: " + ", ".join(
        f"{f} {v:.3g}" for f, v in overall.items()) + f"; {args.headroom}× the worst of tok/lp/top/mass: {floor:.3g} "
        f"(FLIP_EPS {FLIP_EPS:g})")
    if args.json:
        args.json.write_text(json.dumps({"cells": cells, "worst": overall, "headroom": args.headroom,
                                         "floor": floor}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
