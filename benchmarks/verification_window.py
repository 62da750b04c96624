"""Per-provider window test at bf16: detection per window of W receipts, and the honest window false-alarm rate.

At bf16 honest drift is wide, so the per-sequence test (benchmarks/verification.py) lets many attacked
sequences through one by one. Cheaters flip the rule's choice systematically more often, and by larger
margins, than honest bf16 noise does. The window test (`agoranet.verify.window`) sums, over W judged receipts
of one provider, (model, class), each receipt's flip excess: for every flip, min(margin, cap) / cap (a flip by
a near tie counts little, one by ≥ cap logit counts 1), less what honest sequences of the same prompt-length
bucket and output length score on average. The limit on the sum is calibrated by bootstrap: windows of W drawn
with replacement from honest sequences, the (1 − far) quantile of their sums (never below headroom × the
largest sum seen), for a false-alarm rate `far` per window.

This benchmark generates honest and attacked bf16 sequences as benchmarks/verification.py does (the same
request sets and attacks), replays every receipt with the shipped per-sequence tolerances, writes the
per-sequence figures (`--dump`), and from them (`--load` skips the generation) reports:

  per-sequence  attacked outputs differing from honest ones caught by the per-sequence test (as verification.py)
  window        per attack, the probability that a window of W of its receipts (drawn with replacement from
                all its receipts, identical-to-honest ones included) is caught: a receipt in it fails the
                per-sequence test, or the window sum exceeds the limit; and, apart, among windows whose
                receipts all pass the per-sequence test (the window alone)
  honest        the window false-alarm rate: the limit is fitted on one half of the honest sequences (even
                indices) and its exceedance estimated on the other half (odd) by bootstrap, beside the target

    python benchmarks/verification_window.py --honest 120 --attacks 48 --dump /tmp/win.json   # ~8 min, 1 core
    python benchmarks/verification_window.py --load /tmp/win.json --windows 8,16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

import verification as v  # benchmarks/verification.py
from agoranet.core.identity import Identity
from agoranet.engine.transformers_engine import load_causal_lm
from agoranet.verify.replay import ReplayResult
from agoranet.verify.tolerances import default_tolerances, load_tolerances, tolerance_for, tolerances_record
from agoranet.verify.window import (
    WINDOW_CLIP, WINDOW_FAR, WINDOW_FLOOR, WINDOW_SIZE, bucket_index, fit_window, flip_score,
)

ATTACKS = ("ignored seed", "ignored top_p", "half temperature", "fix-up int4", "fix-up noise 5%", "lossy speculative",
           "fix-up int8", "fix-up noise 1%")


def attack_runs(precision: str, n: int) -> tuple[dict, dict]:
    """The bf16-relevant attacks of verification.attack_runs (the same requests and cheats), and honest tokens."""
    reqs = v.range_requests(n, seed=31337, model_cid=v.MODEL_CID, context=v.CONTEXT, max_tokens=256,
                            top_ps=(1.0, 1.0, 0.95, 0.9))
    nucleus = v.range_requests(n, seed=4711, model_cid=v.MODEL_CID, context=v.CONTEXT, max_tokens=256,
                               top_ps=(0.9, 0.5))
    nucleus = [v.replace(r, sampling=v.replace(r.sampling, temperature=0.7)) for r in nucleus]
    base = v.run(v.engine_for(precision), reqs)
    honest_tokens = {r.body.request: r.body.output_tokens for r in base + v.run(v.engine_for(precision), nucleus)}
    real = load_causal_lm(v.MODEL_DIR, precision)
    attacks: dict[str, list] = {}
    for name, weights in [("int8", v.int8_weights), ("int4", v.int4_weights), ("noise 1%", v.noisy(0.01)),
                          ("noise 5%", v.noisy(0.05))]:
        attacks[f"fix-up {name}"] = v.fixup(v.run(v.engine_for(precision, weights), reqs), real)
    draft = load_causal_lm(v.MODEL_DIR, precision)
    v.int4_weights(draft)
    attacks["lossy speculative"] = v.lossy_speculative(v.engine_for(precision), reqs, real, draft, v.SPEC_MARGIN,
                                                        v.TOK)
    attacks["ignored top_p"] = v.run(v.engine_for(precision, cheat="top_p"), nucleus)
    attacks["half temperature"] = v.run(v.engine_for(precision, cheat="temperature"), reqs)
    attacks["ignored seed"] = v.run(v.engine_for(precision, cheat="seed"), reqs)
    return attacks, honest_tokens


def row(run, result: ReplayResult | str, tol, differs: bool | None = None) -> dict:
    """One sequence's figures: what the window statistic needs (and the per-sequence verdict)."""
    prompt = len(run.prompt) + len(run.body.prefix_tokens)
    out = {"prompt_tokens": prompt, "output_tokens": len(run.body.output_tokens),
           "temperature": run.body.sampling.temperature, "bucket": bucket_index(tol, prompt)}
    if isinstance(result, str):
        return out | {"refused": result}
    out |= {"ok": result.ok, "kind": result.failure.kind if result.failure else None, "flips": result.flips,
            "flip_margin": result.flip_margin, "flip_margins": result.flip_margins, "lp_mean": result.lp_mean}
    return out | ({"differs": differs} if differs is not None else {})


