"""The per-provider window test: flips summed over W judged receipts of one provider, (model, class).

At bf16 honest drift flips the rule's choice at a few near ties per sequence, so the per-sequence limits
(verify.replay) must allow several flips and let many cheating sequences through one by one. Cheaters (a
cheaper model with its logprobs fixed up, a provider choosing among near ties, an ignored seed or top_p) flip
systematically more often and by larger margins. Summed over a window of W receipts, their excess over honest
noise grows like W while honest noise grows like √W.

Each receipt scores its flip excess: Σ over its flips of max(margin − floor, 0) (honest bf16 flips are near
ties, half of them under 0.02 logit: those count nothing; a cheater's run 0.08-0.3), clipped at `clip` (so one
honest outlier, a rare flip by 0.5 logit, cannot carry a window alone), less `per_token[bucket] × output tokens`,
the mean honest clipped score per token of its prompt-length bucket. A window of W receipts fails when the sum
exceeds `limit`, calibrated on honest sequences for a false-alarm rate `far` per window: the larger of the
bootstrap (1 − far) quantile (windows of W drawn with replacement from them) and the normal quantile with 1.5 ×
their variance. (Measured in benchmarks/verification_window.py: without the clip, a bootstrap limit fitted on
half of 360 honest sequences was exceeded by 1% of windows of the other half.)
Anyone holding the model and the tolerance record can
recompute every term by replaying the receipts the failed window names (node.judge re-checks it).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from statistics import NormalDist

from agoranet.verify.records import ClassTolerance, WindowTest

__all__ = ["WINDOW_FLOOR", "WINDOW_CLIP", "WINDOW_FAR", "WINDOW_SIZE", "bucket_index", "weighted_flips",
           "flip_score", "calibrate_window", "fit_window", "window_test"]

WINDOW_FLOOR = 0.03  # logit: the part of a flip's margin below this counts nothing
WINDOW_CLIP = 0.15  # logit: the most one receipt's summed excess margin adds to a window
VARIANCE_HEADROOM = 1.5  # the normal-quantile limit uses this × the honest variance
WINDOW_FAR = 1e-4  # false alarms per honest window the limit is set for
WINDOW_SIZE = 32  # receipts per window


def bucket_index(tol: ClassTolerance, prompt_tokens: int) -> int:
    """The index of the prompt-length bucket of a receipt with `prompt_tokens` (prompt + prefix, as the verifier
    renders them); the last bucket beyond the range (such receipts are refused before replay), 0 without buckets."""
    buckets = getattr(tol, "buckets", [])
    return next((i for i, b in enumerate(buckets) if prompt_tokens <= b.max_prompt_tokens), max(len(buckets) - 1, 0))


def weighted_flips(margins: Sequence[float], floor: float, clip: float) -> float:
    """Σ max(margin − floor, 0) over a receipt's flips (logit units), at most `clip`."""
    return min(sum(max(m - floor, 0.0) for m in margins), clip)


def flip_score(test: WindowTest, bucket: int, output_tokens: int, margins: Sequence[float]) -> float:
    """One receipt's term of the window sum: its weighted flips less the honest mean for its bucket and length."""
    rate = test.per_token[min(bucket, len(test.per_token) - 1)] if test.per_token else 0.0
    return weighted_flips(margins, test.floor, test.clip) - rate * output_tokens


def calibrate_window(scores: Sequence[float], size: int, *, far: float = WINDOW_FAR,
                     rng: random.Random | None = None, trials: int | None = None) -> float:
    """The limit on a window sum of `size` honest scores exceeded with probability ≈ `far`: the larger of the
    (1 − far) quantile of bootstrap window sums (drawn with replacement from `scores`; 20/far of them) and the
    normal (1 − far) quantile of a sum of `size` with VARIANCE_HEADROOM × their variance."""
    if not scores:
        return 0.0
    rng = rng or random.Random(0)
    trials = trials or max(int(20 / far), 10_000)
    sums = sorted(sum(rng.choice(scores) for _ in range(size)) for _ in range(trials))
    mean = statistics.fmean(scores)
    spread = math.sqrt(size * VARIANCE_HEADROOM * statistics.pvariance(scores))
    normal = size * mean + NormalDist().inv_cdf(1.0 - far) * spread
    return max(sums[min(len(sums) - 1, int((1.0 - far) * len(sums)))], normal)


def fit_window(honest: Sequence[tuple[int, int, Sequence[float]]], buckets: int, *, size: int = WINDOW_SIZE,
               floor: float = WINDOW_FLOOR, clip: float = WINDOW_CLIP, far: float = WINDOW_FAR,
               rng: random.Random | None = None) -> WindowTest:
    """A class's window test from honest sequences, each (bucket index, output tokens, flip margins): per bucket
    the mean weighted flips per output token, then the bootstrap limit on a window of `size` of their excesses."""
    per_token = []
    for b in range(max(buckets, 1)):
        mine = [(n, m) for i, n, m in honest if i == b]
        tokens = sum(n for n, _ in mine)
        per_token.append(sum(weighted_flips(m, floor, clip) for _, m in mine) / tokens if tokens else 0.0)
    draft = WindowTest(size=size, floor=floor, clip=clip, per_token=per_token, limit=0.0, far=far, sequences=len(honest),
                       method="")
    scores = [flip_score(draft, i, n, m) for i, n, m in honest]
    limit = calibrate_window(scores, size, far=far, rng=rng)
    method = (f"bootstrap: {max(int(20 / far), 10_000)} windows of {size} drawn with replacement from {len(honest)} "
              f"honest sequences, the {1 - far:g} quantile of their sums; at least the normal quantile with "
              f"{VARIANCE_HEADROOM:g}x their variance")
    return draft.model_copy(update={"limit": limit, "method": method})


def window_test(tol: ClassTolerance) -> WindowTest | None:
    """The class's window test, or None (an older record without one, or a class that allows no flips)."""
    return getattr(tol, "window", None)
