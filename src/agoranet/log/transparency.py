"""An append-only transparency log of signed records, persisted in SQLite, proven with RFC 9162 trees.

Each leaf is the binary CID of a record; the record's bytes are stored beside it so anyone can audit
what was logged. SQLite runs in WAL mode with `synchronous=FULL` by default: `append` returns only
after its transaction is committed and fsynced, so an acknowledged entry survives a crash of the
process or of the machine. With `fsync=False` (`synchronous=NORMAL`) a commit still survives the
process being killed (the WAL is in the OS page cache), but not a power loss. Per-commit fsync
costs ~2 ms here; `append_many` and `transaction()` put many entries under one commit.

The Merkle tree is rebuilt from the stored CIDs when the log is opened, so the root is always
recomputed from what is on disk, never trusted from a cache.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from agoranet.core.cid import CID, DAG_CBOR, cid_from_digest, cid_of, parse_cid
from agoranet.core.identity import Identity
from agoranet.core.records import Record, sign_record
from agoranet.log.errors import CorruptLog, EntryNotFound, InvalidProof, InvalidTreeHead, ProofRequestError
from agoranet.log.merkle import MerkleTree, leaf_hash, verify_inclusion
from agoranet.log.records import SplitViewProof, TreeHeadBody, check_heads, verify_tree_head

__all__ = ["LogEntry", "TransparencyLog", "LogTransaction", "MAX_PAGE", "cid_key", "key_cid"]

log = logging.getLogger(__name__)

MAX_PAGE = 1000  # entries per `entries()` call: bounds memory and response size

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx INTEGER PRIMARY KEY,
    cid BLOB NOT NULL UNIQUE,
    record BLOB NOT NULL
);
"""


# Binary CIDv1 dag-cbor sha2-256 is this fixed prefix + the digest: building multiformats CID objects
# costs ~30 µs each, more than the whole append, so the hot path works on the bytes.
_CID_PREFIX = bytes(cid_of(b"", DAG_CBOR))[:-32]


def cid_key(data: bytes) -> bytes:
    """The binary CID of a record's bytes: the leaf data of its log entry."""
    return _CID_PREFIX + sha256(data).digest()


def key_cid(key: bytes) -> CID:
    """The CID (base32 when printed) of a leaf's binary CID."""
    if len(key) != len(_CID_PREFIX) + 32 or not key.startswith(_CID_PREFIX):
        return CID.decode(key)
    return cid_from_digest(key[len(_CID_PREFIX):], DAG_CBOR)


@dataclass(frozen=True)
class LogEntry:
    index: int
    key: bytes  # binary CID, the leaf's data
    record: bytes

    @property
    def cid(self) -> CID:
        return key_cid(self.key)


class LogTransaction:
    """Appends that commit together; other tables of the same database may be written alongside."""

    def __init__(self, log: TransparencyLog, conn: sqlite3.Connection) -> None:
        self._log = log
        self.conn = conn
        self._pending: list[bytes] = []  # leaf hashes added to the tree once the commit succeeds

    def append(self, record: Record | bytes) -> LogEntry:
        data = record.encode() if isinstance(record, Record) else bytes(record)
        key = cid_key(data)
        index = self._log.size + len(self._pending)
        cur = self.conn.execute(
            "INSERT INTO entries (idx, cid, record) VALUES (?, ?, ?) ON CONFLICT(cid) DO NOTHING",
            (index, key, data),
        )
        if cur.rowcount == 0:  # already logged: appending is idempotent
            (existing,) = self.conn.execute("SELECT idx FROM entries WHERE cid = ?", (key,)).fetchone()
            return LogEntry(existing, key, data)
        self._pending.append(leaf_hash(key))
        return LogEntry(index, key, data)