def judged(reference, runs: list, tol) -> list[tuple]:
    """(run, result) for the receipts inside the calibrated range (verification.judge puts refused ones first)."""
    inside = [r for r in runs if v.outside_calibration(tol, r.body) is None]
    return list(zip(inside, [x for x in v.judge(reference, inside, tol) if not isinstance(x, str)]))


def collect(n_honest: int, n_attack: int, tol, reference) -> dict:
    data: dict = {"honest": [], "attacks": {}}
    for set_name, reqs in v.honest_sets(n_honest).items():
        t = time.perf_counter()
        honest = v.run(v.engine_for("bf16"), reqs, single_share=0.25)
        data["honest"] += [row(r, x, tol) | {"set": set_name} for r, x in judged(reference, honest, tol)]
        print(f"honest {set_name}: {len(honest)} sequences [{time.perf_counter() - t:.0f}s]", flush=True)
    t = time.perf_counter()
    attacks, honest_tokens = attack_runs("bf16", n_attack)
    print(f"attacks generated [{time.perf_counter() - t:.0f}s]", flush=True)
    for name, runs in attacks.items():
        data["attacks"][name] = [row(r, x, tol, r.body.output_tokens != honest_tokens.get(r.body.request))
                                 for r, x in judged(reference, runs, tol)]
    return data


def confirm_sets(n: int) -> dict[str, list]:
    """Honest request sets shaped as verification.honest_sets but with other seeds: an independent confirmation."""
    return {
        "short": v.honest_requests(n, seed=19001, model_cid=v.MODEL_CID, max_tokens=64, temperatures=v.ALL_T,
                                   top_ps=v.TOP_PS),
        "long prompt": v.long_requests(n, seed=19002, model_cid=v.MODEL_CID, max_tokens=64, temperatures=v.ALL_T,
                                       top_ps=v.TOP_PS, max_prompt_chars=v.CONTEXT - 64 - v.PROMPT_OVERHEAD),
        "long output": v.long_requests(n, seed=19003, model_cid=v.MODEL_CID, max_tokens=256, temperatures=v.ALL_T,
                                       top_ps=v.TOP_PS, max_prompt_chars=v.CONTEXT - 256 - v.PROMPT_OVERHEAD),
    }


