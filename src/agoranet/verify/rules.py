"""The sampling rules by name (torch-free, so gateways can read it): what receipts and offers name, and which
rules this code judges. The rule itself is `verify.rule`.

A receipt names the rule its tokens were chosen by (`ReceiptBody.rule`) and the digest of the implementation
that chose them (`rule_digest`). Verifiers judge by the name: a rule they know is replayed as that rule, and a
name they do not know is its provider's choice, so it is a violation (never a fraud proof under another
rule). The digest is the sha256 of `verify/rule.py` (what the vLLM logits processor already checks): it
changes with any edit of that file, comments included, so it is recorded and reported, never judged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["RULE", "RULES", "RETIRED", "RULE_DIGEST"]

RULE = "agora-gumbel-v2"  # the rule providers apply and receipts name (verify/rule.py defines it)
RULES = frozenset({RULE})  # the rules this code can judge
# Rules once applied that no verifier judges any more, and why (a receipt naming one is a violation).
RETIRED = {"agora-gumbel-v1": "its top_p slack admitted every token at bf16 (top_p ≥ ~0.46 at T 0.7); "
                              "providers apply agora-gumbel-v2 since 2026-12-02"}
RULE_DIGEST = hashlib.sha256(Path(__file__).with_name("rule.py").read_bytes()).hexdigest()[:16]
