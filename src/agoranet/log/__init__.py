"""Layer 2: the transparency log (RFC 9162 Merkle trees, signed heads, split views) and credits."""

from agoranet.log.credits import CreditLedger, EarningsProof, verify_earnings
from agoranet.log.errors import CreditError, InsufficientCredits, InvalidProof, InvalidTreeHead, LogError
from agoranet.log.merkle import leaf_hash, verify_consistency, verify_inclusion
from agoranet.log.records import (
    CreditMoveBody, EarningsStatementBody, SplitViewProof, TreeHeadBody, check_heads, verify_tree_head,
)
from agoranet.log.transparency import LogEntry, TransparencyLog

__all__ = [
    "CreditError", "CreditLedger", "CreditMoveBody", "EarningsProof", "EarningsStatementBody",
    "InsufficientCredits", "InvalidProof", "InvalidTreeHead", "LogEntry", "LogError", "SplitViewProof",
    "TransparencyLog", "TreeHeadBody", "check_heads", "leaf_hash", "verify_consistency", "verify_earnings",
    "verify_inclusion", "verify_tree_head",
]