def confirm(n: int, tol, reference, trials: int) -> dict:
    """Honest sequences independent of the record's window calibration, judged with the record's window test:
    how many pass per sequence, their real windows (consecutive, in generation order) and bootstrap windows
    over the limit."""
    test = tol.window
    assert test is not None, "the tolerances record has no bf16 window test to confirm"
    rows: list[dict] = []
    for set_name, reqs in confirm_sets(n).items():
        runs = v.run(v.engine_for("bf16"), reqs, single_share=0.25)
        rows += [row(r, x, tol) | {"set": set_name} for r, x in judged(reference, runs, tol)]
    rows = [r for r in rows if "refused" not in r]
    s = scores(rows, test)
    rng = random.Random(17)
    order = list(range(len(s)))
    rng.shuffle(order)  # a provider's windows mix the three shapes
    real = [sum(s[i] for i in order[k:k + test.size]) for k in range(0, len(order) - test.size + 1, test.size)]
    boot = exceedance(s, test.limit, test.size, rng, trials)
    out = {"sequences": len(rows), "rejected": sum(not r["ok"] for r in rows), "windows": len(real),
           "windows_over": sum(x > test.limit for x in real), "worst_window": max(real, default=0.0),
           "bootstrap_far": boot, "bootstrap_windows": trials, "limit": test.limit, "size": test.size}
    print(f"\nconfirmation: {len(rows)} honest bf16 sequences (other seeds), {out['rejected']} rejected per sequence; "
          f"{len(real)} windows of {test.size} (shuffled): {out['windows_over']} over the limit {test.limit:.3g} "
          f"(worst {out['worst_window']:.3g}); bootstrap windows over it: {boot:.2g} of {trials}")
    return out


def scores(rows: list[dict], test) -> list[float]:
    return [flip_score(test, r["bucket"], r["output_tokens"], r["flip_margins"]) for r in rows]


def fit(rows: list[dict], tol, w: int, far: float, floor: float, clip: float):
    return fit_window([(r["bucket"], r["output_tokens"], r["flip_margins"]) for r in rows], max(len(tol.buckets), 1),
                      size=w, floor=floor, clip=clip, far=far, rng=random.Random(11))


def window_rates(attack: list[dict], test, limit: float, w: int, rng: random.Random, trials: int) -> tuple[float, float]:
    """(P caught: any receipt fails per sequence or the window sum > limit, P window alone catches a window whose
    receipts all pass per sequence), windows of `w` drawn with replacement from the attack's receipts."""
    s = scores(attack, test)
    ok = [r["ok"] for r in attack]
    passing = [x for x, good in zip(s, ok) if good]
    caught = 0
    for _ in range(trials):
        idx = [rng.randrange(len(attack)) for _ in range(w)]
        caught += (not all(ok[i] for i in idx)) or sum(s[i] for i in idx) > limit
    alone = sum(sum(rng.choice(passing) for _ in range(w)) > limit for _ in range(trials)) if passing else 0
    return caught / trials, (alone / trials if passing else float("nan"))


def exceedance(values: list[float], limit: float, w: int, rng: random.Random, trials: int) -> float:
    return sum(sum(rng.choice(values) for _ in range(w)) > limit for _ in range(trials)) / trials


