"""Calibrating replay tolerances: honest generations through the real engine, replayed at fp32.

A calibration set (many prompts, temperatures, top-p values, seeds, batch sizes, so sequences are
left-padded in batches as a busy provider pads them; prompts up to the context, long outputs) gives the
worst honest deviations; tolerances are those × headroom, per-sequence limits come from the honest
sequences' tail; an independent confirmation set (other prompts and seeds) must then pass them all.
"""

from __future__ import annotations

import asyncio
import math
import random
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

from agoranet.core.errors import AgoraError
from agoranet.core.records import PriceCharged, ReceiptBody
from agoranet.engine.base import Engine, Generation, GenerationRequest, Sampling
from agoranet.engine.tokenizer import Tokenizer
from agoranet.engine.transformers_engine import TransformersEngine
from agoranet.node.provider import derived_request_id, receipt_body as provider_receipt_body
from agoranet.verify.records import BucketedClass, LengthBucket, WindowTest
from agoranet.verify.replay import MEASURE, ReplayResult, ToleranceLike, check_receipt
from agoranet.verify.tolerances import (
    HEADROOM, MIN_TOLERANCE, TARGET_FRR, BucketStats, SequenceStats, bucketed, class_tolerance, length_bucket,
)
from agoranet.verify.window import bucket_index, fit_window

TASKS = [
    "add two numbers", "reverse a list", "sort a dictionary by value", "read a file line by line",
    "check if a number is prime", "compute a factorial", "parse a date string", "merge two sorted lists",
    "count words in a string", "flatten a nested list", "find the maximum of a list", "open a socket",
    "write a class for a stack", "remove duplicates from a list", "compute fibonacci numbers",
    "convert celsius to fahrenheit", "split a path into parts", "retry a function on error",
    "join strings with commas", "test if a string is a palindrome", "make a temporary directory",
    "read json from a file", "define a dataclass for a point", "walk a directory tree",
]
SNIPPETS = [
    "def ", "import os\n\ndef ", "class ", "    def __init__(self", "for i in range(", "if __name__ == ",
    "def _check(self, value):\n    ", "try:\n    ", "import re\n", "return ", "with open(", "    @property\n    def ",
]


class CalibrationFailed(AgoraError):
    hint = "calibrate with more --sequences, or a larger --headroom"


@dataclass
class HonestRun:
    """One honest generation and the receipt body a provider would sign for it."""

    request: GenerationRequest
    prompt: list[int]
    body: ReceiptBody
    request_bytes: bytes


def honest_requests(count: int, *, seed: int, model_cid: str, max_tokens: int = 64,
                    temperatures: tuple[float, ...] = (0.0, 0.6, 0.8, 1.0, 1.3),
                    top_ps: tuple[float, ...] = (1.0, 1.0, 0.95, 0.8)) -> list[GenerationRequest]:
    """A reproducible mix of chat and completion requests; different `seed`s give independent sets."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        sampling = Sampling(temperature=rng.choice(temperatures), top_p=rng.choice(top_ps),
                            seed=rng.randrange(2**62), max_tokens=max_tokens)
        if rng.random() < 0.6:
            msgs = [("user", f"{rng.choice(TASKS)} {rng.choice(['', 'in python', 'quickly', 'with tests'])}".strip())]
            if rng.random() < 0.3:
                msgs.insert(0, ("system", "You write small Python functions."))
            req = GenerationRequest(request_id="", kind="chat", sampling=sampling, messages=tuple(msgs))
        else:
            req = GenerationRequest(request_id="", kind="completion", sampling=sampling,
                                    prompt=rng.choice(SNIPPETS) + rng.choice(TASKS).replace(" ", "_")[:12])
        out.append(replace(req, request_id=derived_request_id(req, model_cid)))
    return out


def _corpus() -> list[str]:
    """Python source text for long prompts: the running interpreter's standard library (in the bundled
    model's training distribution; another Python version gives other, equally valid prompts)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.glob("*.py"))[:80]:
        try:
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            continue
    return [t for t in texts if len(t) > 4000] or ["def f(x):\n    return x\n" * 400]


