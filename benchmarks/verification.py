"""Verification attack suite: false rejections, detection per attack, and verification cost, one run.

For each provider precision class the real built-in engine generates honest sequences over the range
the class's tolerances cover (prompts independent of the calibration sets), in three sets:

  short          chat and completion prompts of a few dozen tokens, 64 new tokens
  long prompt    slices of Python source up to the model's context (less 64), 64 new tokens
  long output    source slices up to the context less 256, 256 new tokens

each a quarter one at a time and the rest 16 to a batch (left padding). Attacked receipts claim the
honest model CID, precision and sampling; they are generated for one request set mixing all three
shapes (and, for the top-p attack, one with top-p < 1):

  fix-up int8 / int4        generated with int8 (per row) / int4 (groups of 32) weights, then ONE
                            teacher-forced pass of the real model reports its exact logprobs and top-k
  fix-up noise 1% / 5%      the same with Gaussian weight noise (another checkpoint)
  fix-up bf16 as fp32       (fp32 class only) generated at bf16, fixed up at fp32, declared fp32
  lossy speculative         an int4 draft's token kept whenever the real model's rule score of it is
                            within 0.45 logit of the rule's choice (exact logprobs: nothing to fix up)
  ignored top_p             sampled from the whole vocabulary where top_p 0.9 or 0.5 was asked (T 0.7)
  half temperature          sampled at half the claimed temperature
  random-init model, int8 weights (no fix-up), tampered token, tampered logprob, ignored seed,
  dropped prompt            as before

Every receipt is replayed at the fp32 reference with the given tolerances of its claimed class
(per-position tolerances and the per-sequence test); one outside the calibrated range is refused, not
judged, and counted apart. Detection is reported among attacked outputs that differ from the honest
output of the same request, and the share identical to it (nothing a user could see) apart.

Goals: 0 false rejections among honest sequences; attacks whose output differs detected ≥ 95% at
fp32 and ≥ 90% at bf16; verification ≤ 1/8 of generation for 64 new tokens.

    python benchmarks/verification.py                       # 160 honest per set, 48 per attack, fp32 + bf16
    python benchmarks/verification.py --quick               # 16 per set, 12 per attack
    python benchmarks/verification.py --tolerances FILE     # judge with another tolerances record
    python benchmarks/verification.py --compare OLD.json    # and every receipt also with OLD (before/after)
    python benchmarks/verification.py --precisions fp32 --honest-sets '' --only 'fix-up int8' --attacks 192
                                                            # one attack on more sequences, no honest sets
    python benchmarks/verification.py --engine llamacpp [--quick]   # a GGUF (benchmarks/verification_llamacpp.py)
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
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
from agoranet.engine.base import Generation
from agoranet.engine.models import model_cid, resolve_model
from agoranet.engine.tokenizer import ByteTokenizer
from agoranet.engine.transformers_engine import RECEIPT_TOP_K, TransformersEngine, load_causal_lm
from agoranet.node.calibration import (
    PROMPT_OVERHEAD, HonestRun, fit_context, honest_requests, honest_runs, long_requests, range_requests, receipt_body,
)
from agoranet.node.cheat import CheatingEngine
from agoranet.verify.replay import ReplayJob, ReplayResult, check_receipts
from agoranet.verify.rule import token_scores
from agoranet.verify.tolerances import default_tolerances, load_tolerances, outside_calibration, tolerance_for
from tampering import tamper_logprob, tamper_token  # benchmarks/tampering.py

MODEL_DIR = resolve_model("agora-tiny")[0]
MODEL_CID = model_cid(MODEL_DIR)
TOK = ByteTokenizer.from_dir(MODEL_DIR)
CONTEXT = 1024
SAMPLED = (0.7, 0.8, 1.0)  # attacks on the sampling rule need sampling
ALL_T = (0.0, 0.7, 0.8, 1.0)
TOP_PS = (1.0, 1.0, 0.95, 0.9)
SPEC_MARGIN = 0.45  # logit: what the lossy speculative decoder lets its draft get away with


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




def int4_weights(model: torch.nn.Module, group: int = 32) -> None:
    """Every weight matrix fake-quantized to 4 bits in groups of `group` inputs (as GPTQ/AWQ-style int4 serving)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.shape[1] % group == 0:
                w = p.float().reshape(p.shape[0], -1, group)
                step = w.abs().amax(dim=2, keepdim=True).clamp(min=1e-12) / 7
                p.copy_((torch.round(w / step).clamp(-7, 7) * step).reshape(p.shape).to(p.dtype))


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