def analyse(data: dict, tol, windows: list[int], far: float, floor: float, clip: float, trials: int) -> dict:
    rng = random.Random(5)
    honest = [r for r in data["honest"] if "refused" not in r]
    false_rejections = sum(not r["ok"] for r in honest)
    half, held = honest[0::2], honest[1::2]
    report: dict = {"far_target": far, "floor": floor, "clip": clip, "honest_sequences": len(honest),
                    "honest_false_rejections": false_rejections, "windows": {}, "per_sequence": {}}
    print(f"\n{len(honest)} honest bf16 sequences ({false_rejections} rejected per sequence); window statistic: "
          f"Σ flip excess, Σ max(margin − {floor}, 0) per receipt, at most {clip}, less the honest mean of its bucket "
          "and length")
    for name in ATTACKS:
        rows = [r for r in data["attacks"].get(name, []) if "refused" not in r]
        diff = [r for r in rows if r["differs"]]
        report["per_sequence"][name] = {"sequences": len(rows), "differing": len(diff),
                                        "detected_differing": sum(not r["ok"] for r in diff)}
    for w in windows:
        test_fit, test_all = fit(half, tol, w, far, floor, clip), fit(honest, tol, w, far, floor, clip)
        limit_fit, limit_all = test_fit.limit, test_all.limit
        held_far = exceedance(scores(held, test_fit), limit_fit, w, rng, trials * 20)
        all_far = exceedance(scores(honest, test_all), limit_all, w, rng, trials * 20)
        out: dict = {"limit_fit_half": limit_fit, "limit_all": limit_all, "test": test_all.model_dump(),
                     "honest_far_held_out": held_far, "honest_far_all": all_far, "attacks": {}}
        print(f"\n== window W = {w}: limit {limit_all:.3g} (fitted on all honest; {limit_fit:.3g} on the even half); "
              f"honest false alarms per window: held-out half {held_far:.2g}, all {all_far:.2g} "
              f"(bootstrap of {trials * 20} windows; target {far:g}) ==")
        for name in ATTACKS:
            rows = [r for r in data["attacks"].get(name, []) if "refused" not in r]
            if not rows:
                continue
            caught, alone = window_rates(rows, test_all, limit_all, w, rng, trials)
            p = report["per_sequence"][name]
            per_seq = p["detected_differing"] / p["differing"] if p["differing"] else float("nan")
            out["attacks"][name] = {"caught": caught, "window_alone": alone, "per_sequence_differing": per_seq}
            print(f"  {name:<18} per sequence {p['detected_differing']:>3}/{p['differing']:<3} differing "
                  f"({per_seq:5.1%}); window of {w} caught {caught:6.1%}; the window sum alone, when all {w} pass "
                  f"per sequence, {alone:6.1%}")
        report["windows"][str(w)] = out
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--honest", type=int, default=120, help="honest sequences per set (three sets)")
    ap.add_argument("--attacks", type=int, default=48, help="sequences per attack")
    ap.add_argument("--dump", type=Path, default=None, help="write the per-sequence figures here")
    ap.add_argument("--load", type=Path, default=None, help="read per-sequence figures (no generation)")
    ap.add_argument("--tolerances", type=Path, default=None, help="tolerances record (default: shipped)")
    ap.add_argument("--windows", default=f"{WINDOW_SIZE},8,16,48", help="window sizes W (the first: --write-record's)")
    ap.add_argument("--far", type=float, default=WINDOW_FAR, help="false alarms per honest window")
    ap.add_argument("--floor", type=float, default=WINDOW_FLOOR, help="part of a flip's margin that counts nothing")
    ap.add_argument("--clip", type=float, default=WINDOW_CLIP, help="most one receipt's summed margins count")
    ap.add_argument("--trials", type=int, default=20000, help="bootstrap windows per attack")
    ap.add_argument("--confirm", type=int, default=0,
                    help="also generate this many honest sequences per set with other seeds and judge them with the "
                         "record's window test (its false alarms on sequences it was not fitted on)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--write-record", type=Path, default=None,
                    help="write the tolerances record with bf16's window test (W = the first of --windows, fitted on "
                         "all honest sequences) added, every other class copied unchanged, signed by --key")
    ap.add_argument("--key", type=Path, default=None, help="identity key that signs --write-record (default: new)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    record = load_tolerances(args.tolerances) if args.tolerances else default_tolerances(v.MODEL_CID)
    assert record is not None
    tol = tolerance_for(record.body, "bf16")
    if args.load:
        data = json.loads(args.load.read_text())
    else:
        data = collect(args.honest, args.attacks, tol, load_causal_lm(v.MODEL_DIR, "fp32"))
        if args.dump:
            args.dump.write_text(json.dumps(data))
    if args.confirm:
        confirmed = confirm(args.confirm, tol, load_causal_lm(v.MODEL_DIR, "fp32"), args.trials * 20)
    report = analyse(data, tol, [int(w) for w in args.windows.split(",")], args.far, args.floor, args.clip, args.trials)
    if args.confirm:
        report["confirm"] = confirmed
    if args.write_record:
        honest = [r for r in data["honest"] if "refused" not in r]
        test = fit(honest, tol, int(args.windows.split(",")[0]), args.far, args.floor, args.clip)
        test = test.model_copy(update={"method": test.method + f" (benchmarks/verification_window.py, {len(honest)} "
                                                              "honest bf16 sequences of its three sets)"})
        classes = [c.model_copy(update={"window": test}) if c.precision == "bf16" else c for c in record.body.classes]
        identity = Identity.load_or_create(args.key) if args.key else Identity.generate()
        new = tolerances_record(identity, record.body.model, classes, hardware=record.body.hardware,
                                method=record.body.method)
        args.write_record.write_text(json.dumps(new.to_json(), indent=1) + "\n")
        print(f"\nwrote {new.cid} to {args.write_record}: bf16 window W = {test.size}, limit {test.limit:.4g}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
