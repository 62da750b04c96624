"""Replay tolerances per precision class: from calibration measurements to a signed record, and back.

Receipts are always replayed at the reference precision (fp32); a class's tolerances bound how far an
honest provider running that class can drift from the reference. `agora verify calibrate` measures
them; the ones shipped for the bundled model live in `default_tolerances.json` (a signed record).

Each class also carries per-sequence limits (flips, summed flip margin, mean logprob deviation; see
verify.replay) set for a target false-rejection rate by an exponential fit to the upper tail of the
honest calibration sequences, never below headroom × the worst one; and the range (prompt and output
lengths) the calibration covered: a receipt outside it is refused, never judged.

Version 2 records split each class's range into prompt-length buckets (`LengthBucket`): per-position
tolerances and per-sequence limits per bucket, the flip and flip-margin limits growing with the output
(`base + per_token × n`). A receipt is judged by the bucket of its prompt + prefix length, as the verifier
renders them from the signed request (never a count the provider states): `limits_for`. Version 1 records
still load, each class one bucket over its whole range.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity
from agoranet.core.records import ReceiptBody, Record, sign_record, verify_record
from agoranet.verify.records import BucketedClass, ClassTolerance, LengthBucket, TolerancesBody, TolerancesBodyV1

__all__ = ["REFERENCE_PRECISION", "MIN_TOLERANCE", "HEADROOM", "TARGET_FRR", "NoTolerances", "SequenceStats",
           "BucketStats", "class_tolerance", "length_bucket", "bucketed", "limits_for", "linear_limit", "tail_limit",
           "outside_calibration", "tolerances_record", "load_tolerances", "default_tolerances", "tolerance_for",
           "AnyTolerances", "TOLERANCE_TYPES"]

REFERENCE_PRECISION = "fp32"
# The default floor of every τ and per-sequence limit, assuming nothing about the hardware: well above float32
# summation-order drift of agora-tiny on one CPU (≤ 7e-5 logit over provider threads 1/2/4, batches 1/8/16,
# benchmarks/fp32_drift.py). A record may use a lower floor measured like that for its (model, hardware) pair
# (`agora verify calibrate --floor`; the shipped fp32 class does); bf16 drift is far above either.
MIN_TOLERANCE = 1e-3
HEADROOM = 1.5
TARGET_FRR = 1e-4  # false rejections per honest sequence the per-sequence limits are set for
DEFAULTS_PATH = Path(__file__).with_name("default_tolerances.json")
AnyTolerances = TolerancesBody | TolerancesBodyV1
TOLERANCE_TYPES = (TolerancesBody.record_type, TolerancesBodyV1.record_type)


class NoTolerances(AgoraError):
    hint = "run `agora verify calibrate --precision CLASS` for this model, or pass --tolerances FILE"


@dataclass(frozen=True)
class SequenceStats:
    """Per-sequence statistics of the honest calibration set, and the range those sequences covered."""

    flips: Sequence[int]
    flip_margins: Sequence[float]
    lp_means: Sequence[float]
    max_prompt_tokens: int
    max_output_tokens: int
    batch_sizes: tuple[int, ...]


def tail_limit(values: Sequence[float], target: float, headroom: float) -> float:
    """A value honest sequences exceed with probability ≈ `target`: peaks over threshold with an exponential
    tail (the top tenth of the sample, at least 5, above the next value; its mean excess as the scale),
    never below headroom × the sample's maximum. Exponential tails fit counts of rare events and sums of them."""
    v = sorted(values)
    if not v:
        return 0.0
    n, k = len(v), max(5, len(v) // 10)
    if n <= k:
        return headroom * v[-1]
    u = v[n - k - 1]
    scale = sum(x - u for x in v[n - k:]) / k
    fitted = u + scale * math.log((k / n) / target) if target < k / n else v[-1]
    return max(fitted, headroom * v[-1])


def class_tolerance(
    precision: str, measured: tuple[float, float, float, float], confirmed: tuple[float, float, float, float], *,
    sequences: int, confirm_sequences: int, stats: SequenceStats, headroom: float = HEADROOM,
    floor: float = MIN_TOLERANCE, target_frr: float = TARGET_FRR,
) -> ClassTolerance:
    """Tolerances = headroom × the worst honest (tok, lp, top, mass) deviation of the calibration set (never
    below `floor`); per-sequence limits from the tail of the honest sequences (`tail_limit`) for `target_frr`,
    never below headroom × the worst honest sequence: the exponential fit alone is not trusted (an independent
    run of 32 honest bf16 sequences once exceeded the limit fitted on 400)."""
    tok, lp, top, mass = (max(headroom * m, floor) for m in measured)
    return ClassTolerance(
        precision=precision, tok=tok, lp=lp, top=top, mass=mass, measured_tok=measured[0], measured_lp=measured[1],
        measured_top=measured[2], measured_mass=measured[3], confirmed_tok=confirmed[0], confirmed_lp=confirmed[1],
        confirmed_top=confirmed[2], confirmed_mass=confirmed[3], sequences=sequences,
        confirm_sequences=confirm_sequences, headroom=headroom,
        seq_flips=math.ceil(tail_limit(stats.flips, target_frr, headroom)),
        seq_flip_margin=max(tail_limit(stats.flip_margins, target_frr, headroom), floor),
        seq_lp_mean=max(tail_limit(stats.lp_means, target_frr, headroom), floor),
        measured_flips=max(stats.flips, default=0), measured_flip_margin=max(stats.flip_margins, default=0.0),
        measured_lp_mean=max(stats.lp_means, default=0.0), target_frr=target_frr,
        max_prompt_tokens=stats.max_prompt_tokens, max_output_tokens=stats.max_output_tokens,
        batch_sizes=sorted(stats.batch_sizes),
    )


def linear_limit(counts: Sequence[float], lengths: Sequence[int], target: float,
                 headroom: float) -> tuple[float, float]:
    """(base, per_token) so that honest sequences of n tokens exceed base + per_token × n with probability ≈
    `target`: per_token is the sample's mean rate (sum of counts / sum of lengths), base the `tail_limit` of each
    sequence's excess over it (never below headroom × the largest excess). Flips and their summed margins are
    sums over positions, so their honest expectation grows with n; a fixed limit fitted on long outputs would
    leave a short one the long one's whole allowance."""
    total = sum(lengths)
    rate = sum(counts) / total if total else 0.0
    excess = [c - rate * n for c, n in zip(counts, lengths)]
    return max(tail_limit(excess, target, headroom), 0.0), rate


@dataclass(frozen=True)
class BucketStats:
    """One prompt-length bucket's calibration sequences: worst per-position deviations and per-sequence figures."""

    max_prompt_tokens: int
    measured: tuple[float, float, float, float]  # worst (tok, lp, top, mass)
    flips: Sequence[int]
    flip_margins: Sequence[float]
    lp_means: Sequence[float]
    lengths: Sequence[int]  # output tokens of each sequence


def length_bucket(stats: BucketStats, *, headroom: float = HEADROOM, floor: float = MIN_TOLERANCE,
                  target_frr: float = TARGET_FRR) -> LengthBucket:
    """One bucket's limits: τ = headroom × its worst honest deviation (never below `floor`), flips and flip
    margins `linear_limit`, mean |Δlogprob| `tail_limit` (never below `floor`)."""
    tok, lp, top, mass = (max(headroom * m, floor) for m in stats.measured)
    flips_base, flips_rate = linear_limit(stats.flips, stats.lengths, target_frr, headroom)
    margin_base, margin_rate = linear_limit(stats.flip_margins, stats.lengths, target_frr, headroom)
    return LengthBucket(
        max_prompt_tokens=stats.max_prompt_tokens, tok=tok, lp=lp, top=top, mass=mass, flips_base=flips_base,
        flips_per_token=flips_rate, margin_base=max(margin_base, floor), margin_per_token=margin_rate,
        lp_mean=max(tail_limit(stats.lp_means, target_frr, headroom), floor),
        measured_tok=stats.measured[0], measured_lp=stats.measured[1], measured_top=stats.measured[2],
        measured_mass=stats.measured[3], measured_flips=max(stats.flips, default=0),
        measured_flip_margin=max(stats.flip_margins, default=0.0), measured_lp_mean=max(stats.lp_means, default=0.0),
        sequences=len(stats.flips), confirm_sequences=0,
    )


def bucketed(whole: ClassTolerance, buckets: Sequence[LengthBucket] = ()) -> BucketedClass:
    """A class record: its whole-range tolerances and its buckets (none: judged by the whole-range ones)."""
    fields = whole.model_dump()
    fields.pop("buckets", None)
    window = fields.pop("window", None)
    ordered = sorted(buckets, key=lambda b: b.max_prompt_tokens)
    if ordered and ordered[-1].max_prompt_tokens < whole.max_prompt_tokens:
        raise ValueError(f"buckets end at {ordered[-1].max_prompt_tokens} prompt tokens, the class covers "
                         f"{whole.max_prompt_tokens}")
    return BucketedClass(**fields, buckets=ordered, window=window)


def limits_for(tol: ClassTolerance, prompt_tokens: int, output_tokens: int) -> ClassTolerance:
    """The concrete limits a receipt is judged by: its prompt-length bucket's tolerances, with the per-sequence
    limits evaluated at its output length. `prompt_tokens` must be the prompt + prefix length the verifier
    renders from the signed request (the provider cannot pad it). Without buckets, the class's own limits.
    A prompt beyond the last bucket (outside the calibrated range: refused before replay) gets the whole-range
    limits. The result is a plain ClassTolerance: what a verdict or fraud proof names as applied."""
    fields = tol.model_dump()
    fields.pop("buckets", None)
    fields.pop("window", None)  # the class's window test (verify.window) spans receipts: not a per-receipt limit
    buckets: list[LengthBucket] = getattr(tol, "buckets", [])
    bucket = next((b for b in buckets if prompt_tokens <= b.max_prompt_tokens), None)
    if bucket is None:
        return ClassTolerance(**fields)
    fields.update(
        tok=bucket.tok, lp=bucket.lp, top=bucket.top, mass=bucket.mass,
        seq_flips=math.floor(bucket.flips_base + bucket.flips_per_token * output_tokens),
        seq_flip_margin=bucket.margin_base + bucket.margin_per_token * output_tokens, seq_lp_mean=bucket.lp_mean,
        measured_tok=bucket.measured_tok, measured_lp=bucket.measured_lp, measured_top=bucket.measured_top,
        measured_mass=bucket.measured_mass, measured_flips=bucket.measured_flips,
        measured_flip_margin=bucket.measured_flip_margin, measured_lp_mean=bucket.measured_lp_mean,
        sequences=bucket.sequences, confirm_sequences=bucket.confirm_sequences,
        max_prompt_tokens=bucket.max_prompt_tokens,
    )
    return ClassTolerance(**fields)


def outside_calibration(tol: ClassTolerance, body: ReceiptBody) -> str | None:
    """Why a receipt lies outside the range its class was calibrated over (so it is refused, not judged)."""
    prompt = body.prompt_tokens + len(body.prefix_tokens)
    if prompt > tol.max_prompt_tokens:
        return (f"its {prompt} prompt tokens exceed the {tol.max_prompt_tokens} the {tol.precision} tolerances were "
                "calibrated up to")
    if len(body.output_tokens) > tol.max_output_tokens:
        return (f"its {len(body.output_tokens)} output tokens exceed the {tol.max_output_tokens} the {tol.precision} "
                "tolerances were calibrated up to")
    return None


def tolerances_record(identity: Identity, model_cid: str, classes: Sequence[ClassTolerance], *, hardware: str,
                      method: str) -> Record[TolerancesBody]:
    """Sign a version 2 record; a class given without buckets is one bucket over its whole range."""
    body = TolerancesBody(model=model_cid, reference_precision=REFERENCE_PRECISION,
                          classes=sorted((c if isinstance(c, BucketedClass) else bucketed(c) for c in classes),
                                         key=lambda c: c.precision),
                          hardware=hardware, method=method, created_ms=int(time.time() * 1000))
    return sign_record(identity, body)


def load_tolerances(path: Path) -> Record[AnyTolerances]:
    """Read a tolerances record saved as JSON (its `to_json` view) and check its signature: version 2, or
    version 1 (one bucket per class)."""
    try:
        record: Record[AnyTolerances] = verify_record(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise NoTolerances(f"cannot read tolerances from {path}: {exc}") from exc
    if record.type not in TOLERANCE_TYPES:
        raise NoTolerances(f"{path} holds a {record.type} record, not tolerances this version reads "
                           f"({' or '.join(TOLERANCE_TYPES)})")
    return record


def default_tolerances(model_cid: str) -> Record[AnyTolerances] | None:
    """The shipped, calibrated tolerances for `model_cid`, if this is the bundled model."""
    if not DEFAULTS_PATH.exists():
        return None
    record = load_tolerances(DEFAULTS_PATH)
    return record if record.body.model == model_cid else None


def tolerance_for(table: AnyTolerances, precision: str) -> BucketedClass:
    """The class's record; a version 1 class comes back with no buckets (judged by its whole-range limits)."""
    for c in table.classes:
        if c.precision == precision:
            return c if isinstance(c, BucketedClass) else bucketed(c)
    raise NoTolerances(f"no calibrated tolerances for precision class {precision!r} of model {table.model}")
