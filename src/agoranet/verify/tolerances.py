"""Replay tolerances per precision class: from calibration measurements to a signed record, and back.

Receipts are always replayed at the reference precision (fp32); a class's tolerances bound how far an
honest provider running that class can drift from the reference. `agora verify calibrate` measures
them; the ones shipped for the bundled model live in `default_tolerances.json` (a signed record).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity
from agoranet.core.records import Record, sign_record, verify_record
from agoranet.verify.records import ClassTolerance, TolerancesBody

__all__ = ["REFERENCE_PRECISION", "MIN_TOLERANCE", "HEADROOM", "NoTolerances", "class_tolerance",
           "tolerances_record", "load_tolerances", "default_tolerances", "tolerance_for"]

REFERENCE_PRECISION = "fp32"
MIN_TOLERANCE = 1e-3  # below this, float32 summation order alone could trip a check
HEADROOM = 1.5
DEFAULTS_PATH = Path(__file__).with_name("default_tolerances.json")


class NoTolerances(AgoraError):
    hint = "run `agora verify calibrate --precision CLASS` for this model, or pass --tolerances FILE"


def class_tolerance(
    precision: str, measured: tuple[float, float, float, float], confirmed: tuple[float, float, float, float], *,
    sequences: int, confirm_sequences: int, headroom: float = HEADROOM, floor: float = MIN_TOLERANCE,
) -> ClassTolerance:
    """Tolerances = headroom × the worst honest (tok, lp, top, mass) deviation of the calibration set (never
    below `floor`)."""
    tok, lp, top, mass = (max(headroom * m, floor) for m in measured)
    return ClassTolerance(
        precision=precision, tok=tok, lp=lp, top=top, mass=mass, measured_tok=measured[0], measured_lp=measured[1],
        measured_top=measured[2], measured_mass=measured[3], confirmed_tok=confirmed[0], confirmed_lp=confirmed[1],
        confirmed_top=confirmed[2], confirmed_mass=confirmed[3], sequences=sequences,
        confirm_sequences=confirm_sequences, headroom=headroom,
    )


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
