"""Agora's exceptions: one base class, subclasses named for what went wrong, each with a fix."""

from __future__ import annotations


class AgoraError(Exception):
    """Base of every error Agora raises on purpose; `hint` says what to do about it."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} ({self.hint})" if self.hint else text


class InvalidCID(AgoraError, ValueError):
    hint = "a CID looks like 'bafy…' or 'bafk…' (CIDv1, base32)"


class InvalidPeerId(AgoraError, ValueError):
    hint = "peer ids look like 12D3KooW… (libp2p Ed25519) or did:key:z6Mk…"


class IdentityError(AgoraError):
    """Problems with this node's key pair."""


class IdentityExists(IdentityError):
    hint = "pass --force to replace it (the old peer id is lost for good)"


class IdentityMissing(IdentityError):
    hint = "run `agora init` to create one"


class CorruptKeyFile(IdentityError):
    hint = "restore the key file from a backup, or run `agora init --force` for a new identity"


class RecordError(AgoraError):
    """A record that cannot be trusted: malformed, tampered, or of a kind we do not know."""


class MalformedRecord(RecordError):
    hint = "records are canonical DAG-CBOR maps with keys type, signer, body, sig"


class UnknownRecordType(RecordError):
    hint = "upgrade agora, or check that the sender speaks the same protocol version"


class BadSignature(RecordError):
    hint = "the record was changed after signing or signed by another key; do not trust it"


class ModelError(AgoraError):
    """A model that cannot be found or loaded."""


class ModelUnavailable(ModelError):
    """A model CID whose blocks no storage peer given (nor the local store) holds."""


class EngineError(AgoraError):
    """The inference engine could not serve a request."""


class RequestError(AgoraError):
    """A client request that is invalid; carries the HTTP status and OpenAI error fields."""

    def __init__(
        self, message: str, *, status: int = 400, code: str | None = None, param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.type = type
