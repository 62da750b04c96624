"""Canonical signed records: the one wire format for everything Agora signs.

A record is the DAG-CBOR map {type, signer, body, sig}. The signature covers the canonical
DAG-CBOR bytes of {type, signer, body}; the record's CID is CIDv1(dag-cbor, sha2-256) of the whole
signed map. Bodies are typed: each record type registers a pydantic model, and `verify_record`
rejects unknown types, bodies that do not match their model, non-canonical bytes and bad signatures.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Generic, TypeVar

import libipld
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agoranet.core.cid import CID, DAG_CBOR, cid_of
from agoranet.core.errors import BadSignature, InvalidPeerId, MalformedRecord, UnknownRecordType
from agoranet.core.identity import Identity, PeerId

__all__ = [
    "Record", "RecordBody", "register", "sign_record", "decode_record", "verify_record",
    "encode_canonical", "decode_canonical", "ReceiptBody", "OfferBody", "OfferedModel", "TopLogprob",
    "SamplingParams", "record_types", "token_charge", "ReceiptSummaryBody",
]


def encode_canonical(value: Any) -> bytes:
    """DAG-CBOR bytes of plain data (maps sorted, shortest ints, float64); rejects NaN and infinities."""
    try:
        return libipld.encode_dag_cbor(value)  # raises ValueError for NaN and infinities
    except (TypeError, ValueError, OverflowError) as exc:
        why = ("NaN, infinite floats and integers beyond 64 bits are not allowed" if "out of range" in str(exc)
               else str(exc))
        raise MalformedRecord(f"value cannot be encoded as DAG-CBOR: {why}") from exc


def decode_canonical(data: bytes) -> Any:
    """Decode DAG-CBOR and insist the bytes are the canonical encoding of what they decode to."""
    try:
        value = libipld.decode_dag_cbor(bytes(data))
    except Exception as exc:
        raise MalformedRecord(f"not valid DAG-CBOR: {exc}") from exc
    if libipld.encode_dag_cbor(value) != bytes(data):
        raise MalformedRecord("DAG-CBOR bytes are not in canonical form")
    return value


class RecordBody(BaseModel):
    """Base of every record body: strict, closed (unknown fields are an error), immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    record_type: ClassVar[str] = ""  # set by @register


_TYPES: dict[str, type[RecordBody]] = {}
B = TypeVar("B", bound=RecordBody)


def register(type_name: str):
    """Class decorator: make `type_name` a known record type whose body is the decorated model."""

    def wrap(cls: type[B]) -> type[B]:
        if type_name in _TYPES:
            raise RuntimeError(f"record type {type_name} registered twice")
        cls.record_type = type_name  # type: ignore[assignment]
        _TYPES[type_name] = cls
        return cls

    return wrap


def record_types() -> list[str]:
    return sorted(_TYPES)


@dataclass(frozen=True)
class Record(Generic[B]):
    """A signed record. Build with `sign_record`; read untrusted bytes with `verify_record`."""

    type: str
    signer: str
    body: B
    sig: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "signer": self.signer, "body": _dump(self.body), "sig": self.sig}

    def encode(self) -> bytes:
        return self._encoded

    @cached_property
    def _encoded(self) -> bytes:  # records are immutable: encode once
        return encode_canonical(self.to_wire())

    @cached_property
    def cid(self) -> CID:
        return cid_of(self.encode(), DAG_CBOR)

    def to_json(self) -> dict[str, Any]:
        """JSON view for HTTP bodies: bytes as hex, everything else as in the record."""
        return {"type": self.type, "signer": self.signer, "body": _dump(self.body), "sig": self.sig.hex()}


def _dump(body: RecordBody) -> dict[str, Any]:
    return body.model_dump(mode="python")


def _signing_bytes(type_name: str, signer: str, body: dict[str, Any]) -> bytes:
    return encode_canonical({"type": type_name, "signer": signer, "body": body})