def long_requests(count: int, *, seed: int, model_cid: str, max_prompt_chars: int, max_tokens: int,
                  min_prompt_chars: int = 16, temperatures: tuple[float, ...] = (0.0, 0.6, 0.8, 1.0, 1.3),
                  top_ps: tuple[float, ...] = (1.0,)) -> list[GenerationRequest]:
    """Requests whose prompts are slices of real source text, lengths uniform in [min, max] characters (a
    third of them chat, the text as the user's message): calibration and benchmarks over the whole context."""
    rng = random.Random(seed)
    corpus = _corpus()
    out = []
    for _ in range(count):
        text = rng.choice(corpus)
        n = rng.randint(min_prompt_chars, max_prompt_chars)
        start = rng.randrange(max(1, len(text) - n))
        piece = text[start:start + n].encode("ascii", "replace").decode()
        sampling = Sampling(temperature=rng.choice(temperatures), top_p=rng.choice(top_ps),
                            seed=rng.randrange(2**62), max_tokens=max_tokens)
        if rng.random() < 1 / 3:
            req = GenerationRequest(request_id="", kind="chat", sampling=sampling, messages=(("user", piece),))
        else:
            req = GenerationRequest(request_id="", kind="completion", sampling=sampling, prompt=piece)
        out.append(replace(req, request_id=derived_request_id(req, model_cid)))
    return out


async def generate_all(engine: TransformersEngine, requests: list[GenerationRequest],
                       concurrency: int) -> list[Generation]:
    """Run requests through the engine, `concurrency` at a time (so they share batches and padding)."""
    results: list[Generation | None] = [None] * len(requests)

    async def one(i: int) -> None:
        async for item in engine.generate(requests[i]):
            if isinstance(item, Generation):
                results[i] = item

    for start in range(0, len(requests), concurrency):
        await asyncio.gather(*(one(i) for i in range(start, min(start + concurrency, len(requests)))))
    return results  # type: ignore[return-value]


def receipt_body(engine: TransformersEngine, req: GenerationRequest, gen: Generation) -> tuple[ReceiptBody, bytes]:
    """The receipt body a provider signs for `gen` (prices zero), with its canonical request bytes."""
    from agoranet.core.cid import DAG_CBOR, cid_of

    request_bytes = req.canonical(engine.model_cid).encode()
    body = provider_receipt_body(engine, req, str(cid_of(request_bytes, DAG_CBOR)), gen,
                                 PriceCharged(input_per_mtok=0, output_per_mtok=0, charged=0), started_ms=0, finished_ms=0)
    return body, request_bytes


def fit_context(engine: TransformersEngine, request: GenerationRequest) -> GenerationRequest:
    """`request` with its prompt text cut from the front until prompt + max_tokens fit the engine's context
    (a chat template adds tokens the character budget of `long_requests` cannot know)."""
    context = int(getattr(engine, "context_length", 0)) or None
    while context is not None:
        over = len(engine.prompt_tokens(request)) + request.sampling.max_tokens - context
        if over <= 0:
            break
        if request.kind == "chat":
            role, text = request.messages[-1]
            request = replace(request, messages=(*request.messages[:-1], (role, text[over:])))
        else:
            request = replace(request, prompt=request.prompt[over:])
        request = replace(request, request_id=derived_request_id(request, engine.model_cid))
    return request


async def honest_runs(engine: TransformersEngine, requests: list[GenerationRequest],
                      concurrency: int) -> list[HonestRun]:
    requests = [fit_context(engine, r) for r in requests]
    requests = [replace(r, prompt_ids=tuple(engine.prompt_tokens(r))) for r in requests]  # as a provider binds them
    gens = await generate_all(engine, requests, concurrency)
    runs = []
    for req, gen in zip(requests, gens):
        body, request_bytes = receipt_body(engine, req, gen)
        runs.append(HonestRun(req, engine.prompt_tokens(req), body, request_bytes))
    return runs


def replay_all(reference: torch.nn.Module, tokenizer: Tokenizer, runs: list[HonestRun], tol: ToleranceLike,
               model_cid: str) -> list[ReplayResult]:
    return [check_receipt(reference, r.prompt, r.body, tol, model_cid=model_cid, request_bytes=r.request_bytes,
                          decode=tokenizer.decode, eos_token=tokenizer.eos_tokens) for r in runs]


