"""A node's durable state: content-addressed blocks (records, canonical requests) in SQLite (WAL)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from typing import Any

from agoranet.core.cid import CID, DAG_CBOR, cid_of
from agoranet.core.records import decode_record

FEED_PAGE = 500  # most records one feed page returns
CURSOR_MAX = 2**62  # feed cursors are SQLite rowids; anything larger is a bad request, not a crash


class NodeState:
    """Blocks by CID. `put` returns only after the block is committed, so an acknowledged receipt survives a crash."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); a receipt's durability across power
        # loss comes from the transparency log, which stores the same bytes and commits with FULL.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS blocks (cid TEXT PRIMARY KEY, kind TEXT NOT NULL, data BLOB NOT NULL,"
            " created_ms INTEGER NOT NULL)"
        )
        # the per-provider window test's open windows (verify.window): receipts judged, not yet in a closed window
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS windows (provider TEXT NOT NULL, model TEXT NOT NULL, precision TEXT NOT NULL,"
            " receipt TEXT NOT NULL, score REAL NOT NULL, PRIMARY KEY (provider, model, precision, receipt))"
        )
        self._lock = threading.Lock()

    def window_add(self, key: tuple[str, str, str], receipt: str, score: float, size: int) -> list[tuple[str, float]]:
        """Add a judged receipt's score to the open window of (provider, model, precision); once it holds `size`
        receipts, close it: remove and return them (receipt CID, score) in the order added, else return []."""
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO windows (provider, model, precision, receipt, score) "
                             "VALUES (?, ?, ?, ?, ?)", (*key, receipt, score))
            rows = self._db.execute("SELECT rowid, receipt, score FROM windows WHERE provider = ? AND model = ? AND "
                                    "precision = ? ORDER BY rowid LIMIT ?", (*key, size)).fetchall()
            if len(rows) < size:
                return []
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM windows WHERE rowid = ?", [(row[0],) for row in rows])
            self._db.execute("COMMIT")
        return [(str(r), float(x)) for _, r, x in rows]

    def put(self, data: bytes, kind: str, codec: str = DAG_CBOR) -> CID:
        cid = cid_of(data, codec)
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO blocks (cid, kind, data, created_ms) VALUES (?, ?, ?, ?)",
                (str(cid), kind, data, int(time.time() * 1000)),
            )
        return cid

    def get(self, cid: str) -> tuple[str, bytes] | None:
        with self._lock:
            row = self._db.execute("SELECT kind, data FROM blocks WHERE cid = ?", (cid,)).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def since(self, kind: str, after: int = 0, limit: int = 100) -> list[tuple[int, str, bytes]]:
        """Blocks of one kind stored after sequence number `after`, oldest first: (seq, cid, data)."""
        after = max(-(1 << 63), min(after, (1 << 63) - 1))  # a cursor from a URL may exceed SQLite's integers
        with self._lock:
            rows = self._db.execute(
                "SELECT rowid, cid, data FROM blocks WHERE kind = ? AND rowid > ? ORDER BY rowid LIMIT ?",
                (kind, after, limit),
            ).fetchall()
        return [(int(seq), cid, bytes(data)) for seq, cid, data in rows]

    def feed(self, kind: str, after: int, limit: int, key: str) -> dict[str, Any]:
        """One page of a kind of record for HTTP: `{key: [{cid, record}], "next": cursor}`."""
        rows = self.since(kind, max(0, after), max(1, min(limit, FEED_PAGE)))
        return {key: [{"cid": cid, "record": decode_record(data).to_json()} for _, cid, data in rows],
                "next": rows[-1][0] if rows else after}

    def count(self, kind: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM blocks WHERE kind = ?", (kind,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
