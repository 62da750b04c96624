"""The canonical request: the DAG-CBOR form of what was asked, whose CID every receipt binds.

A provider encodes it when it answers; a verifier decodes it to render the prompt it replays and to
check that the receipt's sampling matches what was asked.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from agoranet.core.errors import MalformedRecord
from agoranet.core.records import decode_canonical, encode_canonical


class _Strict(BaseModel):
    # Fields a later version adds are ignored; what is read is never coerced ("1" is no number).
    model_config = ConfigDict(extra="ignore", strict=True)


class CanonicalSampling(_Strict):
    temperature: float
    top_p: float
    seed: int
    max_tokens: int
    stop: list[str]


class CanonicalMessage(_Strict):
    role: str
    content: str


class CanonicalRequest(_Strict):
    """`messages` for chat, `prompt` for a plain completion (the other is absent from the encoding)."""

    kind: Literal["chat", "completion"]
    model: str  # the model's CID
    request_id: str
    sampling: CanonicalSampling
    top_logprobs: int
    prefix_tokens: list[int]
    messages: list[CanonicalMessage] | None = None
    prompt: str | None = None
    # The rendered prompt's token ids (engines with a tokenizer); verifiers re-render and must find them equal.
    prompt_tokens: list[int] | None = None

    def encode(self) -> bytes:
        return encode_canonical(self.model_dump(exclude_none=True))

    @classmethod
    def decode(cls, data: bytes) -> CanonicalRequest:
        """Parse canonical request bytes; MalformedRecord says what is wrong with them."""
        try:
            return cls.model_validate(decode_canonical(data))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "request"
            raise MalformedRecord(f"canonical request: {where}: {first['msg']}") from exc

    def chat_messages(self) -> list[tuple[str, str]]:
        return [(m.role, m.content) for m in self.messages or []]
