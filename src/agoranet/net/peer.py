"""Talking to other Agora nodes over HTTP: gossip exchanges and OpenAI-style requests and streams.

Failures come out as two errors a caller can act on: `PeerUnreachable` (could not connect, the
connection broke, or the peer went silent for longer than the stall timeout: try another peer) and
`PeerRefused` (the peer answered with an HTTP error: its status and OpenAI error body are kept).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from agoranet.core.errors import AgoraError


class PeerError(AgoraError):
    """Something went wrong talking to another node."""


class PeerUnreachable(PeerError):
    hint = "the peer is down, cut off or stalled; try another one"


class PeerRefused(PeerError):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        super().__init__(f"peer answered HTTP {status}: {message or str(body)[:200]}")
        self.status, self.body = status, body


class PeerStream:
    """An open SSE stream from a peer; iterate `chunks()` for its decoded data payloads."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    async def aclose(self) -> None:
        await self.response.aclose()

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        try:
            async for line in self.response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)
        except httpx.TransportError as exc:
            raise PeerUnreachable(f"lost the stream from {self.response.url.host}:{self.response.url.port}: "
                                  f"{type(exc).__name__}") from exc
        except json.JSONDecodeError as exc:
            raise PeerUnreachable(f"peer sent a chunk that is not JSON: {exc}") from exc
        raise PeerUnreachable("the stream ended without [DONE]")


class PeerClient:
    """One pooled HTTP client for all peers; `read_timeout_s` is also the stall timeout of streams."""

    def __init__(self, *, connect_timeout_s: float = 2.0, read_timeout_s: float = 30.0,
                 max_connections: int = 512) -> None:
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s, pool=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def gossip(self, url: str, records: list[dict[str, Any]], *, max_bytes: int = 4 << 20) -> list[Any]:
        """Push our live records to a peer; get back the ones we lack (an answer over `max_bytes` is refused)."""
        try:
            async with self._http.stream("POST", url.rstrip("/") + "/agora/v1/gossip", json={"records": records}) as r:
                raw = bytearray()
                async for part in r.aiter_bytes():
                    raw += part
                    if len(raw) > max_bytes:
                        raise PeerUnreachable(f"{url} answered gossip with more than {max_bytes} bytes")
        except httpx.TransportError as exc:
            raise PeerUnreachable(f"cannot reach {url}: {type(exc).__name__} {exc}") from exc
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if r.status_code >= 400:
            raise PeerRefused(r.status_code, body)
        got = body.get("records") if isinstance(body, dict) else None
        if not isinstance(got, list):
            raise PeerUnreachable(f"{url} answered gossip with something that is not a record list")
        return got

    async def post_json(self, url: str, path: str, body: dict[str, Any],
                        headers: dict[str, str] | None = None) -> Any:
        try:
            r = await self._http.post(url.rstrip("/") + path, json=body, headers=headers)
        except httpx.TransportError as exc:
            raise PeerUnreachable(f"cannot reach {url}: {type(exc).__name__} {exc}") from exc
        try:
            payload = r.json()
        except ValueError:
            payload = {"error": {"message": r.text[:300]}}
        if r.status_code >= 400:
            raise PeerRefused(r.status_code, payload)
        return payload

    async def open_stream(self, url: str, path: str, body: dict[str, Any]) -> PeerStream:
        """POST a streaming request; returns once the peer has answered 200 (the caller closes it)."""
        request = self._http.build_request("POST", url.rstrip("/") + path, json=body)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise PeerUnreachable(f"cannot reach {url}: {type(exc).__name__} {exc}") from exc
        if response.status_code < 400:
            return PeerStream(response)
        try:
            await response.aread()
            payload = response.json()
        except (httpx.TransportError, ValueError):
            payload = {"error": {"message": f"HTTP {response.status_code}"}}
        finally:
            await response.aclose()
        raise PeerRefused(response.status_code, payload)
