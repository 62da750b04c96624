"""Gateway API keys: only a hash of each key is stored; per-key rate limits, token quotas, metering.

A key reads `agk_<id>_<secret>`; the id finds the row, the sha256 of the whole key must match.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agoranet.core.errors import RequestError

KEYS_FILE = "keys.db"


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created_ms: int
    revoked: bool
    rate_per_min: int  # requests per minute, 0 = unlimited
    quota_tokens: int  # prompt + completion tokens over the key's life, 0 = unlimited
    used_tokens: int
    requests: int
    charged: int  # micro-credits the providers' receipts charged


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, hash TEXT NOT NULL, name TEXT NOT NULL,"
            " created_ms INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, rate_per_min INTEGER NOT NULL,"
            " quota_tokens INTEGER NOT NULL, used_tokens INTEGER NOT NULL DEFAULT 0,"
            " requests INTEGER NOT NULL DEFAULT 0, charged INTEGER NOT NULL DEFAULT 0)"
        )
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}  # key id -> (window start, requests in it)
        self._reserved: dict[str, int] = {}  # key id -> tokens held by requests under way (see `reserve`)

    def create(self, name: str, *, rate_per_min: int = 0, quota_tokens: int = 0) -> tuple[ApiKey, str]:
        """A new key; the secret is returned once and never stored."""
        key_id = secrets.token_hex(6)
        secret = f"agk_{key_id}_{secrets.token_urlsafe(24)}"
        with self._lock:
            self._db.execute(
                "INSERT INTO keys (id, hash, name, created_ms, rate_per_min, quota_tokens) VALUES (?, ?, ?, ?, ?, ?)",
                (key_id, _hash(secret), name, int(time.time() * 1000), rate_per_min, quota_tokens),
            )
        found = self.get(key_id)
        assert found is not None
        return found, secret

    def get(self, key_id: str) -> ApiKey | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, created_ms, revoked, rate_per_min, quota_tokens, used_tokens, requests, charged"
                " FROM keys WHERE id = ?", (key_id,)).fetchone()
        return ApiKey(row[0], row[1], row[2], bool(row[3]), *row[4:]) if row else None

    def list(self) -> list[ApiKey]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM keys ORDER BY created_ms").fetchall()]
        return [k for i in ids if (k := self.get(i)) is not None]

    def revoke(self, key_id: str) -> bool:
        with self._lock:
            return self._db.execute("UPDATE keys SET revoked = 1 WHERE id = ?", (key_id,)).rowcount == 1

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM keys").fetchone()[0]

    def authorize(self, authorization: str | None) -> ApiKey:
        """The key a request's `Authorization: Bearer …` names, if it is valid, unrevoked, within limits."""
        key = self.identify(authorization)
        if key.quota_tokens and key.used_tokens >= key.quota_tokens:
            raise RequestError(f"this API key has used its quota of {key.quota_tokens} tokens", status=429,
                               code="quota_exceeded", type="insufficient_quota")
        if key.rate_per_min:
            self._count_request(key)
        return key

    def identify(self, authorization: str | None) -> ApiKey:
        """The valid, unrevoked key a request names, without counting it against its limits."""
        secret = (authorization or "").removeprefix("Bearer ").strip()
        parts = secret.split("_")
        if len(parts) < 3 or parts[0] != "agk":
            raise RequestError("this gateway requires an API key: send Authorization: Bearer agk_…",
                               status=401, code="invalid_api_key", type="authentication_error")
        with self._lock:
            row = self._db.execute("SELECT hash FROM keys WHERE id = ?", (parts[1],)).fetchone()
        key = self.get(parts[1])
        if row is None or key is None or not hmac.compare_digest(row[0], _hash(secret)):
            raise RequestError("unknown API key", status=401, code="invalid_api_key", type="authentication_error")
        if key.revoked:
            raise RequestError("this API key was revoked", status=401, code="revoked_api_key",
                               type="authentication_error")
        return key

    def _count_request(self, key: ApiKey) -> None:
        now = time.monotonic()
        with self._lock:
            start, n = self._windows.get(key.id, (now, 0))
            if now - start >= 60:
                start, n = now, 0
            if n >= key.rate_per_min:
                raise RequestError(f"rate limit of {key.rate_per_min} requests per minute reached; retry shortly",
                                   status=429, code="rate_limited", type="rate_limit_error")
            self._windows[key.id] = (start, n + 1)

    def reserve(self, key: ApiKey, tokens: int) -> int:
        """Hold the most tokens a request can use against its key's quota, or refuse it with 429.

        Admission reserves and `record_usage` releases, so requests under way at once cannot together
        use more than the quota. Returns what was reserved (0 for a key without a quota)."""
        if not key.quota_tokens:
            return 0
        with self._lock:
            (used,) = self._db.execute("SELECT used_tokens FROM keys WHERE id = ?", (key.id,)).fetchone()
            held = self._reserved.get(key.id, 0)
            if used + held + tokens > key.quota_tokens:
                raise RequestError(
                    f"this API key has {max(0, key.quota_tokens - used - held)} tokens of its quota of "
                    f"{key.quota_tokens} left (requests under way hold {held}); this request may use up to {tokens} "
                    "(its prompt and max_tokens): lower max_tokens, or wait for requests under way to finish",
                    status=429, code="quota_exceeded", type="insufficient_quota")
            self._reserved[key.id] = held + tokens
        return tokens

    def record_usage(self, key_id: str, *, tokens: int, charged: int, release: int = 0) -> None:
        """Count a finished request's tokens and charge, and release what its admission reserved."""
        with self._lock:
            if release:
                left = self._reserved.get(key_id, 0) - release
                if left > 0:
                    self._reserved[key_id] = left
                else:
                    self._reserved.pop(key_id, None)
            if not tokens and not charged:
                return  # nothing was served: not a request to count
            self._db.execute(
                "UPDATE keys SET used_tokens = used_tokens + ?, requests = requests + 1, charged = charged + ?"
                " WHERE id = ?", (tokens, charged, key_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()