class TransparencyLog:
    """One node's append-only log; thread-safe, one writing process per database file."""

    def __init__(self, path: Path | str, identity: Identity, *, fsync: bool = True) -> None:
        self.identity = identity
        self.path = str(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._conn.executescript(_SCHEMA)
        self._tree = MerkleTree()
        self._catch_up()
        log.info("log opened", extra={"path": self.path, "size": self.size, "log_id": self.log_id})

    @property
    def log_id(self) -> str:
        return str(self.identity.peer_id)

    @property
    def size(self) -> int:
        return self._tree.size

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TransparencyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _catch_up(self) -> None:
        """Add to the tree whatever is on disk beyond it (opening, or another writer's commits)."""
        rows = self._conn.execute("SELECT idx, cid FROM entries WHERE idx >= ? ORDER BY idx", (self.size,))
        for idx, key in rows:
            if idx != self.size:
                raise CorruptLog(f"{self.path}: entry {self.size} is missing (next stored is {idx})")
            self._tree.append(leaf_hash(key))

    # -- writing ----------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[LogTransaction]:
        """One commit for many appends (and any other writes on `tx.conn`); all or nothing."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._catch_up()
                tx = LogTransaction(self, self._conn)
                yield tx
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            for h in tx._pending:
                self._tree.append(h)

    def append(self, record: Record | bytes) -> LogEntry:
        """Log one record; returns once it is committed. Appending a logged record returns its entry."""
        with self.transaction() as tx:
            return tx.append(record)

    def append_many(self, records: Iterable[Record | bytes]) -> list[LogEntry]:
        """Log many records under one commit (one fsync): the fast path for bulk appends."""
        with self.transaction() as tx:
            return [tx.append(r) for r in records]

    # -- reading ----------------------------------------------------------------------------------

    def index_of(self, cid: CID | str | bytes) -> int:
        key = bytes(parse_cid(cid)) if not isinstance(cid, bytes) else cid
        with self._lock:
            row = self._conn.execute("SELECT idx FROM entries WHERE cid = ?", (key,)).fetchone()
        if row is None or row[0] >= self.size:
            raise EntryNotFound(f"no entry with CID {_show(cid)} in this log")
        return row[0]

    def entry(self, index: int) -> LogEntry:
        entries = self.entries(index, index + 1)
        if not entries:
            raise ProofRequestError(f"entry {index} does not exist; the log has {self.size}", param="index")
        return entries[0]

    def entries(self, start: int, end: int) -> list[LogEntry]:
        """Entries start ≤ index < end, at most MAX_PAGE of them, cut at the log's size."""
        if start < 0 or end < start:
            raise ProofRequestError(f"bad range [{start}, {end}): need 0 ≤ start ≤ end", param="start")
        end = min(end, start + MAX_PAGE, self.size)
        with self._lock:
            rows = self._conn.execute(
                "SELECT idx, cid, record FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
            ).fetchall()
        return [LogEntry(i, bytes(k), bytes(r)) for i, k, r in rows]

    def tampered_entries(self) -> list[int]:
        """Indices whose stored record no longer hashes to its leaf CID (disk corruption, editing)."""
        bad = []
        with self._lock:
            for idx, key, data in self._conn.execute("SELECT idx, cid, record FROM entries ORDER BY idx"):
                if cid_key(data) != key:
                    bad.append(idx)
        return bad

    # -- heads and proofs -------------------------------------------------------------------------

    def root(self, size: int | None = None) -> bytes:
        with self._lock:
            return self._tree.root(size)

    def head(self, size: int | None = None) -> Record[TreeHeadBody]:
        """A freshly signed tree head for the current size, or for any size the log has reached."""
        with self._lock:
            size = self.size if size is None else size
            root = self._tree.root(size)
        body = TreeHeadBody(log_id=self.log_id, size=size, root=root.hex(), timestamp_ms=int(time.time() * 1000))
        return sign_record(self.identity, body)

    def inclusion_proof(self, cid: CID | str | bytes, size: int | None = None) -> tuple[int, list[bytes]]:
        """(index, audit path) proving the record with this CID is in the tree of `size` entries."""
        index = self.index_of(cid)
        with self._lock:
            size = self.size if size is None else size
            if index >= size:
                raise ProofRequestError(f"entry {index} was appended after size {size}", param="size")
            return index, self._tree.inclusion_proof(index, size)

    def inclusion_path(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of the entry at `index` in the tree of `size` entries."""
        with self._lock:
            return self._tree.inclusion_proof(index, size)

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        with self._lock:
            return self._tree.consistency_proof(first, second)

    def check_head(self, head: Record[TreeHeadBody] | dict | bytes) -> SplitViewProof | None:
        """Compare a head signed with our key (gossiped back to us) with our own history."""
        other = verify_tree_head(head.to_json() if isinstance(head, Record) else head)
        if other.body.log_id != self.log_id:
            raise InvalidTreeHead(f"head is for log {other.body.log_id}, not this log {self.log_id}")
        if other.body.size > self.size:
            reason = f"head claims {other.body.size} entries; the log has {self.size}"
            return SplitViewProof(self.head(), other, (), reason)
        return check_heads(self.head(other.body.size), other, [])


def _show(cid: CID | str | bytes) -> str:
    if isinstance(cid, bytes):
        try:
            return str(key_cid(cid))
        except Exception:
            return cid.hex()[:80]
    return str(cid)[:80]


def check_inclusion(head: Record[TreeHeadBody], cid: str, answer: dict) -> int:
    """Check a node's inclusion-proof answer for `cid` against a signed head; returns the entry index."""
    try:
        path = [bytes.fromhex(h) for h in answer["proof"]]
        index = int(answer["index"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidProof(f"the node's inclusion proof is malformed: {exc}") from exc
    verify_inclusion(leaf_hash(bytes(parse_cid(cid))), index, head.body.size, path, head.body.root_hash)
    return index
