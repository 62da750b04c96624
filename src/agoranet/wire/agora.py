"""Agora's own HTTP API under `/agora/v1`: its paths and JSON bodies (records, receipts feeds,
verification, reputation, the transparency log, credits, offers).

Signed records travel as their `to_json` view (a dict) and are checked by whoever receives them
(`core.records.verify_record`); hashes and record bytes travel as lowercase hex. Storage peers'
messages are in `wire.storage`, OpenAI bodies in `wire.openai`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "API", "CBOR", "ConsistencyProof", "FeedItem", "FeedPage", "InclusionProof", "LogEntries",
    "OfferAnswer", "ProofCheck", "ProofSubmission", "ProviderStanding", "ReputationTable", "SubmitAnswer",
    "VerifyAnswer", "VerifyRequest", "StatementAnswer",
]

API = "/agora/v1"
CBOR = "application/vnd.ipld.dag-cbor"  # `Accept` for a record's canonical bytes at /records/{cid}


class _Answer(BaseModel):
    # A newer node may add fields; an older client reads what it knows.
    model_config = ConfigDict(extra="ignore")


class VerifyRequest(BaseModel):
    """`POST /verify` (replay now) and `POST /receipts` (offer for sampled audit)."""

    receipt: dict[str, Any] | None = None  # the receipt record (JSON view)
    receipt_cid: str | None = None  # … or its CID, fetched from `node`
    node: str | None = None  # where the receipt and its canonical request are stored
    request: str | None = None  # hex of the canonical request bytes, if not fetched from `node`
    offer: dict[str, Any] | None = None  # the provider's signed offer, whose URL `node` must be


class ProofSubmission(BaseModel):
    """`POST /fraud-proofs`: a fraud proof record for the verifier to re-check."""

    record: dict[str, Any]


class VerifyAnswer(_Answer):
    ok: bool
    verdict_cid: str
    verdict: dict[str, Any]
    fraud_proof_cid: str | None = None
    fraud_proof: dict[str, Any] | None = None


class SubmitAnswer(_Answer):
    receipt_cid: str
    queued: bool


class ProofCheck(_Answer):
    fraud_proof_cid: str
    holds: bool
    provider: str
    issuer: str
    detail: str


class FeedItem(_Answer):
    cid: str
    record: dict[str, Any]


class FeedPage(_Answer):
    """One page of a feed (`/receipts`, `/verdicts`, `/fraud-proofs`): `items` under the feed's own key."""

    items: list[FeedItem] = Field(default_factory=list)
    next: int = 0


class OfferAnswer(_Answer):
    cid: str
    record: dict[str, Any]


class ProviderStanding(_Answer):
    score: float = 0.0
    verified: int = 0
    passed: int = 0
    failed: int = 0
    excluded: bool = False
    fraud_proofs: list[str] = Field(default_factory=list)
    violations: list[str] = Field(default_factory=list)  # CIDs of receipts judged violations (node/judge.py)
    window_proofs: list[str] = Field(default_factory=list)  # CIDs of failed window tests (verify.window)


class ReputationTable(_Answer):
    """`GET /reputation`: a verifier's scores per provider peer id."""

    verifier: str | None = None
    audit_fraction: float | None = None
    audited: int = 0
    providers: dict[str, ProviderStanding] = Field(default_factory=dict)
    verifiers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # model CID -> the precision classes this verifier holds tolerances for; gateways route nothing else
    classes: dict[str, list[str]] | None = None


class InclusionProof(_Answer):
    cid: str
    index: int
    size: int
    proof: list[str]  # hex sibling hashes


class ConsistencyProof(_Answer):
    first: int
    second: int
    proof: list[str]

    def hashes(self) -> list[bytes]:
        return [bytes.fromhex(h) for h in self.proof]


class LogEntries(_Answer):
    start: int = 0
    end: int = 0
    size: int = 0
    # Kept as sent: an auditor reports a malformed entry ({index, cid, record hex}) instead of refusing the page.
    entries: list[dict[str, Any]] = Field(default_factory=list)


class StatementAnswer(_Answer):
    """`GET /credits/statement/{peer_id}`: an earnings proof and the head it names."""

    proof: dict[str, Any]
    head: dict[str, Any]
