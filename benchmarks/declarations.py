"""Escape by declaration: every unjudgeable declaration must be counted as a violation (issue #15).

The built-in engine (agora-tiny, fp32) generates honest sequences; each is then re-signed by a provider
key declaring what no verifier can judge, the ways a provider could hope to dodge audit:

  fp16                 precision class fp16 (no tolerance record for agora-tiny)
  made-up precision    a random precision string ("fp8-e4m3", "FP32 ", "", …)
  unknown model        a random model CID no verifier holds and nobody stores
  malformed request    a chat request without messages, bound by CID under the provider's signature
  beyond the context   more tokens than the model's context
  beyond the range     a prompt longer than the class's calibrated range (within the context), which an
                       honest provider refuses up front
  another rule         a sampling rule no verifier judges (the retired agora-gumbel-v1, a made-up one, none)

and the shipped verifier (`ReplayVerifier` with its default tolerances) judges every receipt. Goal:
100% of the declarations counted as signed violation verdicts (failed, excluding the provider), 0
violations and 0 failures among the honest receipts; a violation costs no replay.

    python benchmarks/declarations.py            # 64 honest sequences, each re-declared 7 ways
    python benchmarks/declarations.py --quick    # 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import time

import torch

from agoranet.core.cid import DAG_CBOR, DAG_PB, cid_of
from agoranet.core.identity import Identity
from agoranet.core.records import sign_record
from agoranet.engine.models import model_cid, resolve_model
from agoranet.engine.transformers_engine import TransformersEngine
from agoranet.node.calibration import honest_requests, honest_runs
from agoranet.node.judge import ReplayVerifier
from agoranet.node.reputation import Reputation
from agoranet.wire.canonical import CanonicalRequest

MADE_UP = ["fp8-e4m3", "FP32 ", "", "int4", "bf16-fast", "fp32\x00", "q4_k_m", "tf32"]
OTHER_RULES = ["agora-gumbel-v1", "agora-gumbel-v3", "", "AGORA-GUMBEL-V2", "greedy"]
CONTEXT = 1024  # agora-tiny's


def declarations(run, rng: random.Random) -> dict[str, tuple]:
    """(receipt body, request bytes) re-declared each way, from one honest run."""
    body = run.body
    request = CanonicalRequest.decode(run.request_bytes)
    chat = request.model_copy(update={"kind": "chat", "messages": None, "prompt": None}).encode()
    n = 1 << 20
    return {
        "fp16": (body.model_copy(update={"precision": "fp16"}), run.request_bytes),
        "made-up precision": (body.model_copy(update={"precision": rng.choice(MADE_UP)}), run.request_bytes),
        "unknown model": (body.model_copy(update={"model": str(cid_of(secrets.token_bytes(32), DAG_PB))}),
                          run.request_bytes),
        "malformed request": (body.model_copy(update={"request": str(cid_of(chat, DAG_CBOR))}), chat),
        "beyond the context": (body.model_copy(update={"prompt_tokens": n}), run.request_bytes),
        # the shipped range holds prompts up to 960 tokens; 1024 - 32 still fits the context with 32 outputs
        "beyond the range": (body.model_copy(update={"prompt_tokens": CONTEXT - len(body.output_tokens)}),
                             run.request_bytes),
        "another rule": (body.model_copy(update={"rule": rng.choice(OTHER_RULES)}), run.request_bytes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sequences", type=int, default=None)
    args = ap.parse_args()
    count = args.sequences or (16 if args.quick else 64)
    torch.set_num_threads(1)
    model_dir = resolve_model("agora-tiny")[0]
    cid = model_cid(model_dir)
    engine = TransformersEngine(model_dir, model_cid=cid, threads=1)

    async def generate():
        await engine.start()
        try:
            return await honest_runs(engine, honest_requests(count, seed=11, model_cid=cid, max_tokens=32), 8)
        finally:
            await engine.stop()

    runs = asyncio.run(generate())
    judge = ReplayVerifier(Identity.generate())
    rng = random.Random(5)
    reputation = Reputation()
    honest = {"sequences": 0, "passed": 0, "violations": 0}
    kinds: dict[str, dict[str, float]] = {}
    honest_s = violation_s = 0.0
    for run in runs:
        provider = Identity.generate()
        t = time.perf_counter()
        verdict = judge.judge(sign_record(provider, run.body), run.request_bytes).verdict.body
        honest_s += time.perf_counter() - t
        honest["sequences"] += 1
        honest["passed"] += verdict.ok
        honest["violations"] += verdict.failure is not None and verdict.failure.kind == "violation"
        for kind, (body, request) in declarations(run, rng).items():
            cheat = Identity.generate()
            t = time.perf_counter()
            verdict = judge.judge(sign_record(cheat, body), request).verdict.body
            violation_s += time.perf_counter() - t
            reputation.add_verdict(verdict)
            row = kinds.setdefault(kind, {"declared": 0, "violations": 0, "excluded": 0})
            row["declared"] += 1
            row["violations"] += verdict.failure is not None and verdict.failure.kind == "violation"
            row["excluded"] += reputation.providers[str(cheat.peer_id)].excluded
    declared = sum(r["declared"] for r in kinds.values())
    counted = sum(r["violations"] for r in kinds.values())
    report = {
        "model": "agora-tiny", "precision": "fp32", "max_tokens": 32, "honest": honest,
        "declarations": kinds, "violations_counted": f"{counted}/{declared} ({100 * counted / declared:.1f}%)",
        "ms_per_honest_judgement": round(1000 * honest_s / len(runs), 2),
        "ms_per_violation": round(1000 * violation_s / declared, 3),
    }
    print(json.dumps(report, indent=1))
    ok = counted == declared and honest["violations"] == 0 and honest["passed"] == honest["sequences"]
    print("GOAL MET" if ok else "GOAL MISSED")


if __name__ == "__main__":
    main()
