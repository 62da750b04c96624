"""Layer 2: the transparency log (RFC 9162 Merkle trees, signed heads, split views) and credits."""

from agoranet.log.errors import InvalidProof, InvalidTreeHead, LogError, SplitViewDetected
from agoranet.log.merkle import leaf_hash, verify_consistency, verify_inclusion
from agoranet.log.records import (
    CreditMoveBody, EarningsStatementBody, SplitViewProof, TreeHeadBody, check_heads, verify_tree_head,
)
from agoranet.log.transparency import LogEntry, TransparencyLog

__all__ = [
    "CreditMoveBody", "EarningsStatementBody", "InvalidProof", "InvalidTreeHead", "LogEntry", "LogError",
    "SplitViewDetected", "SplitViewProof", "TransparencyLog", "TreeHeadBody", "check_heads", "leaf_hash",
    "verify_consistency", "verify_inclusion", "verify_tree_head",
]
