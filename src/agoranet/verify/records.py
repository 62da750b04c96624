"""The verification layer's signed records: tolerances, verdicts and fraud proofs.

Embedded records (a receipt inside a fraud proof) travel as the hex of their canonical DAG-CBOR
bytes, so the proof carries the provider's own signature untouched and its CID can be recomputed.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from agoranet.core.records import RecordBody, register

__all__ = ["ClassTolerance", "LengthBucket", "WindowTest", "BucketedClass", "TolerancesBody", "TolerancesBodyV1", "FailureEvidence",
           "VerdictBody", "FraudProofBody", "WindowProofBody"]


class ClassTolerance(RecordBody):
    """Tolerances for receipts of one precision class, replayed at the reference precision."""

    precision: str
    tok: float = Field(ge=0.0)  # max (best score − claimed score), in logit units
    lp: float = Field(ge=0.0)  # max |claimed logprob − replayed logprob|
    top: float = Field(ge=0.0)  # max |claimed top-k logprob − replayed logprob|
    # max drift of the log-odds of the mass of a set of best tokens, logit units (÷T at temperature T): how far
    # the top-p nucleus edge may honestly move
    mass: float = Field(ge=0.0)
    measured_tok: float = Field(ge=0.0)  # worst honest deviation seen in calibration (tok: also logit-difference drift)
    measured_lp: float = Field(ge=0.0)
    measured_top: float = Field(ge=0.0)
    measured_mass: float = Field(ge=0.0)
    confirmed_tok: float = Field(ge=0.0)  # worst honest deviation on the independent confirmation set
    confirmed_lp: float = Field(ge=0.0)
    confirmed_top: float = Field(ge=0.0)
    confirmed_mass: float = Field(ge=0.0)
    sequences: int = Field(ge=0)
    confirm_sequences: int = Field(ge=0)
    headroom: float = Field(ge=1.0)
    # the per-sequence test (see verify.replay): limits per sequence and the false-rejection rate they target
    seq_flips: int = Field(ge=-1)  # most positions not holding the rule's choice (−1: unlimited)
    seq_flip_margin: float = Field(ge=0.0)  # most summed margin over those positions, logit units
    seq_lp_mean: float = Field(ge=0.0)  # most mean |claimed − replayed logprob| over a sequence
    measured_flips: int = Field(ge=0)  # worst honest sequence of the calibration set, for each
    measured_flip_margin: float = Field(ge=0.0)
    measured_lp_mean: float = Field(ge=0.0)
    target_frr: float = Field(ge=0.0, le=1.0)  # false rejections per honest sequence the limits aim at
    # the range the calibration covered: receipts outside it are refused, not judged
    max_prompt_tokens: int = Field(ge=0)  # prompt + prefix tokens
    max_output_tokens: int = Field(ge=0)
    batch_sizes: list[int]  # provider batch sizes the honest sets were generated at (not checkable per receipt)


class LengthBucket(RecordBody):
    """Limits of one class for receipts whose prompt (+ prefix) length lies in this bucket: above the previous
    bucket's `max_prompt_tokens`, up to this one's. Honest drift grows with the prompt (attention over more
    positions) and per-sequence counts grow with the output, so one limit for the whole range is loose for short
    receipts. Per-sequence flips and summed flip margins are limited by `base + per_token × output tokens`."""

    max_prompt_tokens: int = Field(ge=0)
    tok: float = Field(ge=0.0)
    lp: float = Field(ge=0.0)
    top: float = Field(ge=0.0)
    mass: float = Field(ge=0.0)
    # per-sequence limits for n output tokens: floor(flips_base + flips_per_token × n) flips, summed flip margin
    # ≤ margin_base + margin_per_token × n (per_token: the bucket's mean honest rate; base: the tail of the excess
    # over it, for the class's target false-rejection rate), mean |Δlogprob| ≤ lp_mean
    flips_base: float = Field(ge=0.0)
    flips_per_token: float = Field(ge=0.0)
    margin_base: float = Field(ge=0.0)
    margin_per_token: float = Field(ge=0.0)
    lp_mean: float = Field(ge=0.0)
    measured_tok: float = Field(ge=0.0)  # worst honest figures of the bucket's calibration sequences
    measured_lp: float = Field(ge=0.0)
    measured_top: float = Field(ge=0.0)
    measured_mass: float = Field(ge=0.0)
    measured_flips: int = Field(ge=0)
    measured_flip_margin: float = Field(ge=0.0)
    measured_lp_mean: float = Field(ge=0.0)
    sequences: int = Field(ge=0)  # calibration sequences in the bucket
    confirm_sequences: int = Field(ge=0)  # confirmation sequences in the bucket (all passed)


class WindowTest(RecordBody):
    """The per-provider window test of a class (see verify.window): over `size` judged receipts of one provider,
    the sum of each receipt's flip excess (Σ max(margin − floor, 0) over its flips, at most `clip`, less
    `per_token[bucket]` × its output tokens) must stay ≤ `limit`, set by bootstrap of honest windows for `far` false alarms per window."""

    size: int = Field(ge=1)  # receipts per window
    floor: float = Field(ge=0.0)  # logit: the part of a flip's margin below this counts nothing
    clip: float = Field(gt=0.0)  # logit: the most one receipt's Σ max(margin − floor, 0) counts
    per_token: list[float]  # mean honest clipped score per output token, per length bucket (in bucket order)
    limit: float  # most summed excess a window of `size` honest receipts reaches (at false-alarm rate `far`)
    far: float = Field(ge=0.0, le=1.0)  # false alarms per honest window the limit is set for
    sequences: int = Field(ge=0)  # honest sequences the bootstrap drew from
    method: str  # how the limit was estimated


class BucketedClass(ClassTolerance):
    """A class's whole-range tolerances (what a record without buckets judges by) and its length buckets, in
    increasing `max_prompt_tokens`, the last one the class's `max_prompt_tokens`. A receipt is judged by the
    bucket of its prompt length (`verify.tolerances.limits_for`), a ClassTolerance made concrete for it.

    `window`: the class's per-provider window test, when calibrated (bf16); absent from older records (and from
    their bytes: the field is left out when None, so records signed before it existed still verify)."""

    buckets: list[LengthBucket]
    window: WindowTest | None = None

    @model_serializer(mode="wrap")
    def _without_absent_window(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("window", 0) is None:
            del data["window"]
        return data


@register("agora/tolerances/2")
class TolerancesBody(RecordBody):
    """Calibrated replay tolerances of one model, per precision class and prompt-length bucket, and how they
    were measured. Version 2: classes carry length buckets (version 1 records load as one bucket per class)."""

    model: str  # model CID
    reference_precision: str  # the precision verifiers replay at
    classes: list[BucketedClass]
    hardware: str
    method: str
    created_ms: int = Field(ge=0)


@register("agora/tolerances/1")
class TolerancesBodyV1(RecordBody):
    """Version 1 of the tolerances record: one set of limits per class over its whole range (no buckets)."""

    model: str
    reference_precision: str
    classes: list[ClassTolerance]
    hardware: str
    method: str
    created_ms: int = Field(ge=0)


class FailureEvidence(RecordBody):
    """What the replay saw at the first failing position (scores in logit units)."""

    kind: str  # token | logprob | top_logprobs | nucleus | sequence | structure | request | model | text
    position: int  # index into output_tokens (−1: not tied to one token)
    detail: str
    claimed_token: int = -1
    best_token: int = -1
    margin: float = 0.0  # best score − claimed score, logit units
    claimed_logprob: float = 0.0
    replayed_logprob: float = 0.0
    tolerance: float = 0.0


@register("agora/verdict/1")
class VerdictBody(RecordBody):
    """A verifier's signed judgement of one receipt."""

    receipt: str  # receipt CID
    provider: str  # receipt signer
    model: str
    precision: str
    ok: bool
    checked_positions: int = Field(ge=0)
    failure: FailureEvidence | None = None
    fraud_proof: str | None = None  # CID of the fraud proof, when the check failed
    tolerances: ClassTolerance | None = None
    verified_ms: int = Field(ge=0)


