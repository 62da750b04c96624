"""Errors of the log layer: bad proofs, bad requests for proofs, forks, and credit problems."""

from __future__ import annotations

from agoranet.core.errors import AgoraError


class LogError(AgoraError):
    """Something about a transparency log that cannot be trusted or served."""


class InvalidProof(LogError):
    hint = "the log served a proof that does not check out; do not trust its head"


class ProofRequestError(LogError, ValueError):
    """A proof or entry range that the log cannot give, e.g. for a size it has not reached."""

    hint = "ask for sizes at most the current head's size, and indices below the size"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EntryNotFound(LogError, KeyError):
    hint = "the record was never appended to this log; check the CID and the log URL"

    def __str__(self) -> str:  # KeyError would quote the message
        return AgoraError.__str__(self)


class CorruptLog(LogError):
    hint = "restore the log database from a replica; do not append to it until then"


class InvalidTreeHead(LogError):
    hint = "the signed tree head is forged or malformed; do not trust this log"


class CreditError(AgoraError):
    """A credit move that the ledger refuses."""


class InsufficientCredits(CreditError):
    hint = "fund the account first (operator → user) or lower the request's max price"


class UnknownAccount(CreditError, KeyError):
    hint = "accounts look like 'user:NAME', 'provider:PEER', 'verifier:PEER' or 'operator'"

    def __str__(self) -> str:
        return AgoraError.__str__(self)


class InvalidAmount(CreditError, ValueError):
    hint = "amounts are whole micro-credits greater than zero"


class EscrowError(CreditError):
    hint = "hold an escrow once per request id and settle it once, for at most what it holds"


class InvalidStatement(CreditError):
    hint = "the earnings statement does not match the log; ask the gateway for a fresh one"
