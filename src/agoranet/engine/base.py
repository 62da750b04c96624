"""The one small interface every engine implements, and the events it streams."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from agoranet.core.errors import RequestError
from agoranet.wire.canonical import CanonicalMessage, CanonicalRequest, CanonicalSampling


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
    prompt_ids: tuple[int, ...] = ()  # the rendered prompt, when the provider has rendered it (receipts bind it)
    # Whether the consumer reads each TokenEvent as it comes (a streamed answer). False (a non-streamed answer):
    # an engine may send only the first TokenEvent and the Generation, sparing its consumer a wake-up per token.
    # Not part of the generation: receipts never bind it (see canonical).
    stream: bool = field(default=True, compare=False)

    def canonical(self, model_cid: str) -> CanonicalRequest:
        """What a receipt for this generation binds (see wire.canonical)."""
        s = self.sampling
        return CanonicalRequest(
            kind=self.kind, model=model_cid, request_id=self.request_id,
            sampling=CanonicalSampling(temperature=float(s.temperature), top_p=float(s.top_p), seed=s.seed,
                                       max_tokens=s.max_tokens, stop=list(s.stop)),
            top_logprobs=self.top_logprobs, prefix_tokens=list(self.prefix_tokens),
            messages=[CanonicalMessage(role=r, content=c) for r, c in self.messages] if self.kind == "chat" else None,
            prompt=self.prompt if self.kind == "completion" else None,
            prompt_tokens=list(self.prompt_ids) or None,
        )

    @classmethod
    def from_canonical(cls, request: CanonicalRequest) -> GenerationRequest:
        """The generation a canonical request asked for (a verifier renders its prompt from it)."""
        s = request.sampling
        return cls(request_id=request.request_id, kind=request.kind,
                   sampling=Sampling(temperature=s.temperature, top_p=s.top_p, seed=s.seed, max_tokens=s.max_tokens,
                                     stop=tuple(s.stop)),
                   messages=tuple(request.chat_messages()), prompt=request.prompt or "",
                   top_logprobs=request.top_logprobs, prefix_tokens=tuple(request.prefix_tokens))


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (token is None for engines that only see text) and its text delta."""

    text: str
    token: int | None = None
    logprob: float | None = None
    # Every alternative the receipt records for this token (a partial receipt is signed from these); the
    # wire shows only the top_logprobs asked for.
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
    vocab_size: int  # every token id is below it; 0 when the engine reports no token ids

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Generation]:
        """Yield TokenEvents as they are produced, then exactly one Generation."""
        ...

    def token_text(self, token: int) -> str: ...

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The prompt as the model's token ids (chat template applied); [] for engines that only see text."""
        ...


def prompt_ids(renderer: PromptRenderer, request: GenerationRequest) -> list[int]:
    """An engine's prompt: the ids the request carries (a continuation's), else its text rendered."""
    return list(request.prompt_ids) if request.prompt_ids else render_prompt(renderer, request)


class PromptRenderer(Protocol):
    """What renders a request to token ids: a tokenizer with the model's chat template (or llama.cpp's model)."""

    def chat_prompt(self, messages: list[tuple[str, str]]) -> list[int]: ...

    def completion_prompt(self, prompt: str) -> list[int]: ...


def render_prompt(renderer: PromptRenderer, request: GenerationRequest) -> list[int]:
    """The prompt token ids of a request's text: what an engine generates from and what a verifier re-renders
    to check the ids a receipt binds."""
    if request.kind == "chat":
        return renderer.chat_prompt(list(request.messages))
    return renderer.completion_prompt(request.prompt)


def check_request(request: GenerationRequest, prompt: list[int], *, vocab_size: int, context_length: int) -> None:
    """Refuse (400) what the model cannot take: a continued prefix holding ids outside its vocabulary, or a
    prompt, prefix and max_tokens beyond its context."""
    if (bad := next((t for t in request.prefix_tokens if not 0 <= t < vocab_size), None)) is not None:
        raise RequestError(f"agora.prefix_tokens holds {bad}, not a token id of this model (0 to {vocab_size - 1})",
                           param="agora.prefix_tokens", code="invalid_token")
    check_context(context_length, len(prompt), len(request.prefix_tokens), request.sampling.max_tokens)


def check_context(context_length: int, prompt: int, prefix: int, max_tokens: int) -> None:
    """Refuse (400) a request whose prompt, continued prefix and max_tokens cannot fit the model's context."""
    if prompt + prefix + max_tokens > context_length:
        raise RequestError(
            f"this model's context is {context_length} tokens; the prompt takes {prompt} and "
            f"max_tokens asks for {max_tokens} more",
            param="max_tokens", code="context_length_exceeded",
        )


async def drain(queue: asyncio.Queue[TokenEvent | Generation | BaseException],
                cancelled: threading.Event) -> AsyncGenerator[TokenEvent | Generation, None]:
    """Yield what an engine thread puts on `queue` up to the Generation, raising the errors it puts there;
    however the consumer stops, tell the thread (`cancelled`) so the generation stops too."""
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Generation):
                return
    finally:
        cancelled.set()


def cut_at_stop(text: str, stops: tuple[str, ...], *, final: bool) -> tuple[str, str, bool]:
    """(text to send, text held back, whether a stop string ended it): cut at the first stop string,
    hold back a tail that could begin one."""
    stops = tuple(s for s in stops if s)
    if not stops:
        return text, "", False
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    hold = 0 if final else max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - hold], text[len(text) - hold:], False