def sign_record(identity: Identity, body: B) -> Record[B]:
    """Sign `body` as this identity; the type comes from the body's registered model."""
    type_name = type(body).record_type
    if type_name not in _TYPES:
        raise UnknownRecordType(f"{type(body).__name__} is not a registered record type")
    signer = str(identity.peer_id)
    data = _dump(body)
    sig = identity.sign(_signing_bytes(type_name, signer, data))
    record = Record(type=type_name, signer=signer, body=body, sig=sig)
    # its bytes from the same dump (what `encode` would compute again): a receipt's body is hundreds of objects
    record.__dict__["_encoded"] = encode_canonical({"type": type_name, "signer": signer, "body": data, "sig": sig})
    return record


def decode_record(data: bytes | dict[str, Any]) -> Record[Any]:
    """Parse a record (bytes, or its JSON view) without checking the signature: see verify_record."""
    return _decode(data)[0]


def _decode(data: bytes | dict[str, Any]) -> tuple[Record[Any], dict[str, Any]]:
    """The record, and its parsed body dumped as plain data (what the signature covers)."""
    wire = decode_canonical(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    if not isinstance(wire, dict) or set(wire) != {"type", "signer", "body", "sig"}:
        raise MalformedRecord("a record is a map with exactly the keys type, signer, body, sig")
    type_name, signer, body, sig = wire["type"], wire["signer"], wire["body"], wire["sig"]
    if isinstance(sig, str):
        try:
            sig = bytes.fromhex(sig)
        except ValueError as exc:
            raise MalformedRecord("sig is not hex") from exc
    if not isinstance(type_name, str) or not isinstance(signer, str) or not isinstance(body, dict):
        raise MalformedRecord("type and signer must be strings and body a map")
    if not isinstance(sig, bytes) or len(sig) != 64:
        raise MalformedRecord("sig must be a 64-byte Ed25519 signature")
    model = _TYPES.get(type_name)
    if model is None:
        raise UnknownRecordType(f"unknown record type {type_name[:80]!r}")
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise MalformedRecord(f"{type_name} body is invalid: {_first_error(exc)}") from exc
    if (dumped := _dump(parsed)) != body:
        raise MalformedRecord(f"{type_name} body does not round-trip (wrong field types)")
    return Record(type=type_name, signer=signer, body=parsed, sig=sig), dumped


def verify_record(data: bytes | dict[str, Any], expect: type[B] | None = None) -> Record[B]:
    """Decode and check a record: canonical, known type, valid body, signed by its signer."""
    record, body = _decode(data)
    if expect is not None and record.type != expect.record_type:
        raise UnknownRecordType(f"expected a {expect.record_type} record, got {record.type}")
    try:
        peer = PeerId.parse(record.signer)
    except InvalidPeerId as exc:
        raise MalformedRecord(f"signer is not a peer id: {exc}") from exc
    if not peer.verify(record.sig, _signing_bytes(record.type, record.signer, body)):
        raise BadSignature(f"{record.type} record signature does not match signer {record.signer}")
    return record  # type: ignore[return-value]


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}"


# -- record types ---------------------------------------------------------------------------------

NonNegInt = Field(ge=0)


class SamplingParams(RecordBody):
    temperature: float = Field(ge=0.0, le=2.0)
    top_p: float = Field(gt=0.0, le=1.0)
    seed: int
    max_tokens: int = Field(ge=0)
    stop: list[str] = []


class TopLogprob(RecordBody):
    token: int = NonNegInt
    logprob: float


class PriceCharged(RecordBody):
    """Prices in micro-credits per 1M tokens, charge in micro-credits (integers: no float drift)."""

    input_per_mtok: int = NonNegInt
    output_per_mtok: int = NonNegInt
    charged: int = NonNegInt


def token_charge(prompt_tokens: int, completion_tokens: int, input_per_mtok: int, output_per_mtok: int) -> int:
    """What `prompt_tokens` in and `completion_tokens` out cost at these prices per 1M tokens, in
    micro-credits rounded up: the rule a receipt's `price.charged` follows, and gateways hold and check by."""
    return math.ceil((prompt_tokens * input_per_mtok + completion_tokens * output_per_mtok) / 1_000_000)


