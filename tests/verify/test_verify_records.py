"""Tolerances, verdicts and fraud proofs are signed records that survive the wire unchanged."""

from __future__ import annotations

import pytest

from agoranet.core.errors import BadSignature
from agoranet.core.identity import Identity
from agoranet.core.records import sign_record, verify_record
from agoranet.engine.models import model_cid, resolve_model
from agoranet.verify.records import FailureEvidence, FraudProofBody, TolerancesBody, VerdictBody
from agoranet.verify.tolerances import (
    NoTolerances, class_tolerance, default_tolerances, tolerance_for, tolerances_record,
)

ID = Identity.generate()


def test_tolerances_get_headroom_and_a_floor_and_round_trip():
    c = class_tolerance("bf16", (0.1, 0.2, 0.3, 0.04), (0.05, 0.1, 0.1, 0.02), sequences=400, confirm_sequences=400)
    assert (c.tok, c.lp, c.top, c.mass) == pytest.approx((0.15, 0.3, 0.45, 0.06))
    assert (c.measured_mass, c.confirmed_mass) == (0.04, 0.02)
    tiny = class_tolerance("fp32", (0.0, 2e-5, 3e-5, 1e-5), (0.0, 1e-5, 1e-5, 0.0), sequences=400,
                           confirm_sequences=400)
    assert tiny.tok == tiny.lp == tiny.top == tiny.mass == 1e-3
    record = tolerances_record(ID, "bafymodel", [c, tiny], hardware="cpu", method="test")
    for wire in (record.encode(), record.to_json()):
        back = verify_record(wire, TolerancesBody)
        assert back == record and tolerance_for(back.body, "bf16") == c


def test_shipped_defaults_cover_the_calibrated_classes_with_headroom():
    record = default_tolerances(model_cid(resolve_model("agora-tiny")[0]))
    assert record is not None
    for precision in ("fp32", "bf16"):
        c = tolerance_for(record.body, precision)
        assert c.sequences >= 400 and c.confirm_sequences >= 400 and c.headroom >= 1.5
        assert c.tok >= 1.5 * c.measured_tok and c.lp >= 1.5 * c.measured_lp and c.top >= 1.5 * c.measured_top
        # ≥ 1.5× headroom over the independent honest set as well, not merely passing it
        assert c.tok >= 1.5 * c.confirmed_tok and c.lp >= 1.5 * c.confirmed_lp and c.top >= 1.5 * c.confirmed_top
        # the nucleus is judged by a calibrated mass tolerance, not by a slack derived from τ_lp
        assert c.mass >= 1.5 * c.measured_mass and c.mass >= 1.5 * c.confirmed_mass and c.mass >= 1e-3
    # fp16 is not shipped: one honest fp16 sequence in 400 deviated by 0.83 logits (see README)
    with pytest.raises(NoTolerances, match="fp16"):
        tolerance_for(record.body, "fp16")
    assert default_tolerances("bafyunknown") is None


def test_verdict_and_fraud_proof_records_round_trip_and_reject_tampering():
    ev = FailureEvidence(kind="token", position=3, detail="x", claimed_token=5, best_token=6, margin=2.5)
    tol = class_tolerance("fp32", (0, 0, 0, 0), (0, 0, 0, 0), sequences=1, confirm_sequences=1)
    verdict = sign_record(ID, VerdictBody(receipt="bafyr", provider="12D3", model="bafym", precision="fp32", ok=False,
                                          checked_positions=4, failure=ev, fraud_proof="bafyp", tolerances=tol,
                                          verified_ms=1))
    proof = sign_record(ID, FraudProofBody(receipt_cid="bafyr", receipt="00", request="01", provider="12D3",
                                           evidence=ev, tolerances=tol, reference_precision="fp32", created_ms=1))
    for record in (verdict, proof):
        assert verify_record(record.encode()) == record == verify_record(record.to_json())
    forged = proof.to_json()
    forged["body"]["evidence"]["position"] = 4
    with pytest.raises(BadSignature):
        verify_record(forged)
