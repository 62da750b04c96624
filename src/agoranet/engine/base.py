"""The one small interface every engine implements, and the events it streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. `messages` for chat, `prompt` for plain completion."""

    request_id: str
    kind: Literal["chat", "completion"]
    sampling: Sampling
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    top_logprobs: int = 0
    prefix_tokens: tuple[int, ...] = ()  # already generated (failover continuation)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (token is None for engines that only see text) and its text delta."""

    text: str
    token: int | None = None
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Generation:
    """What the engine reports when a generation ends."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    completion_tokens: int = 0  # len(tokens), or the upstream's own count when ids are unknown


class Engine(Protocol):
    """Built-in transformers engine or an OpenAI-compatible upstream."""

    name: str  # engine kind, e.g. "transformers" or "upstream"
    model_name: str
    model_cid: str
    precision: str
    context_length: int

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        """Yield TokenEvents as they are produced, then exactly one Generation."""
        ...

    def token_text(self, token: int) -> str: ...
