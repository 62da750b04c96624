"""Receipt edits the verification benchmarks attack with (one module for the built-in, llama.cpp and vLLM ones).

Each takes honest runs and returns (tampered run, edited position) pairs, re-signing nothing: the benchmarks
judge the bodies directly. Imported by the benchmark scripts from their own directory.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import replace

from agoranet.core.records import TopLogprob
from agoranet.node.calibration import HonestRun


def tamper_token(runs: list[HonestRun], eos: Collection[int], decode: Callable[[list[int]], str],
                 rng: random.Random) -> list[tuple[HonestRun, int]]:
    """One output token swapped for one of its recorded top-k alternatives (never end-of-sequence, never the
    final token, so finish_reason stays consistent); runs too short or with no alternative are left out."""
    out = []
    for r in runs:
        b = r.body
        if len(b.output_tokens) < 2:
            continue
        i = rng.randrange(len(b.output_tokens) - 1)
        alternatives = [t for t in b.top_logprobs[i] if t.token != b.output_tokens[i] and t.token not in eos]
        if not alternatives:
            continue
        new = rng.choice(alternatives)
        tokens, logprobs = list(b.output_tokens), list(b.logprobs)
        tokens[i], logprobs[i] = new.token, new.logprob
        body = b.model_copy(update={"output_tokens": tokens, "logprobs": logprobs,
                                    "output_text": decode([t for t in tokens if t not in eos])})
        out.append((replace(r, body=body), i))
    return out


def tamper_logprob(runs: list[HonestRun], rng: random.Random) -> list[tuple[HonestRun, int]]:
    """One reported logprob below −0.5 raised by 0.5 nat, the top-k list kept consistent with the lie."""
    out = []
    for r in runs:
        b = r.body
        candidates = [i for i, lp in enumerate(b.logprobs) if lp < -0.5]
        if not candidates:
            continue
        i = rng.choice(candidates)
        logprobs = list(b.logprobs)
        logprobs[i] += 0.5
        tops = [list(t) for t in b.top_logprobs]
        tops[i] = [TopLogprob(token=t.token, logprob=logprobs[i]) if t.token == b.output_tokens[i] else t
                   for t in tops[i]]
        out.append((replace(r, body=b.model_copy(update={"logprobs": logprobs, "top_logprobs": tops})), i))
    return out