@torch.inference_mode()
def fixup(runs: list[HonestRun], real: torch.nn.Module) -> list[HonestRun]:
    """The logprob fix-up: keep the (cheaply generated) tokens, report the real model's logprobs and top-k
    from one teacher-forced pass — what makes logprob checks blind to the cheap generation."""
    out = []
    for r in runs:
        b = r.body
        ids = list(r.prompt) + list(b.prefix_tokens) + list(b.output_tokens)
        logits = real(input_ids=torch.tensor([ids[:-1]])).logits[0].float()
        lps = torch.log_softmax(logits[len(ids) - 1 - len(b.output_tokens):], dim=-1)
        k = max(len(t) for t in b.top_logprobs)
        top_v, top_i = torch.topk(lps, k)
        chosen = lps.gather(1, torch.tensor(b.output_tokens)[:, None])[:, 0].tolist()
        tops = [[TopLogprob(token=t, logprob=v) for t, v in zip(ti, tv)] for ti, tv in zip(top_i.tolist(), top_v.tolist())]
        out.append(replace(r, body=b.model_copy(update={
            "logprobs": chosen, "top_logprobs": tops})))
    return out


@torch.inference_mode()
def lossy_speculative(engine, runs_requests, real: torch.nn.Module, draft: torch.nn.Module, margin: float,
                      tokenizer) -> list[HonestRun]:
    """Speculative decoding that keeps the draft model's token whenever its rule score is within `margin`
    logit of the real model's choice (instead of only when equal); logprobs are the real model's."""
    out = []
    eos = set(tokenizer.eos_tokens)
    for req in runs_requests:
        req = fit_context(engine, req)
        prompt = list(engine.prompt_tokens(req))
        req = replace(req, prompt_ids=tuple(prompt))
        s = req.sampling
        caches = []
        logits_pair = []
        key = "cache" if "cache" in inspect.signature(real.forward).parameters else "past_key_values"
        for m in (real, draft):
            o = m(input_ids=torch.tensor([prompt]), use_cache=True)
            caches.append(o[key])
            logits_pair.append(o.logits[0, -1].float())
        tokens, lps, tops = [], [], []
        finish = "length"
        for pos in range(s.max_tokens):
            kw = dict(temperature=s.temperature, top_p=s.top_p, seed=s.seed, request_id=req.request_id, position=pos)
            real_scores = token_scores(logits_pair[0], **kw)
            draft_token = int(torch.argmax(token_scores(logits_pair[1], **kw)))
            best = int(torch.argmax(real_scores))
            scale = s.temperature if s.temperature > 0 else 1.0
            gap = float(real_scores[best] - real_scores[draft_token]) * scale
            token = draft_token if gap <= margin else best
            lp = torch.log_softmax(logits_pair[0], dim=-1)
            tv, ti = torch.topk(lp, RECEIPT_TOP_K)
            tokens.append(token)
            lps.append(float(lp[token]))
            tops.append(list(zip(ti.tolist(), tv.tolist())))
            if token in eos:
                finish = "stop"
                break
            for j, m in enumerate((real, draft)):
                o = m(input_ids=torch.tensor([[token]]), use_cache=True, **{key: caches[j]})
                caches[j] = o[key]
                logits_pair[j] = o.logits[0, -1].float()
        text = tokenizer.decode([t for t in tokens if t not in eos])
        gen = Generation(prompt_tokens=len(prompt), tokens=tokens, logprobs=lps, top=tops, text=text,
                         finish_reason=finish, completion_tokens=len(tokens))
        body, request_bytes = receipt_body(engine, req, gen)
        out.append(HonestRun(req, prompt, body, request_bytes))
    return out


