"""A witness of other nodes' logs: the latest verified tree head of each, and the split views found.

A witness keeps, per log id, the largest head it has verified (the latest of that size). A new head
of the same log must be consistent with it: same size means same root; another size needs the
RFC 9162 consistency proof between the two, which the caller fetches from the log. Heads that cannot
both be true are kept, with that proof, as a `SplitViewProof`, and the log is untrusted from then on.
Everything lives in SQLite, so a restarted node still distrusts the logs it caught.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agoranet.core.records import Record
from agoranet.log.records import SplitViewProof, TreeHeadBody, check_heads, verify_tree_head

__all__ = ["Witness", "SplitView"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS heads (
    log_id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS split_views (
    id INTEGER PRIMARY KEY,
    log_id TEXT NOT NULL,
    pair TEXT NOT NULL UNIQUE,
    conclusive INTEGER NOT NULL,
    proof TEXT NOT NULL,
    found_ms INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class SplitView:
    """A split-view proof as this witness stored it."""

    id: int
    log_id: str
    found_ms: int
    proof: SplitViewProof

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "log_id": self.log_id, "found_ms": self.found_ms,
                "conclusive": self.proof.conclusive, "reason": self.proof.reason, "proof": self.proof.to_json()}


class Witness:
    """Latest verified head per log and the split views between heads; thread-safe."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._untrusted = {row[0] for row in self._db.execute("SELECT DISTINCT log_id FROM split_views")}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- reading ----------------------------------------------------------------------------------

    def latest(self, log_id: str) -> Record[TreeHeadBody] | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM heads WHERE log_id = ?", (log_id,)).fetchone()
        return verify_tree_head(json.loads(row[0])) if row else None

    def heads(self) -> dict[str, Record[TreeHeadBody]]:
        with self._lock:
            rows = self._db.execute("SELECT log_id, record FROM heads ORDER BY log_id").fetchall()
        return {log_id: verify_tree_head(json.loads(record)) for log_id, record in rows}

    def untrusted(self, log_id: str) -> bool:
        """Whether this witness holds a split-view proof against the log."""
        return log_id in self._untrusted

    def untrusted_logs(self) -> list[str]:
        return sorted(self._untrusted)

    def split_view_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM split_views").fetchone()[0]

    def split_views(self, log_id: str | None = None) -> list[SplitView]:
        """The stored proofs, oldest first; each is re-checked as it is read back."""
        query = "SELECT id, log_id, found_ms, proof FROM split_views"
        with self._lock:
            rows = (self._db.execute(query + " WHERE log_id = ? ORDER BY id", (log_id,)) if log_id is not None
                    else self._db.execute(query + " ORDER BY id")).fetchall()
        return [SplitView(i, lid, found, SplitViewProof.from_json(json.loads(proof))) for i, lid, found, proof in rows]

    # -- judging heads ----------------------------------------------------------------------------

    def needs_proof(self, head: Record[TreeHeadBody]) -> tuple[int, int] | None:
        """The (first, second) sizes of the consistency proof `observe` needs for this head, if any."""
        held = self.latest(head.body.log_id)
        if held is None or held.body.size == head.body.size:
            return None
        return min(held.body.size, head.body.size), max(held.body.size, head.body.size)

    def observe(self, head: Record[TreeHeadBody], proof: list[bytes] | None = None) -> SplitViewProof | None:
        """Judge a head (see `judge`) and keep the split view it reveals, if any."""
        if (split := self.judge(head, proof)) is not None:
            self.record(split)
        return split

    def judge(self, head: Record[TreeHeadBody], proof: list[bytes] | None = None) -> SplitViewProof | None:
        """Compare a head with the one held for its log; returns the split view it reveals (not yet kept).

        `proof` is the consistency proof between the two sizes (see `needs_proof`), from the log.
        A consistent head is kept when it is larger, or as large and newer, than the one held.
        """
        head = verify_tree_head(head.to_json())
        held = self.latest(head.body.log_id)
        if held is None:
            self._keep(head)
            return None
        if held.cid == head.cid:
            return None
        if held.body.size != head.body.size and proof is None:
            raise ValueError(f"heads of sizes {held.body.size} and {head.body.size} need a consistency proof")
        split = check_heads(held, head, list(proof or []))
        if split is None and (head.body.size, head.body.timestamp_ms) > (held.body.size, held.body.timestamp_ms):
            self._keep(head)
        return split

    def record(self, split: SplitViewProof) -> bool:
        """Keep a split-view proof (once per pair of heads) and distrust its log; True if it was new."""
        SplitViewProof.from_json(split.to_json())  # only evidence that re-checks is kept
        a, b = split.first.body, split.second.body
        pair = f"{a.log_id}:{a.size}:{a.root}:{b.size}:{b.root}:{int(split.conclusive)}"
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO split_views (log_id, pair, conclusive, proof, found_ms) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(pair) DO NOTHING",
                (a.log_id, pair, int(split.conclusive), json.dumps(split.to_json()), int(time.time() * 1000)),
            )
            self._untrusted.add(a.log_id)
        return cur.rowcount > 0

    def _keep(self, head: Record[TreeHeadBody]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO heads (log_id, size, record) VALUES (?, ?, ?)"
                " ON CONFLICT(log_id) DO UPDATE SET size = excluded.size, record = excluded.record",
                (head.body.log_id, head.body.size, json.dumps(head.to_json())),
            )
