"""Talking to other Agora nodes over HTTP: gossip exchanges and OpenAI-style requests and streams.

Failures come out as two errors a caller can act on: `PeerUnreachable` (could not connect, the
connection broke, the peer went silent for longer than the stall timeout, or it sent more or other
than it may: try another peer) and `PeerRefused` (the peer answered with an HTTP error: its status
and OpenAI error body are kept).

This is the gateway's hot path (every user request crosses it once), so it runs on aiohttp, whose
C parser costs about a fifth of the CPU per request that httpx's pure-Python stack does: measured
through a gateway (stub provider, 8 concurrent streams), httpx took 0.65 ms of client CPU per request
against aiohttp's 0.15 ms, and the gateway's whole CPU per request fell from 1.8 ms to 0.63 ms with
the switch (commit 5e38026). Every other node-to-node call (the `/agora/v1` control plane: records,
feeds, reputation, log proofs, storage blocks) is a few per second or less and uses httpx
(`net.agora_client`, `net.storage_client`), like the CLI.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import yarl
from pydantic_core import from_json, to_json

from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity
from agoranet.net.signed_request import HEADER as SIGNED, sign_request
from agoranet.wire.openai import StreamChunk, error_body, error_message
from agoranet.wire.sse import StreamTruncated, sse_payloads

JSON = {"content-type": "application/json"}
# Idle pooled connections are dropped before uvicorn's 5 s keep-alive would close them under us:
# a POST on a connection the server is closing fails, and would count against a healthy provider.
KEEPALIVE_S = 3.0
_NET_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class PeerError(AgoraError):
    """Something went wrong talking to another node."""


class PeerUnreachable(PeerError):
    hint = "the peer is down, cut off or stalled; try another one"


class PeerRefused(PeerError):
    def __init__(self, status: int, body: Any) -> None:
        message = error_message(body)
        super().__init__(f"peer answered HTTP {status}: {message or str(body)[:200]}")
        self.status, self.body = status, body


def _where(response: aiohttp.ClientResponse) -> str:
    return f"{response.url.host}:{response.url.port}"


class PeerStream:
    """An open SSE stream from a peer; iterate `chunks()` for its decoded chunks."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def aclose(self) -> None:
        # An unfinished body closes the connection, which is what stops the peer's generation.
        self.response.release()

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        try:
            async for data in sse_payloads(self.response.content):
                yield StreamChunk.decode(data)
        except _NET_ERRORS as exc:
            raise PeerUnreachable(f"lost the stream from {_where(self.response)}: {type(exc).__name__}") from exc
        except ValueError as exc:  # not JSON, or a line longer than the read buffer
            raise PeerUnreachable(f"{_where(self.response)} sent a stream line that is not a JSON chunk: {exc}") from exc
        except StreamTruncated as exc:
            raise PeerUnreachable(f"the stream from {_where(self.response)} ended without [DONE]") from exc


class PeerClient:
    """One pooled HTTP client for all peers; `read_timeout_s` is also the stall timeout of streams.

    With `signer`, every POST carries that identity's `x-agora-signed` header, so a provider that
    serves only its own node's gateway (`--require-keys`) knows the request came from it.

    Create it inside the event loop that will use it (a role's `start()`), and `aclose()` it there.
    """

    def __init__(self, *, connect_timeout_s: float = 2.0, read_timeout_s: float = 30.0,
                 max_connections: int = 512, max_response_bytes: int = 16 << 20,
                 signer: Identity | None = None) -> None:
        self.max_response_bytes = max_response_bytes
        self.signer = signer
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s),
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=KEEPALIVE_S,
                                           ttl_dns_cache=60),
            read_bufsize=1 << 20,  # the longest SSE line (a chunk with top-20 logprobs is a few KiB)
            skip_auto_headers=("user-agent",), auto_decompress=False,
        )

    async def aclose(self) -> None:
        await self._http.close()

    def _headers(self, url: str, data: bytes, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = JSON | extra if extra else JSON
        if self.signer is not None:
            path = yarl.URL(url).path
            headers = headers | {SIGNED: sign_request(self.signer, "POST", path, data)}
        return headers

    async def _read(self, response: aiohttp.ClientResponse, max_bytes: int, what: str) -> bytes:
        if response.content_length is not None and response.content_length > max_bytes:
            raise PeerUnreachable(f"{_where(response)} answered {what} with more than {max_bytes} bytes")
        raw = bytearray()
        async for part in response.content.iter_any():
            raw += part
            if len(raw) > max_bytes:
                raise PeerUnreachable(f"{_where(response)} answered {what} with more than {max_bytes} bytes")
        return bytes(raw)

    async def _post(self, url: str, path: str, body: dict[str, Any], headers: dict[str, str] | None,
                    max_bytes: int, what: str) -> tuple[int, Any]:
        data = to_json(body)
        try:
            target = url.rstrip("/") + path
            async with self._http.post(target, data=data, headers=self._headers(target, data, headers)) as r:
                raw = await self._read(r, max_bytes, what)
        except _NET_ERRORS as exc:
            raise PeerUnreachable(f"cannot reach {url}: {type(exc).__name__} {exc}") from exc
        try:
            return r.status, from_json(raw)
        except ValueError:
            return r.status, None if r.status < 400 else error_body(raw[:300].decode(errors="replace"))

    async def gossip(self, url: str, records: list[dict[str, Any]], *,
                     max_bytes: int = 4 << 20) -> tuple[list[Any], str | None]:
        """Push our live records to a peer; get back the ones we lack (an answer over `max_bytes` is refused)
        and the peer id the node there says it is (None if it names none)."""
        status, body = await self._post(url, "/agora/v1/gossip", {"records": records}, None, max_bytes, "gossip")
        if status >= 400:
            raise PeerRefused(status, body)
        got = body.get("records") if isinstance(body, dict) else None
        if not isinstance(got, list):
            raise PeerUnreachable(f"{url} answered gossip with something that is not a record list")
        peer = body.get("peer")
        return got, peer if isinstance(peer, str) else None

    async def post_json(self, url: str, path: str, body: dict[str, Any],
                        headers: dict[str, str] | None = None) -> Any:
        """POST a JSON body, return the JSON answer (one over `max_response_bytes` is refused)."""
        status, payload = await self._post(url, path, body, headers, self.max_response_bytes, path)
        if status >= 400:
            raise PeerRefused(status, payload)
        if payload is None:
            raise PeerUnreachable(f"{url} answered {path} with something that is not JSON")
        return payload

    async def open_stream(self, url: str, path: str, body: dict[str, Any]) -> PeerStream:
        """POST a streaming request; returns once the peer has answered 200 (the caller closes it)."""
        data = to_json(body)
        try:
            target = url.rstrip("/") + path
            response = await self._http.post(target, data=data, headers=self._headers(target, data))
        except _NET_ERRORS as exc:
            raise PeerUnreachable(f"cannot reach {url}: {type(exc).__name__} {exc}") from exc
        if response.status < 400:
            return PeerStream(response)
        try:
            payload = from_json(await self._read(response, 1 << 16, path))
        except (PeerError, ValueError, *_NET_ERRORS):
            payload = error_body(f"HTTP {response.status}")
        finally:
            response.release()
        raise PeerRefused(response.status, payload)