# -- judging --------------------------------------------------------------------------------------

def judge(reference, runs: list[HonestRun], tol, batch: int = 8) -> list[ReplayResult | str]:
    """Replay receipts as a verifier does: `batch` of them at a time in padded passes (batched replay);
    a receipt outside the calibrated range is refused (its reason, a str) as the verifier node refuses it."""
    results: list[ReplayResult | str] = [why for r in runs if (why := outside_calibration(tol, r.body))]
    inside = [r for r in runs if outside_calibration(tol, r.body) is None]
    for i in range(0, len(inside), batch):
        jobs = [ReplayJob(r.prompt, r.body, tol, r.request_bytes) for r in inside[i:i + batch]]
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


def honest_sets(n: int) -> dict[str, list]:
    """The three honest request sets (independent of the calibration seeds)."""
    return {
        "short": honest_requests(n, seed=9001, model_cid=MODEL_CID, max_tokens=64, temperatures=ALL_T, top_ps=TOP_PS),
        "long prompt": long_requests(n, seed=9002, model_cid=MODEL_CID, max_tokens=64, temperatures=ALL_T,
                                     top_ps=TOP_PS, max_prompt_chars=CONTEXT - 64 - PROMPT_OVERHEAD),
        "long output": long_requests(n, seed=9003, model_cid=MODEL_CID, max_tokens=256, temperatures=ALL_T,
                                     top_ps=TOP_PS, max_prompt_chars=CONTEXT - 256 - PROMPT_OVERHEAD),
    }


def attack_runs(precision: str, n: int, only: frozenset[str] = frozenset()) -> tuple[dict, dict[str, list[int]]]:
    """Every attack's receipts (those named in `only`, when given), and the honest tokens of each request they
    answer."""

    def want(name: str) -> bool:
        return not only or name in only

    reqs = range_requests(n, seed=31337, model_cid=MODEL_CID, context=CONTEXT, max_tokens=256,
                          top_ps=(1.0, 1.0, 0.95, 0.9))
    # top-p attacks where rule v2's nucleus check was measured (T 0.7, top_p 0.9 and 0.5)
    nucleus = range_requests(n, seed=4711, model_cid=MODEL_CID, context=CONTEXT, max_tokens=256, top_ps=(0.9, 0.5))
    nucleus = [replace(r, sampling=replace(r.sampling, temperature=0.7)) for r in nucleus]
    base = run(engine_for(precision), reqs)
    honest_nucleus = run(engine_for(precision), nucleus) if want("ignored top_p") else []
    honest_tokens = {r.body.request: r.body.output_tokens for r in base + honest_nucleus}
    real = load_causal_lm(MODEL_DIR, precision)
    attacks: dict[str, tuple[list[HonestRun], list[int] | None, str]] = {}
    for name, weights in [("int8", int8_weights), ("int4", int4_weights), ("noise 1%", noisy(0.01)),
                          ("noise 5%", noisy(0.05))]:
        if want(f"fix-up {name}"):
            attacks[f"fix-up {name}"] = (fixup(run(engine_for(precision, weights), reqs), real), None, "fix-up")
    if precision == "fp32" and want("fix-up bf16 as fp32"):
        cheap = fixup(run(engine_for("bf16"), reqs), real)
        attacks["fix-up bf16 as fp32"] = ([replace(r, body=r.body.model_copy(update={"precision": "fp32"}))
                                           for r in cheap], None, "fix-up")
    if want("lossy speculative"):
        draft = load_causal_lm(MODEL_DIR, precision)
        int4_weights(draft)
        attacks["lossy speculative"] = (lossy_speculative(engine_for(precision), reqs, real, draft, SPEC_MARGIN, TOK),
                                        None, "rule")
    for name, cheat, requests in (("ignored top_p", "top_p", nucleus), ("half temperature", "temperature", reqs),
                                  ("ignored seed", "seed", reqs)):
        if want(name):
            attacks[name] = (run(engine_for(precision, cheat=cheat), requests), None, "rule")
    if want("random-init model"):
        attacks["random-init model"] = (run(engine_for(precision, random_init), reqs), None, "model swap")
    if want("int8 weights"):
        attacks["int8 weights"] = (run(engine_for(precision, int8_weights), reqs), None, "quantization")
    rng = random.Random(7)
    pairs = tamper_token(base, {TOK.eos}, TOK.decode, rng)
    if want("tampered token"):
        attacks["tampered token"] = ([p[0] for p in pairs], [p[1] for p in pairs], "output edit")
    pairs = tamper_logprob(base, rng)
    if want("tampered logprob"):
        attacks["tampered logprob"] = ([p[0] for p in pairs], [p[1] for p in pairs], "output edit")
    if want("dropped prompt"):
        attacks["dropped prompt"] = (run(engine_for(precision, cheat="prompt"), reqs), None, "prompt")
    return attacks, honest_tokens


