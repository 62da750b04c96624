"""Replay tolerances per precision class: from calibration measurements to a signed record, and back.

Receipts are always replayed at the reference precision (fp32); a class's tolerances bound how far an
honest provider running that class can drift from the reference. `agora verify calibrate` measures
them; the ones shipped for the bundled model live in `default_tolerances.json` (a signed record).

Each class also carries per-sequence limits (flips, summed flip margin, mean logprob deviation; see
verify.replay) set for a target false-rejection rate by an exponential fit to the upper tail of the
honest calibration sequences, never below headroom × the worst one; and the range (prompt and output
lengths) the calibration covered: a receipt outside it is refused, never judged.
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
from agoranet.verify.records import ClassTolerance, TolerancesBody

__all__ = ["REFERENCE_PRECISION", "MIN_TOLERANCE", "HEADROOM", "TARGET_FRR", "NoTolerances", "SequenceStats",
           "class_tolerance", "tail_limit", "outside_calibration", "tolerances_record", "load_tolerances",
           "default_tolerances", "tolerance_for"]

REFERENCE_PRECISION = "fp32"
MIN_TOLERANCE = 1e-3  # below this, float32 summation order alone could trip a check
HEADROOM = 1.5
TARGET_FRR = 1e-4  # false rejections per honest sequence the per-sequence limits are set for
DEFAULTS_PATH = Path(__file__).with_name("default_tolerances.json")


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


def tolerances_record(identity: Identity, model_cid: str, classes: list[ClassTolerance], *, hardware: str,
                      method: str) -> Record[TolerancesBody]:
    body = TolerancesBody(model=model_cid, reference_precision=REFERENCE_PRECISION,
                          classes=sorted(classes, key=lambda c: c.precision), hardware=hardware, method=method,
                          created_ms=int(time.time() * 1000))
    return sign_record(identity, body)


def load_tolerances(path: Path) -> Record[TolerancesBody]:
    """Read a tolerances record saved as JSON (its `to_json` view) and check its signature."""
    try:
        return verify_record(json.loads(path.read_text()), TolerancesBody)
    except (OSError, ValueError) as exc:
        raise NoTolerances(f"cannot read tolerances from {path}: {exc}") from exc


def default_tolerances(model_cid: str) -> Record[TolerancesBody] | None:
    """The shipped, calibrated tolerances for `model_cid`, if this is the bundled model."""
    if not DEFAULTS_PATH.exists():
        return None
    record = load_tolerances(DEFAULTS_PATH)
    return record if record.body.model == model_cid else None


def tolerance_for(table: TolerancesBody, precision: str) -> ClassTolerance:
    for c in table.classes:
        if c.precision == precision:
            return c
    raise NoTolerances(f"no calibrated tolerances for precision class {precision!r} of model {table.model}")
