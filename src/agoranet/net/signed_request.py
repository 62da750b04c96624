"""Requests one node signs for another: the `x-agora-signed` header, written and checked here only.

A node proves who sent a request (its own gateway calling its provider, a storage peer announcing a
replica) by signing the method, path, a timestamp and the SHA-256 of the body with its identity:
`x-agora-signed: <peer id> <unix ms> <signature hex>`. The receiver decides which peer ids it
serves; a signature older or newer than `max_skew_ms` is refused, so a captured request can be
replayed only within that window, and only unchanged.
"""

from __future__ import annotations

import hashlib
import time

from agoranet.core.errors import RequestError
from agoranet.core.identity import Identity, PeerId

HEADER = "x-agora-signed"
MAX_SKEW_MS = 30_000


def _message(method: str, path: str, ts_ms: int, body: bytes) -> bytes:
    return b"\n".join([b"agora-request/1", method.upper().encode(), path.encode(), str(ts_ms).encode(),
                       hashlib.sha256(body).hexdigest().encode()])


def sign_request(identity: Identity, method: str, path: str, body: bytes = b"", *, now_ms: int | None = None) -> str:
    """The `x-agora-signed` header value for a request to `path` (the URL's path, no query) with `body`."""
    ts = int(time.time() * 1000) if now_ms is None else now_ms
    return f"{identity.peer_id} {ts} {identity.sign(_message(method, path, ts, body)).hex()}"


def request_signer(header: str | None, method: str, path: str, body: bytes = b"", *,
                   max_skew_ms: int = MAX_SKEW_MS, now_ms: int | None = None) -> str | None:
    """The peer id that signed this request, or None when it carries no signature header.

    Raises a 401 `RequestError` for a header that is malformed, stale, or whose signature does not hold.
    """
    if header is None:
        return None
    try:
        peer_text, ts_text, sig_hex = header.split(" ")
        peer, ts, sig = PeerId.parse(peer_text), int(ts_text), bytes.fromhex(sig_hex)
    except Exception:  # any malformed part is the same answer: not a signature we can check
        raise _unauthorized(f"the {HEADER} header is not `<peer id> <unix ms> <signature hex>`") from None
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if abs(now - ts) > max_skew_ms:
        raise _unauthorized(f"the {HEADER} signature is {abs(now - ts) // 1000} s away from this node's clock")
    if not peer.verify(sig, _message(method, path, ts, body)):
        raise _unauthorized(f"the {HEADER} signature does not match this request")
    return str(peer)


def _unauthorized(message: str) -> RequestError:
    return RequestError(message, status=401, code="invalid_signature", type="authentication_error")