def main() -> int:
    if "--engine" in sys.argv and sys.argv[sys.argv.index("--engine") + 1:][:1] == ["llamacpp"]:
        from verification_llamacpp import main as llamacpp_main  # a GGUF replayed by llama.cpp

        return llamacpp_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="transformers", choices=["transformers", "llamacpp"],
                    help="the providers' engine (llamacpp: see benchmarks/verification_llamacpp.py)")
    ap.add_argument("--quick", action="store_true", help="small sets (fp32 and bf16), for a smoke run")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated provider precision classes")
    ap.add_argument("--honest", type=int, default=None, help="honest sequences per set per class (default 160)")
    ap.add_argument("--attacks", type=int, default=None, help="sequences per attack per class (default 48)")
    ap.add_argument("--tolerances", type=Path, default=None, help="tolerances record (default: shipped)")
    ap.add_argument("--compare", type=Path, default=None,
                    help="also judge every receipt with this tolerances record (e.g. the previous one): before/after "
                         "on the very same sequences")
    ap.add_argument("--no-cost", action="store_true", help="skip the cost measurement")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--only", default="", help="comma-separated attack names to run (default: all), e.g. "
                                               "'fix-up int8' with more --attacks for a tighter figure")
    ap.add_argument("--honest-sets", default="short,long prompt,long output",
                    help="comma-separated honest sets to run (none: '')")
    args = ap.parse_args()
    only = frozenset(a.strip() for a in args.only.split(",") if a.strip())
    honest_names = {a.strip() for a in args.honest_sets.split(",") if a.strip()}
    precisions = args.precisions.split(",")
    n_honest = args.honest or (16 if args.quick else 160)
    n_attack = args.attacks or (12 if args.quick else 48)
    torch.set_num_threads(1)  # one thread: on a shared 2-core box torch's 2 threads are many times slower
    record = load_tolerances(args.tolerances) if args.tolerances else default_tolerances(MODEL_CID)
    if record is None:
        print("no tolerances for agora-tiny: run `agora verify calibrate` first", file=sys.stderr)
        return 1
    reference = load_causal_lm(MODEL_DIR, "fp32")
    report: dict = {"model": MODEL_CID, "tolerances": str(record.cid), "classes": {}}
    t_start = time.perf_counter()
    print(f"agora-tiny {MODEL_CID}; receipts replayed at fp32 with tolerances record {record.cid}")

    compare = load_tolerances(args.compare) if args.compare else None
    if compare is not None:
        report["compare"] = {"tolerances": str(compare.cid), "classes": {}}
        print(f"every receipt also judged with tolerances record {compare.cid} ({compare.type}): figures after "
              "'vs' (the same sequences)")
    for precision in precisions:
        tol = tolerance_for(record.body, precision)
        other = tolerance_for(compare.body, precision) if compare is not None else None
        print(f"\n== provider precision {precision}: τ_tok {tol.tok:.4g}  τ_lp {tol.lp:.4g}  τ_top {tol.top:.4g}  "
              f"τ_mass {tol.mass:.4g}; "
              f"per sequence ≤ {tol.seq_flips} flips, flip margins ≤ {tol.seq_flip_margin:.3g}, mean |Δlp| ≤ "
              f"{tol.seq_lp_mean:.3g}; covers prompts ≤ {tol.max_prompt_tokens}, outputs ≤ {tol.max_output_tokens} ==")
        lo = 0
        for b in tol.buckets:
            print(f"   prompts {lo}-{b.max_prompt_tokens}: τ_tok {b.tok:.4g}  τ_lp {b.lp:.4g}  τ_top {b.top:.4g}  "
                  f"τ_mass {b.mass:.4g}; flips ≤ {b.flips_base:.3g} + {b.flips_per_token:.3g}·n, flip margins ≤ "
                  f"{b.margin_base:.3g} + {b.margin_per_token:.3g}·n, mean |Δlp| ≤ {b.lp_mean:.3g} "
                  f"({b.sequences}+{b.confirm_sequences} calibration sequences)")
            lo = b.max_prompt_tokens + 1
        cls: dict = {"tolerances": tol.model_dump(), "honest": {}, "attacks": {}}
        alt: dict = {"honest": {}, "attacks": {}}
        for set_name, reqs in honest_sets(n_honest).items():
            if set_name not in honest_names:
                continue
            t = time.perf_counter()
            honest = run(engine_for(precision), reqs, single_share=0.25)
            results = judge(reference, honest, tol)
            refused = [r for r in results if isinstance(r, str)]
            judged = [r for r in results if not isinstance(r, str)]
            rejected = [r for r in judged if not r.ok]
            cls["honest"][set_name] = {
                "sequences": len(honest), "refused": len(refused), "false_rejections": len(rejected),
                "max_prompt_tokens": max(r.body.prompt_tokens for r in honest),
                "max_output_tokens": max(len(r.body.output_tokens) for r in honest),
                "worst": {"tok": max(r.max_tok for r in judged), "lp": max(r.max_lp for r in judged),
                          "top": max(r.max_top for r in judged), "mass": max(r.max_mass for r in judged),
                          "flips": max(r.flips for r in judged),
                          "flip_margin": max(r.flip_margin for r in judged), "lp_mean": max(r.lp_mean for r in judged)},
            }
            h = cls["honest"][set_name]
            w = h["worst"]
            versus = ""
            if other is not None:
                res2 = judge(reference, honest, other)
                alt["honest"][set_name] = {"sequences": len(honest), "refused": sum(isinstance(r, str) for r in res2),
                                           "false_rejections": sum(not isinstance(r, str) and not r.ok for r in res2)}
                versus = f" (vs {alt['honest'][set_name]['false_rejections']} rejected)"
            print(f"honest {set_name:<12} {len(honest)} sequences (prompts ≤ {h['max_prompt_tokens']}, outputs ≤ "
                  f"{h['max_output_tokens']} tokens; batch 1 and 16): {len(rejected)} rejected{versus}, {len(refused)} "
                  f"refused; worst tok/lp/top/mass {w['tok']:.3g}/{w['lp']:.3g}/{w['top']:.3g}/{w['mass']:.3g}, flips "
                  f"{w['flips']}, flip margins {w['flip_margin']:.3g}, mean |Δlp| {w['lp_mean']:.3g}  "
                  f"[{time.perf_counter() - t:.0f}s]")
            for r in rejected[:3]:
                print(f"   rejected: {r.failure.kind} at {r.failure.position}: {r.failure.detail}")
            for why in refused[:2]:
                print(f"   refused: {why}")

        t = time.perf_counter()
        attacks, honest_tokens = attack_runs(precision, n_attack, only)
        print(f"attacks generated in {time.perf_counter() - t:.0f}s")
        for name, (runs, positions, group) in attacks.items():
            differs = [r.body.output_tokens != honest_tokens.get(r.body.request) or positions is not None for r in runs]
            for target, limits in [(cls, tol), (alt, other)]:
                if limits is None:
                    continue
                res = judge(reference, runs, limits)
                caught = [not isinstance(x, str) and not x.ok for x in res]
                refused = sum(isinstance(x, str) for x in res)
                n_diff = sum(differs)
                det_diff = sum(c for c, d in zip(caught, differs) if d)
                det_same = sum(c for c, d in zip(caught, differs) if not d)
                kinds: dict[str, int] = {}
                for x in res:
                    if not isinstance(x, str) and not x.ok:
                        kinds[x.failure.kind] = kinds.get(x.failure.kind, 0) + 1
                rate = det_diff / n_diff if n_diff else None
                target["attacks"][name] = {"group": group, "sequences": len(runs), "differing": n_diff,
                                           "detected_differing": det_diff, "rate_differing": rate,
                                           "identical_to_honest": len(runs) - n_diff, "detected_identical": det_same,
                                           "refused": refused, "kinds": kinds,
                                           # the largest per-position margin (logit) of each differing output that
                                           # passed: how far its tokens were from the rule's choice
                                           "missed_max_margin": [x.max_tok for x, c, d in zip(res, caught, differs)
                                                                 if d and not c and not isinstance(x, str)]}
            a = cls["attacks"][name]
            shown = "   n/a" if a["rate_differing"] is None else f"{a['rate_differing']:6.1%}"
            versus = ""
            if other is not None and (b := alt["attacks"][name])["rate_differing"] is not None:
                versus = f" (vs {b['detected_differing']}/{b['differing']} {b['rate_differing']:.1%})"
            print(f"  {name:<20} detected {a['detected_differing']:>3}/{a['differing']:<3} differing {shown}{versus}; "
                  f"identical to honest {a['identical_to_honest']}/{a['sequences']} ({a['detected_identical']} of those "
                  f"flagged); refused {a['refused']}  {a['kinds']}")
        goal = 0.95 if precision == "fp32" else 0.90
        cls["below_goal"] = [n for n, a in cls["attacks"].items()
                             if a["rate_differing"] is not None and a["rate_differing"] < goal]
        report["classes"][precision] = cls
        if compare is not None:
            report["compare"]["classes"][precision] = alt

    if not args.no_cost:
        cost = cost_ratio(reference, tolerance_for(record.body, "fp32"), 8 if args.quick else 24)
        report["cost"] = cost
        print(f"\ncost: generating {cost['tokens']:.0f} new tokens (batch 1, fp32) takes {cost['generation_s'] * 1000:.0f} ms, "
              f"verifying them {cost['verification_s'] * 1000:.1f} ms: ratio {cost['ratio']:.3f} (goal ≤ 0.125)")
        print(f"cost, batch of {cost['batch']}: generating them concurrently takes {cost['batch_generation_s'] * 1000:.0f} ms, "
              f"replaying their receipts together {cost['batch_verification_s'] * 1000:.1f} ms: median ratio "
              f"{cost['batch_ratio']:.3f} (goal ≤ {1 / cost['batch']:.3f})")

    print("\nwhat this shows:")
    for precision, cls in report["classes"].items():
        n = sum(h["sequences"] for h in cls["honest"].values())
        fr = sum(h["false_rejections"] for h in cls["honest"].values())
        print(f"  {precision}: {fr} false rejections in {n} honest sequences (goal 0).")
        goal = "95%" if precision == "fp32" else "90%"
        if cls["below_goal"]:
            print(f"  {precision}: below {goal} among differing outputs: {', '.join(cls['below_goal'])}.")
    print("  Never detectable by replay: a token swap whose margin stays within the class's flip allowance,\n"
          "  logprob edits smaller than τ_lp, which tokens sit at the edge of the top-p nucleus (within τ_tok of\n"
          "  it, or where its mass's log-odds is within τ_mass/T), or a cheaper model whose outputs drift no more\n"
          "  than honest hardware of the class does.")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