def worst(results: list[ReplayResult]) -> tuple[float, float, float, float]:
    """Worst honest (token margin, logprob, top-k, nucleus mass) deviations. The token figure also takes the
    worst drift of any logit difference among listed tokens: margins only show at the rare near-tie flips,
    while that drift, which bounds them, is measured at every position; the mass figure likewise is the
    log-odds drift of every listed best-token set, not only of the sets at a nucleus edge."""
    return (max(max(r.max_tok, r.max_spread) for r in results), max(r.max_lp for r in results),
            max(r.max_top for r in results), max(r.max_mass for r in results))


def range_requests(count: int, *, seed: int, model_cid: str, context: int, max_tokens: int,
                   top_ps: tuple[float, ...] = (1.0,)) -> list[GenerationRequest]:
    """Honest requests over the whole range a class is calibrated for, shuffled: a quarter short chat and
    completion prompts (`honest_requests`, 64 tokens), a quarter long prompts up to the context (64 tokens),
    half long outputs (`max_tokens`) after prompts up to what the context leaves."""
    short_out = min(64, max_tokens)
    quarter = count // 4
    reqs = honest_requests(quarter, seed=seed, model_cid=model_cid, max_tokens=short_out, top_ps=top_ps)
    reqs += long_requests(quarter, seed=seed + 1, model_cid=model_cid, max_tokens=short_out, top_ps=top_ps,
                          max_prompt_chars=max(16, context - short_out - PROMPT_OVERHEAD))
    reqs += long_requests(count - 2 * quarter, seed=seed + 2, model_cid=model_cid, max_tokens=max_tokens,
                          top_ps=top_ps, max_prompt_chars=max(16, context - max_tokens - PROMPT_OVERHEAD))
    random.Random(seed).shuffle(reqs)
    return reqs


PROMPT_OVERHEAD = 48  # tokens a chat template may add around a message (and a byte tokenizer's BOS)
BUCKET_EDGES = (128, 512)  # prompt (+ prefix) lengths at which a new length bucket starts; the last ends at the range


