"""The log layer's wire formats: signed tree heads, credit moves, earnings statements, split views.

Every one is a core signed record (`agora/…/1`) except the split-view proof, which is evidence made
of two signed heads and the proof that fails to join them: anyone can re-check it without trusting
whoever hands it over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from agoranet.core.errors import RecordError
from agoranet.core.records import Record, RecordBody, register, verify_record
from agoranet.log.errors import InvalidProof, InvalidTreeHead
from agoranet.log.merkle import verify_consistency

__all__ = [
    "TreeHeadBody", "CreditMoveBody", "EarningsStatementBody", "SplitViewProof", "SplitViewsBody",
    "verify_tree_head", "check_heads", "MoveKind",
]

HexHash = Field(pattern=r"^[0-9a-f]{64}$")
NonNeg = Field(ge=0)


@register("agora/tree-head/1")
class TreeHeadBody(RecordBody):
    """A log's signed word that its first `size` entries hash to `root` (RFC 9162 MTH, hex)."""

    log_id: str  # the log's peer id; must equal the record's signer
    size: int = NonNeg
    root: str = HexHash
    timestamp_ms: int = NonNeg

    @property
    def root_hash(self) -> bytes:
        return bytes.fromhex(self.root)


MoveKind = Literal["mint", "fund", "hold", "settle", "refund"]


@register("agora/credit-move/1")
class CreditMoveBody(RecordBody):
    """One double-entry move of whole micro-credits from `debit` to `credit`, numbered by `seq`."""

    seq: int = NonNeg
    kind: MoveKind
    debit: str
    credit: str
    amount: int = Field(gt=0)
    request_id: str = ""
    timestamp_ms: int = NonNeg


@register("agora/earnings/1")
class EarningsStatementBody(RecordBody):
    """What `account` was credited, move by move, in the ledger's log up to `log_size` entries."""

    account: str
    moves: list[str]  # CIDs of the credit-move records that credited the account, in log order
    total: int = NonNeg
    log_size: int = NonNeg
    log_root: str = HexHash
    issued_ms: int = NonNeg


def verify_tree_head(data: bytes | dict[str, Any]) -> Record[TreeHeadBody]:
    """Check a signed tree head: a valid signature by the very log it speaks for."""
    try:
        record = verify_record(data, TreeHeadBody)
    except RecordError as exc:
        raise InvalidTreeHead(f"tree head does not verify: {exc}") from exc
    if record.body.log_id != record.signer:
        raise InvalidTreeHead(f"tree head for log {record.body.log_id} is signed by another key {record.signer}")
    return record


@dataclass(frozen=True)
class SplitViewProof:
    """Two heads signed by one log that cannot both describe the same append-only history."""

    first: Record[TreeHeadBody]
    second: Record[TreeHeadBody]
    consistency_proof: tuple[bytes, ...]  # what the log offered to join them (empty for equal sizes)
    reason: str

    @property
    def conclusive(self) -> bool:
        """Equal sizes with different roots prove a fork to anyone; otherwise the log gave a bad proof.

        For different sizes a third party should ask the log for its own consistency proof: if the
        log can produce one that verifies, the report is void; if it cannot, the fork stands.
        """
        return self.first.body.size == self.second.body.size

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first.to_json(), "second": self.second.to_json(),
            "consistency_proof": [h.hex() for h in self.consistency_proof], "reason": self.reason,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SplitViewProof:
        """Parse and re-check the evidence; raises InvalidTreeHead if it does not show a split view."""
        try:
            first, second = data["first"], data["second"]
            proof = [bytes.fromhex(h) for h in data["consistency_proof"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidTreeHead(f"split-view proof is malformed: {exc}") from exc
        split = check_heads(first, second, proof)
        if split is None:
            raise InvalidTreeHead("the two heads are consistent: this is no split-view proof")
        return split


@register("agora/split-views/1")
class SplitViewsBody(RecordBody):
    """The conclusive split-view proofs a witness holds, gossiped so that a node which only ever saw
    one of a log's views (an eclipsed one) learns of the fork too. Whoever receives it re-checks every
    proof (`SplitViewProof.from_json`) and trusts nothing else in it, the signer included."""

    proofs: list[dict[str, Any]]  # SplitViewProof.to_json() each
    issued_ms: int = NonNeg


def check_heads(
    first: bytes | dict[str, Any] | Record[TreeHeadBody],
    second: bytes | dict[str, Any] | Record[TreeHeadBody],
    proof: list[bytes],
) -> SplitViewProof | None:
    """Verify two heads of one log and the consistency proof between them.

    Returns None when the smaller head is a prefix of the larger, or the split-view proof when
    not. Raises InvalidTreeHead for a bad signature or heads of two different logs.
    """
    a = first if isinstance(first, Record) else verify_tree_head(first)
    b = second if isinstance(second, Record) else verify_tree_head(second)
    if isinstance(first, Record):
        verify_tree_head(a.to_json())
    if isinstance(second, Record):
        verify_tree_head(b.to_json())
    if a.body.log_id != b.body.log_id:
        raise InvalidTreeHead(f"heads of two different logs ({a.body.log_id}, {b.body.log_id}) cannot split")
    if a.body.size > b.body.size:
        a, b = b, a
    try:
        verify_consistency(a.body.size, b.body.size, a.body.root_hash, b.body.root_hash, proof)
    except InvalidProof as exc:
        return SplitViewProof(a, b, tuple(proof), str(exc))
    return None
