"""A verifier's reputation table: each provider's audit record and each verifier's false proofs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agoranet.verify.records import VerdictBody

if TYPE_CHECKING:
    from agoranet.node.judge import Recheck


@dataclass
class ProviderScore:
    verified: int = 0
    passed: int = 0
    failed: int = 0
    fraud_proofs: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)  # receipts it signed that it may not have (see judge.Violation)
    window_proofs: list[str] = field(default_factory=list)  # failed window tests (verify.window): excluded as fraud

    @property
    def excluded(self) -> bool:
        return bool(self.fraud_proofs or self.violations or self.window_proofs)

    @property
    def score(self) -> float:
        """Laplace-smoothed pass rate; 0 once a fraud is proven (a fraud or window proof) or a violation signed."""
        return 0.0 if self.excluded else (self.passed + 1) / (self.verified + 2)


@dataclass
class VerifierScore:
    proofs_checked: int = 0
    false_proofs: list[str] = field(default_factory=list)


class Reputation:
    """Scores from verdicts and re-checked fraud proofs: what gateways route by."""

    def __init__(self) -> None:
        self.providers: dict[str, ProviderScore] = {}
        self.verifiers: dict[str, VerifierScore] = {}
        self.judged: set[str] = set()  # receipt CIDs counted

    def add_verdict(self, verdict: VerdictBody) -> None:
        """Count a verdict once per receipt CID: a receipt replayed or re-submitted earns no more standing."""
        if verdict.receipt in self.judged:
            return
        self.judged.add(verdict.receipt)
        s = self.providers.setdefault(verdict.provider, ProviderScore())
        s.verified += 1
        if verdict.ok:
            s.passed += 1
        else:
            s.failed += 1
            if verdict.fraud_proof and verdict.fraud_proof not in s.fraud_proofs:
                s.fraud_proofs.append(verdict.fraud_proof)
            if verdict.failure is not None and verdict.failure.kind == "violation":
                s.violations.append(verdict.receipt)

    def add_window_proof(self, provider: str, proof_cid: str) -> None:
        """A window proof this verifier signed (or re-checked to hold): excludes the provider like a fraud proof."""
        s = self.providers.setdefault(provider, ProviderScore())
        if proof_cid not in s.window_proofs:
            s.window_proofs.append(proof_cid)

    def add_recheck(self, proof_cid: str, recheck: Recheck, *, window: bool = False) -> None:
        v = self.verifiers.setdefault(recheck.issuer, VerifierScore())
        v.proofs_checked += 1
        if recheck.holds and window:
            self.add_window_proof(recheck.provider, proof_cid)
        elif recheck.holds:
            s = self.providers.setdefault(recheck.provider, ProviderScore())
            if proof_cid not in s.fraud_proofs:
                s.fraud_proofs.append(proof_cid)
        elif proof_cid not in v.false_proofs:
            v.false_proofs.append(proof_cid)

    def to_json(self) -> dict[str, Any]:
        return {
            "providers": {peer: {"score": round(s.score, 6), "verified": s.verified, "passed": s.passed,
                                 "failed": s.failed, "excluded": s.excluded, "fraud_proofs": s.fraud_proofs,
                                 "violations": s.violations, "window_proofs": s.window_proofs}
                          for peer, s in self.providers.items()},
            "verifiers": {peer: {"proofs_checked": v.proofs_checked, "false_proofs": v.false_proofs,
                                 "trusted": not v.false_proofs} for peer, v in self.verifiers.items()},
        }
