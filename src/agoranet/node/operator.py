"""The node operator's token: what proves a remote write (a block upload, a pin change) comes from
whoever can read this node's `$AGORA_HOME`, i.e. its operator.

The token is 32 random bytes in hex, in `$AGORA_HOME/operator.token`, created with mode 0600 the
first time a node that needs it starts, never logged. Send it as `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

OPERATOR_TOKEN_FILE = "operator.token"


def operator_token(home: Path) -> str:
    """This node's operator token, created (mode 0600) if it has none yet."""
    path = home / OPERATOR_TOKEN_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        os.replace(tmp, path)
    return path.read_text().strip()


def is_operator(authorization: str | None, token: str | None) -> bool:
    """Whether an `Authorization` header carries the operator token (compared in constant time)."""
    if not token or not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(authorization.removeprefix("Bearer ").strip().encode(), token.encode())