@register("agora/fraud-proof/1")
class FraudProofBody(RecordBody):
    """Everything a third party holding the model needs to re-check that a receipt breaks the rule."""

    receipt_cid: str
    receipt: str  # hex of the receipt record's canonical DAG-CBOR bytes (provider signature inside)
    request: str  # hex of the canonical request's DAG-CBOR bytes (its CID is the receipt's `request`)
    provider: str
    evidence: FailureEvidence
    tolerances: ClassTolerance
    reference_precision: str
    created_ms: int = Field(ge=0)


@register("agora/window-proof/1")
class WindowProofBody(RecordBody):
    """A failed per-provider window test (verify.window): `size` receipts of one provider, (model, class), that
    each passed the per-sequence test but whose flips, summed, exceed what honest drift of the class reaches (at
    false-alarm rate `window.far` per window). Self-contained like a fraud proof: the receipts and requests are
    embedded, so anyone holding the model and the same tolerance record recomputes every score by replay."""

    provider: str
    model: str  # model CID
    precision: str
    receipt_cids: list[str]  # in the order judged
    receipts: list[str]  # hex of each receipt record's canonical DAG-CBOR bytes (provider signature inside)
    requests: list[str]  # hex of each canonical request's DAG-CBOR bytes
    scores: list[float]  # each receipt's flip excess (verify.window.flip_score)
    total: float  # their sum, above window.limit
    window: WindowTest  # the class's window test the receipts were judged by
    reference_precision: str
    created_ms: int = Field(ge=0)