@register("agora/receipt/1")
class ReceiptBody(RecordBody):
    """What a provider served: binds model, request, output, sampling (and the rule it sampled by) and price."""

    model: str
    precision: str
    # The sampling rule the tokens were chosen by (verify.rules: judged by this name) and the digest of the
    # implementation that chose them (recorded, not judged). Receipts signed before these fields existed
    # are refused: they came from rule agora-gumbel-v1 or -v2 unstated, and cannot be told apart.
    rule: str
    rule_digest: str
    request: str  # CID of the canonical request
    request_id: str
    prompt_tokens: int = NonNegInt
    # Tokens generated: len(output_tokens), or an upstream engine's own count when it reports no ids.
    completion_tokens: int = Field(default=0, ge=0)
    prefix_tokens: list[int] = []  # tokens already generated elsewhere (gateway failover)
    output_tokens: list[int]
    output_text: str  # exactly the text returned to the client
    logprobs: list[float]
    top_logprobs: list[list[TopLogprob]]
    sampling: SamplingParams
    finish_reason: str
    price: PriceCharged
    started_ms: int = NonNegInt
    finished_ms: int = NonNegInt

    @model_validator(mode="before")
    @classmethod
    def _names_its_rule(cls, data: Any) -> Any:
        if isinstance(data, dict) and "rule" not in data:
            raise ValueError("the receipt names no sampling rule: it was signed before receipts bound their rule "
                             "(agora-gumbel-v1 until 2026-12-02, then -v2, unstated), so no verifier can tell which "
                             "rule to judge it by; the provider must upgrade agoranet")
        return data


@register("agora/receipt-summary/1")
class ReceiptSummaryBody(RecordBody):
    """What a client needs to hold a provider to an answer without its full receipt: signed by the same key,
    it names the full receipt's CID (fetched by CID for token ids and logprobs) and states what it binds."""

    receipt: str  # CID of the full receipt record
    model: str
    precision: str
    request: str  # CID of the canonical request
    request_id: str
    prompt_tokens: int = NonNegInt
    completion_tokens: int = NonNegInt
    output_sha256: str  # hex SHA-256 of output_text's UTF-8 bytes: the text returned to the client
    finish_reason: str
    price: PriceCharged
    started_ms: int = NonNegInt
    finished_ms: int = NonNegInt

    @classmethod
    def of(cls, receipt: Record[ReceiptBody]) -> ReceiptSummaryBody:
        """The summary of a receipt: a pure function of it, so anyone holding both checks one against the other."""
        b = receipt.body
        return cls(receipt=str(receipt.cid), model=b.model, precision=b.precision, request=b.request,
                   request_id=b.request_id, prompt_tokens=b.prompt_tokens,
                   completion_tokens=len(b.output_tokens) or b.completion_tokens,
                   output_sha256=hashlib.sha256(b.output_text.encode()).hexdigest(), finish_reason=b.finish_reason,
                   price=b.price, started_ms=b.started_ms, finished_ms=b.finished_ms)


class OfferedModel(RecordBody):
    cid: str
    name: str
    input_per_mtok: int = NonNegInt
    output_per_mtok: int = NonNegInt
    context_length: int = NonNegInt
    vocab_size: int = Field(default=0, ge=0)  # token ids are below it (0: the engine reports none); gateways check prefixes
    # The range its tolerance record was calibrated over, which the provider serves within (prompt + prefix
    # tokens, output tokens; 0: no range stated, e.g. an upstream engine, whose receipts are never replayed).
    max_prompt_tokens: int = Field(default=0, ge=0)
    max_output_tokens: int = Field(default=0, ge=0)


@register("agora/offer/1")
class OfferBody(RecordBody):
    """What a provider sells, where to reach it, and until when the offer stands."""

    url: str
    models: list[OfferedModel]
    precision: str
    rule: str  # the sampling rule its receipts are chosen by (verify.rules); gateways route only to one they know
    max_concurrency: int = Field(ge=1)
    hardware: str
    engine: str
    issued_ms: int = NonNegInt
    expires_ms: int = NonNegInt
    nonce: str
