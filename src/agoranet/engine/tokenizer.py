"""Tokenizers: the bundled `agora-tiny` byte tokenizer, and any Hugging Face tokenizer with its chat template.

`load_tokenizer(model_dir)` picks the right one. Both give prompt ids (chat or completion), text for
token ids, and a stream decoder whose deltas always add up to `decode(all ids)` — the text receipts bind.

The byte tokenizer:

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
from typing import Any, Protocol

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

    @property
    def eos_tokens(self) -> frozenset[int]:
        return frozenset({self.eos})

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

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


class Tokenizer(Protocol):
    """What engines and verifiers need of a model's tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_tokens(self) -> frozenset[int]: ...
    def decode(self, tokens: list[int]) -> str: ...
    def token_text(self, token: int) -> str: ...
    def chat_prompt(self, messages: list[tuple[str, str]]) -> list[int]: ...
    def completion_prompt(self, prompt: str) -> list[int]: ...
    def stream_decoder(self) -> TextDecoder: ...


class TextDecoder(Protocol):
    def feed(self, token: int) -> str: ...
    def flush(self) -> str: ...


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The model's own tokenizer: Agora's byte tokenizer, or the Hugging Face one its directory holds."""
    path = model_dir / "tokenizer.json"
    try:
        kind = json.loads(path.read_text()).get("type") if path.exists() else None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}", hint="the model directory looks damaged") from exc
    if kind == "agora-bytes":
        return ByteTokenizer.from_dir(model_dir)
    return HFTokenizer.from_dir(model_dir)


class HFTokenizer:
    """A Hugging Face tokenizer (`tokenizer.json` or SentencePiece) and the chat template its config ships.

    Output text skips special tokens, as OpenAI-compatible servers do; EOS is every id the model's
    config or generation config names as end of sequence, plus the tokenizer's own."""

    def __init__(self, hf: Any, eos_tokens: frozenset[int], vocab_size: int) -> None:
        self._hf = hf
        self._eos = eos_tokens
        self.vocab_size = vocab_size
        self.eos = min(eos_tokens) if eos_tokens else None

    @classmethod
    def from_dir(cls, model_dir: Path) -> HFTokenizer:
        if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
            raise ModelError(f"{model_dir} holds no tokenizer (tokenizer.json or tokenizer.model)",
                             hint="save the model with its tokenizer (tokenizer.save_pretrained(DIR))")
        import transformers

        transformers.logging.disable_progress_bar()
        try:
            hf = transformers.AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:
            raise ModelError(f"cannot load the tokenizer in {model_dir}: {exc}") from exc
        eos: set[int] = set()
        for name in ("config.json", "generation_config.json"):
            try:
                value = json.loads((model_dir / name).read_text()).get("eos_token_id")
            except (OSError, ValueError):
                continue
            eos.update(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
        if hf.eos_token_id is not None:
            eos.add(hf.eos_token_id)
        return cls(hf, frozenset(eos), len(hf))

    @property
    def eos_tokens(self) -> frozenset[int]:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False))

    def decode(self, tokens: list[int]) -> str:
        return self._hf.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token: int) -> str:
        """One token's text for logprobs; specials by name."""
        return self._hf.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def chat_prompt(self, messages: list[tuple[str, str]]) -> list[int]:
        if not getattr(self._hf, "chat_template", None):
            from agoranet.core.errors import RequestError

            raise RequestError("this model has no chat template; use /v1/completions with a plain prompt",
                               param="messages", code="no_chat_template")
        text = self._hf.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                            add_generation_prompt=True, tokenize=False)
        return self.encode(text)

    def completion_prompt(self, prompt: str) -> list[int]:
        return list(self._hf.encode(prompt, add_special_tokens=True))

    def stream_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Text deltas from a stream of BPE/SentencePiece ids: re-decode a short window of recent ids and
    emit what it adds, holding back while it ends in an incomplete character (byte fallback, split
    UTF-8), so the deltas concatenate to exactly `decode(ids)`."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here: context that makes the decoder's spacing right
        self._read = 0  # ids up to here are already emitted
        self._sent = ""  # everything emitted, for the rare decoder that rewrites earlier text

    def feed(self, token: int) -> str:
        self._ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        done = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        delta = text[len(done):]
        if not text.startswith(done):
            full = self._tok.decode(self._ids)  # the window misled us: take whatever the whole decode adds
            delta = full[len(self._sent):] if full.startswith(self._sent) else ""
        self._prefix, self._read = self._read, len(self._ids)
        self._sent += delta
        return delta


class StreamDecoder:
    """Turns a stream of byte tokens into text deltas without splitting UTF-8 characters."""

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        self._tok = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
