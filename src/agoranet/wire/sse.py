"""Server-sent events as the OpenAI API streams them: one JSON payload per `data:` line, then `[DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import pydantic_core

from agoranet.core.errors import AgoraError

DONE = "[DONE]"
_DONE = DONE.encode()


class StreamTruncated(AgoraError):
    """The stream ended before its `[DONE]`: the sender died or was cut off mid-answer."""

    hint = "the peer stopped mid-stream; retry, or try another one"


def sse_data(payload: Any) -> str:
    """One event's data: compact JSON (NaN and infinities as JSON5 constants, as json.dumps writes them)."""
    # json.dumps(separators=(",", ":"), ensure_ascii=False)'s JSON (exponents may print as 1e-7, not 1e-07)
    # at a fifth of its cost: this runs for every token of every stream, at the provider and the gateway.
    return pydantic_core.to_json(payload, inf_nan_mode="constants").decode()


async def sse_payloads(lines: AsyncIterable[bytes] | AsyncIterable[str]) -> AsyncIterator[bytes]:
    """The data payloads of a stream's lines up to `[DONE]`; StreamTruncated when the lines end first."""
    async for line in lines:
        raw = line.encode() if isinstance(line, str) else line
        if not raw.startswith(b"data:"):
            continue  # comments (keep-alive pings), event names, blank separators
        data = raw[5:].strip()
        if data == _DONE:
            return
        yield data
    raise StreamTruncated("the stream ended without [DONE]")