def bucket_requests(count: int, *, seed: int, model_cid: str, context: int, max_tokens: int,
                    edges: tuple[int, ...] = BUCKET_EDGES,
                    top_ps: tuple[float, ...] = (1.0,)) -> list[GenerationRequest]:
    """Honest requests spread evenly over the prompt-length buckets (edges, then the context), shuffled: in each,
    half 64 new tokens and half `max_tokens` (prompts as long as the context leaves); the first bucket also
    holds short chat and completion prompts (`honest_requests`), the others slices of source text
    (`long_requests`) whose lengths are uniform over the bucket."""
    short_out = min(64, max_tokens)
    bounds = [0, *[e for e in edges if e < context - short_out], context - short_out]
    per = count // (len(bounds) - 1)
    reqs: list[GenerationRequest] = []
    for b, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        n = count - per * (len(bounds) - 2) if b == len(bounds) - 2 else per
        s = seed + 10 * b
        for i, out in enumerate((short_out, max_tokens)):
            k = n // 2 if i == 0 else n - n // 2
            # the last bucket reaches the context's end: longer texts are cut to fit by `fit_context`
            top = context - out if b == len(bounds) - 2 else min(hi, context - out) - PROMPT_OVERHEAD
            bottom = max(16, lo + 1 - (PROMPT_OVERHEAD // 2 if lo else 0))
            if b == 0:
                reqs += honest_requests(k // 2, seed=s + i, model_cid=model_cid, max_tokens=out, top_ps=top_ps)
                k -= k // 2
            reqs += long_requests(k, seed=s + 5 + i, model_cid=model_cid, max_tokens=out, top_ps=top_ps,
                                  min_prompt_chars=min(bottom, max(16, top)), max_prompt_chars=max(16, top))
    random.Random(seed).shuffle(reqs)
    return reqs


def bucket_stats(runs: list[HonestRun], results: list[ReplayResult], edges: list[int]) -> list[BucketStats]:
    """Per bucket (prompt + prefix ≤ each edge, above the previous), its calibration sequences' figures."""
    out = []
    for lo, hi in zip([-1, *edges], edges):
        mine = [(run, r) for run, r in zip(runs, results)
                if lo < run.body.prompt_tokens + len(run.body.prefix_tokens) <= hi]
        if len(edges) > 1 and len(mine) < MIN_BUCKET_SEQUENCES:
            raise CalibrationFailed(f"only {len(mine)} calibration sequences have prompts of {lo + 1}-{hi} tokens "
                                    f"(at least {MIN_BUCKET_SEQUENCES} per bucket): calibrate with more --sequences "
                                    "or fewer --buckets")
        rs = [r for _, r in mine]
        out.append(BucketStats(max_prompt_tokens=hi, measured=worst(rs), flips=[r.flips for r in rs],
                               flip_margins=[r.flip_margin for r in rs], lp_means=[r.lp_mean for r in rs],
                               lengths=[len(run.body.output_tokens) for run, _ in mine]))
    return out


MIN_BUCKET_SEQUENCES = 40  # fewer leave a bucket's tail fit to its headroom alone (one bucket: no minimum)


def sequence_stats(runs: list[HonestRun], results: list[ReplayResult], batch_sizes: tuple[int, ...]) -> SequenceStats:
    return SequenceStats(
        flips=[r.flips for r in results], flip_margins=[r.flip_margin for r in results],
        lp_means=[r.lp_mean for r in results],
        max_prompt_tokens=max(r.body.prompt_tokens + len(r.body.prefix_tokens) for r in runs),
        max_output_tokens=max(len(r.body.output_tokens) for r in runs), batch_sizes=batch_sizes,
    )


async def calibrate_precision(
    model_dir: Path, model_cid: str, precision: str, reference: torch.nn.Module, *, sequences: int = 400,
    confirm: int = 400, headroom: float = HEADROOM, floor: float = MIN_TOLERANCE, max_tokens: int = 256,
    seed: int = 1, threads: int | None = None, engine: Engine | None = None, target_frr: float = TARGET_FRR,
    edges: tuple[int, ...] = (),
) -> BucketedClass:
    """Measure one precision class against the reference, set τ and the per-sequence limits per prompt-length
    bucket (new buckets at `edges`, e.g. BUCKET_EDGES as `agora verify calibrate` does; none: one bucket, for
    small sets) and over the whole range, and confirm on an independent set; the record states the range covered
    (prompt lengths up to the context, outputs up to `max_tokens`, batch 1 and 16 — the confirmation set at
    batch 8).

    `engine` (default: the built-in engine at `precision`) is the provider's engine; `reference` is what
    verifiers replay with (the fp32 model, or for a GGUF the same file through llama.cpp)."""
    engine = engine or TransformersEngine(model_dir, model_cid=model_cid, precision=precision, max_batch=16,
                                          threads=threads)
    tokenizer = engine.tokenizer
    context = int(getattr(engine, "context_length", 1024))
    await engine.start()
    try:
        # top-p = 1 here: at the nucleus edge honest margins are meaningless (the nucleus is judged by mass,
        # within τ_mass, measured at every position); the confirmation set below does use top-p < 1.
        calib = bucket_requests(sequences, seed=seed, model_cid=model_cid, context=context, max_tokens=max_tokens,
                                edges=edges)
        # mostly batched (padding, other batch sizes) and a share one at a time
        runs = await honest_runs(engine, calib[: sequences // 4], 1) + await honest_runs(engine, calib[sequences // 4:], 16)
        calib_results = replay_all(reference, tokenizer, runs, MEASURE, model_cid)
        whole = class_tolerance(precision, worst(calib_results), (0.0, 0.0, 0.0, 0.0), sequences=len(runs),
                                confirm_sequences=0, headroom=headroom, floor=floor, target_frr=target_frr,
                                stats=sequence_stats(runs, calib_results, (1, 16)))
        bounds = sorted({e for e in edges if e < whole.max_prompt_tokens} | {whole.max_prompt_tokens})
        buckets = [length_bucket(b, headroom=headroom, floor=floor, target_frr=target_frr)
                   for b in bucket_stats(runs, calib_results, bounds)]
        tol = bucketed(whole, buckets)
        check = bucket_requests(confirm, seed=seed + 1_000_003, model_cid=model_cid, context=context,
                                max_tokens=max_tokens, edges=edges, top_ps=(1.0, 1.0, 0.95, 0.8))
        confirm_runs = await honest_runs(engine, check, 8)
    finally:
        await engine.stop()
    # a confirmation prompt beyond the calibrated range (which receipts would be refused at) meets the whole-range
    # limits, as before buckets
    confirmed_results = replay_all(reference, tokenizer, confirm_runs, tol, model_cid)
    rejected = [(run, r) for run, r in zip(confirm_runs, confirmed_results) if not r.ok]
    if rejected:
        run, r = rejected[0]
        f = r.failure
        raise CalibrationFailed(f"{len(rejected)} of {len(confirm_runs)} honest {precision} confirmation sequences "
                                f"fail the calibrated tolerances (first, prompt {run.body.prompt_tokens} tokens, "
                                f"output {len(run.body.output_tokens)}: {f.kind} at {f.position}: {f.detail})")
    confirmed = worst(confirmed_results)
    widened = _widened(tol, confirmed, confirmed_results, [len(r.body.output_tokens) for r in confirm_runs], headroom)
    lows = [-1, *(b.max_prompt_tokens for b in tol.buckets)]
    buckets = []
    for lo, b in zip(lows, tol.buckets):
        mine = [(run, r) for run, r in zip(confirm_runs, confirmed_results)
                if lo < run.body.prompt_tokens + len(run.body.prefix_tokens) <= b.max_prompt_tokens]
        rs = [r for _, r in mine]
        bucket = b.model_copy(update={"confirm_sequences": len(mine)})
        buckets.append(_widened(bucket, worst(rs), rs, [len(run.body.output_tokens) for run, _ in mine], headroom)
                       if mine else bucket)
    return widened.model_copy(update={
        "confirm_sequences": len(confirm_runs), "batch_sizes": [1, 8, 16], "buckets": buckets,
        **dict(zip(("confirmed_tok", "confirmed_lp", "confirmed_top", "confirmed_mass"), confirmed)),
        "window": _window(widened, buckets, runs + confirm_runs, calib_results + confirmed_results),
    })


def _window(tol: BucketedClass, buckets: list[LengthBucket], runs: list[HonestRun],
            results: list[ReplayResult]) -> WindowTest | None:
    """The class's per-provider window test (verify.window), fitted on every honest sequence of the calibration
    and confirmation sets; none for a class that allows no flips (fp32: any flip already fails its sequence)."""
    if tol.seq_flips == 0 and not any(b.flips_base or b.flips_per_token for b in buckets):
        return None
    with_buckets = tol.model_copy(update={"buckets": buckets})
    honest = [(bucket_index(with_buckets, run.body.prompt_tokens + len(run.body.prefix_tokens)),
               len(run.body.output_tokens), r.flip_margins) for run, r in zip(runs, results)]
    return fit_window(honest, max(len(buckets), 1))


L = TypeVar("L", BucketedClass, LengthBucket)


def _widened(limits: L, confirmed: tuple[float, float, float, float], results: list[ReplayResult],
             lengths: list[int], headroom: float) -> L:
    """Once the confirmation set has passed the limits (the independent test), they are widened where needed to
    headroom × its worst as well: honest drift is heavy-tailed (bf16 on agora-tiny: worst token drift 0.79 in 600
    calibration sequences, 1.28 in 450 confirmation ones), and a limit one set barely holds is no margin."""
    update: dict[str, float] = {k: max(getattr(limits, k), headroom * v)
                                for k, v in zip(("tok", "lp", "top", "mass"), confirmed)}
    lp = max((r.lp_mean for r in results), default=0.0)
    if isinstance(limits, LengthBucket):
        for name, values in (("flips", [float(r.flips) for r in results]),
                             ("margin", [r.flip_margin for r in results])):
            rate = getattr(limits, f"{name}_per_token")
            excess = max((v - rate * n for v, n in zip(values, lengths)), default=0.0)
            update[f"{name}_base"] = max(getattr(limits, f"{name}_base"), headroom * excess)
        update["lp_mean"] = max(limits.lp_mean, headroom * lp)
    else:
        update["seq_flips"] = max(limits.seq_flips, math.ceil(headroom * max((r.flips for r in results), default=0)))
        update["seq_flip_margin"] = max(limits.seq_flip_margin,
                                        headroom * max((r.flip_margin for r in results), default=0.0))
        update["seq_lp_mean"] = max(limits.seq_lp_mean, headroom * lp)
    return limits.model_copy(update=update)
