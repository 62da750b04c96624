"""Byte-level tokenizer and chat template of the bundled `agora-tiny` model.

Ids 0..255 are the bytes themselves; specials follow (read from the model's tokenizer.json).
agora-tiny is a code model trained on Python source, so its chat template renders the
conversation as a Python comment block and lets the model answer in code:

    <|bos|># system:
    # You write small Python functions.
    # user:
    # add two numbers
    # assistant:
    <answer, raw text>

Each message's lines are prefixed with "# "; earlier assistant turns follow their header raw
and end with a newline. Generation stops at <|eos|>, a stop string, or max_tokens.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path

from agoranet.core.errors import ModelError


@dataclass(frozen=True)
class ByteTokenizer:
    vocab_size: int
    bos: int
    eos: int
    pad: int

    @classmethod
    def from_dir(cls, model_dir: Path) -> ByteTokenizer:
        path = model_dir / "tokenizer.json"
        try:
            spec = json.loads(path.read_text())
            specials = spec["specials"]
            if spec.get("type") != "agora-bytes":
                raise ValueError(f"tokenizer type {spec.get('type')!r}")
            return cls(spec["vocab_size"], specials["<|bos|>"], specials["<|eos|>"], specials["<|pad|>"])
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(
                f"{path} is not an Agora byte tokenizer: {exc}",
                hint="the built-in engine serves byte-level models like agora-tiny; use --upstream for others",
            ) from exc

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def decode(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        """One token as text for logprobs; specials by name, partial UTF-8 as escapes."""
        if token >= 256:
            return {self.bos: "<|bos|>", self.eos: "<|eos|>", self.pad: "<|pad|>"}.get(token, f"<|{token}|>")
        return bytes([token]).decode("utf-8", errors="backslashreplace")

    def chat_prompt(self, messages: list[tuple[str, str]]) -> list[int]:
        parts: list[str] = []
        for role, content in messages:
            if role == "assistant":
                parts.append(f"# assistant:\n{content}\n")
            else:
                body = "\n".join(f"# {line}" if line else "#" for line in content.split("\n"))
                parts.append(f"# {role}:\n{body}\n")
        parts.append("# assistant:\n")
        return [self.bos, *self.encode("".join(parts))]

    def completion_prompt(self, prompt: str) -> list[int]:
        return [self.bos, *self.encode(prompt)]


class StreamDecoder:
    """Turns a stream of byte tokens into text deltas without splitting UTF-8 characters."""

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
