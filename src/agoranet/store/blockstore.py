"""Blocks on disk, addressed by CIDv1 and re-hashed on every read.

Layout under the store root: `data/<2 chars>/<cid>` holds each block (sharded like kubo's flatfs by
the next-to-last two characters of the CID), `index.sqlite` (WAL) lists blocks and pins, and
`quarantine/` keeps copies that failed their hash check so nothing is silently thrown away.
Writes are atomic (temp file + rename) but not fsynced: a torn block after a crash fails its hash
check on the next read and is healed like any other corruption.

With a kubo daemon beside it (`kubo=KuboClient(...)`), every block written here is put to kubo first
and pins are added there too, and a block missing or corrupt here is read back from kubo (re-hashed).
A put to kubo that fails fails the write, and an add rolls back what it wrote: whoever names a kubo
expects it to hold every block the store lists, and a block skipped while the daemon was down would
never be sent again. A block missing here while kubo does not answer raises KuboUnavailable, which
names the RPC address; a corrupt one is then still healed through the fetcher.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import libipld

from agoranet.core.cid import CID, DAG_CBOR, DAG_PB, RAW, cid_from_digest, parse_cid
from agoranet.store.dagpb import decode_node
from agoranet.store.errors import (
    BlockMismatch,
    BlockNotFound,
    CorruptBlock,
    KuboError,
    PinError,
)
from agoranet.store.kubo import KuboClient

__all__ = ["Blockstore", "BlockFetcher", "GcResult", "verify_block", "as_cid"]

log = logging.getLogger(__name__)

BlockFetcher = Callable[[CID], bytes]
"""Fetches a block's bytes from elsewhere (a peer); the store verifies what it returns."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (cid TEXT PRIMARY KEY, size INTEGER NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pins (cid TEXT PRIMARY KEY, added REAL NOT NULL);
"""


@dataclass(frozen=True)
class GcResult:
    removed: int
    freed_bytes: int


def as_cid(value: CID | str | bytes) -> CID:
    """Parse a CID and give it the base32 form, so str() of every CID the store handles is `b…`."""
    return parse_cid(value).set(base="base32")


def verify_block(cid: CID, data: bytes | memoryview) -> None:
    """Raise BlockMismatch unless `data` hashes to `cid`."""
    if hashlib.sha256(data).digest() != cid.raw_digest:
        raise BlockMismatch(f"block bytes do not hash to {cid}")


class Blockstore:
    """A content-addressed block store on local disk; safe to share between threads."""

    def __init__(self, root: str | os.PathLike[str], *, fetcher: BlockFetcher | None = None,
                 kubo: KuboClient | None = None) -> None:
        self.root = Path(root)
        self.data_dir = self.root / "data"
        self.quarantine_dir = self.root / "quarantine"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.quarantine_dir.mkdir(exist_ok=True)
        self.fetcher = fetcher
        self.kubo = kubo  # owned: closed with the store
        # Held by whoever writes blocks that are not pinned yet (an add) and by gc, so gc never
        # sweeps a DAG halfway through being added.
        self.gc_lock = threading.RLock()
        self._lock = threading.Lock()
        self._shards: set[str] = set()
        self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self.kubo is not None:
            self.kubo.close()

    def __enter__(self) -> Blockstore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- blocks ---------------------------------------------------------------------------------

    def path_of(self, cid: CID | str) -> Path:
        text = str(as_cid(cid))
        return self.data_dir / text[-3:-1] / text

    def has(self, cid: CID | str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM blocks WHERE cid=?", (str(as_cid(cid)),)).fetchone()
        return row is not None

    def size(self, cid: CID | str) -> int:
        with self._lock:
            row = self._db.execute("SELECT size FROM blocks WHERE cid=?", (str(as_cid(cid)),)).fetchone()
        if row is None:
            raise BlockNotFound(f"block {cid} is not in this store")
        return row[0]

    def usage(self) -> tuple[int, int, int]:
        """(blocks, bytes, pins) from the index, without listing anything: cheap enough for every scrape."""
        with self._lock:
            blocks, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM blocks").fetchone()
            (pins,) = self._db.execute("SELECT COUNT(*) FROM pins").fetchone()
        return blocks, size, pins

    def cids(self) -> list[CID]:
        with self._lock:
            rows = self._db.execute("SELECT cid FROM blocks").fetchall()
        return [as_cid(r[0]) for r in rows]

    def put(self, data: bytes, codec: str = RAW) -> CID:
        """Store `data` as a block with `codec`; returns its CID."""
        cid = cid_from_digest(hashlib.sha256(data).digest(), codec)
        self._write(cid, data)
        return cid

    def put_block(self, cid: CID | str, data: bytes) -> CID:
        """Store a block received from elsewhere, after checking it hashes to `cid`."""
        cid = as_cid(cid)
        verify_block(cid, data)
        self._write(cid, data)
        return cid

    def put_trusted(self, cid: CID, data: bytes) -> None:
        """Store a block whose CID the caller has just computed from `data` (the importer)."""
        self._write(cid, data)

    @contextmanager
    def batch(self) -> Iterator[Callable[[CID, bytes], None]]:
        """A thread-safe sink for many trusted blocks whose index rows are committed together.

        Until the batch ends the blocks are on disk but not yet listed; callers hold `gc_lock`.
        """
        rows: list[tuple[str, int, float]] = []
        written: list[Path] = []

        def sink(cid: CID, data: bytes | memoryview) -> None:
            if self.kubo is not None:
                self.kubo.put(cid, bytes(data))
            if self._write_file(cid, data):
                written.append(self.path_of(cid))
            rows.append((str(cid), len(data), time.time()))  # list.append is atomic

        with self.gc_lock:
            try:
                yield sink
            except BaseException:
                # A failed import (disk full, kubo down) leaves no unlisted files behind.
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            with self._lock:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR IGNORE INTO blocks VALUES (?,?,?)", rows)
                self._db.execute("COMMIT")

    def _write(self, cid: CID, data: bytes, *, to_kubo: bool = True) -> None:
        if to_kubo and self.kubo is not None:
            self.kubo.put(cid, data)  # first, so a refused put leaves nothing here
        self._write_file(cid, data)
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO blocks VALUES (?,?,?)", (str(cid), len(data), time.time()))

    def _write_file(self, cid: CID, data: bytes | memoryview) -> bool:
        """Write a block file atomically; False when it was already there."""
        path = self.path_of(cid)
        if path.exists():
            return False  # same CID, same bytes; a copy damaged on disk is caught when read
        if path.parent.name not in self._shards:
            path.parent.mkdir(exist_ok=True)
            self._shards.add(path.parent.name)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)
        return True

    def get(self, cid: CID | str) -> bytes:
        """The block's bytes, re-hashed; a corrupt copy is quarantined and healed via the fetcher."""
        cid = as_cid(cid)
        try:
            data = self.path_of(cid).read_bytes()
        except FileNotFoundError:
            self._forget(cid)
            if self.kubo is not None and (data := self.kubo.get(cid)) is not None:
                self._write(cid, data, to_kubo=False)
                return data
            raise BlockNotFound(f"block {cid} is not in this store"
                                + (f" nor in kubo at {self.kubo.url}" if self.kubo is not None else "")) from None
        if hashlib.sha256(data).digest() == cid.raw_digest:
            return data
        self._quarantine(cid)
        return self._heal(cid)

    def _heal(self, cid: CID) -> bytes:
        """A good copy of a block that failed its hash check: from kubo's repo, else from the fetcher.

        The copy is not put to kubo again: the block was listed here, so kubo got it when it was first
        written, and a read must not fail because kubo is down.
        """
        if self.kubo is not None:
            try:
                healed = self.kubo.get(cid)
            except KuboError as exc:
                log.warning("kubo could not heal a block", extra={"cid": str(cid), "error": str(exc)})
                healed = None
            if healed is not None:
                self._write(cid, healed, to_kubo=False)
                log.info("block healed from kubo", extra={"cid": str(cid)})
                return healed
        if self.fetcher is None:
            raise CorruptBlock(f"block {cid} failed its hash check")
        try:
            healed = self.fetcher(cid)
            verify_block(cid, healed)
        except Exception as exc:
            raise CorruptBlock(f"block {cid} failed its hash check and could not be re-fetched: {exc}") from exc
        self._write(cid, healed, to_kubo=False)
        log.info("block healed", extra={"cid": str(cid)})
        return healed

    def delete(self, cid: CID | str) -> None:
        self.path_of(cid).unlink(missing_ok=True)
        self._forget(cid)

    def _forget(self, cid: CID | str) -> None:
        """Unlist a block whose file is gone. Checked under the index lock, because a writer lists a
        block after writing its file: a reader that found no file a moment ago must not unlist the
        copy a concurrent fetch has just written (the file would stay, unlisted, and `has` would lie)."""
        cid = as_cid(cid)
        with self._lock:
            if not self.path_of(cid).exists():
                self._db.execute("DELETE FROM blocks WHERE cid=?", (str(cid),))

    def _quarantine(self, cid: CID) -> None:
        target = self.quarantine_dir / f"{cid}.{time.time_ns()}"
        try:
            os.replace(self.path_of(cid), target)
        except FileNotFoundError:
            pass
        self._forget(cid)
        log.warning("corrupt block quarantined", extra={"cid": str(cid), "path": str(target)})

    def verify_all(self) -> list[CID]:
        """Re-hash every block; returns those that were corrupt (quarantined, healed if possible)."""
        bad: list[CID] = []
        for cid in self.cids():
            try:
                data = self.path_of(cid).read_bytes()
            except FileNotFoundError:
                self._forget(cid)
                bad.append(cid)
                continue
            if hashlib.sha256(data).digest() != cid.raw_digest:
                bad.append(cid)
                try:
                    self.get(cid)
                except CorruptBlock:
                    pass
        return bad

    # -- DAGs -----------------------------------------------------------------------------------

    def links(self, cid: CID | str, data: bytes | None = None) -> list[CID]:
        """CIDs a block links to (dag-pb links, or CIDs inside DAG-CBOR); raw blocks have none."""
        cid = as_cid(cid)
        codec = cid.codec.name
        if codec == RAW:
            return []
        if data is None:
            data = self.get(cid)
        if codec == DAG_PB:
            return [link.cid for link in decode_node(data).links]
        if codec == DAG_CBOR:
            found: list[CID] = []
            _cbor_links(libipld.decode_dag_cbor(data), found)
            return found
        return []

    def _traverse(self, root: CID | str, *, tolerate_missing: bool) -> Iterator[tuple[CID, bytes | None]]:
        """Each block under `root` once, depth-first pre-order; None for an absent block when tolerated."""
        seen: set[str] = set()
        stack = [as_cid(root)]
        while stack:
            cid = stack.pop()
            if str(cid) in seen:
                continue
            seen.add(str(cid))
            try:
                data = self.get(cid)
            except (BlockNotFound, CorruptBlock):
                if not tolerate_missing:
                    raise
                yield cid, None
                continue
            yield cid, data
            stack.extend(reversed(self.links(cid, data)))

    def walk(self, root: CID | str) -> Iterator[tuple[CID, bytes]]:
        """Every block of the DAG under `root` once, depth-first pre-order (CAR order)."""
        yield from self._traverse(root, tolerate_missing=False)  # type: ignore[misc]

    def missing(self, root: CID | str) -> list[CID]:
        """Blocks of the DAG under `root` that are not here (children of missing blocks unknown)."""
        return [cid for cid, data in self._traverse(root, tolerate_missing=True) if data is None]

    # -- pins and gc ----------------------------------------------------------------------------

    def pin(self, cid: CID | str, *, check: bool = True) -> None:
        """Keep the whole DAG under `cid` through gc; with `check`, insist every block is here."""
        cid = as_cid(cid)
        if check:
            absent = self.missing(cid)
            if absent:
                raise PinError(f"cannot pin {cid}: {len(absent)} block(s) missing, first {absent[0]}")
        if self.kubo is not None and not self.kubo.pin(cid):
            # kubo lacks blocks this store had before kubo was named: send the DAG, then pin again.
            for block_cid, data in self.walk(cid):
                self.kubo.put(block_cid, data)
            if not self.kubo.pin(cid):
                raise KuboError(f"kubo at {self.kubo.url} still lacks blocks of {cid} after they were all put")
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO pins VALUES (?,?)", (str(cid), time.time()))

    def unpin(self, cid: CID | str) -> bool:
        """Drop a pin; returns whether there was one. Blocks go at the next gc."""
        with self._lock:
            cur = self._db.execute("DELETE FROM pins WHERE cid=?", (str(as_cid(cid)),))
        return cur.rowcount > 0

    def pins(self) -> list[CID]:
        with self._lock:
            rows = self._db.execute("SELECT cid FROM pins ORDER BY added").fetchall()
        return [as_cid(r[0]) for r in rows]

    def is_pinned(self, cid: CID | str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM pins WHERE cid=?", (str(as_cid(cid)),)).fetchone() is not None

    def gc(self) -> GcResult:
        """Delete every block not reachable from a pin."""
        with self.gc_lock:
            keep: set[str] = set()
            for root in self.pins():
                stack = [root]
                while stack:
                    cid = stack.pop()
                    if str(cid) in keep:
                        continue
                    keep.add(str(cid))
                    try:
                        stack.extend(self.links(cid))
                    except (BlockNotFound, CorruptBlock):
                        continue
            with self._lock:
                rows = self._db.execute("SELECT cid, size FROM blocks").fetchall()
            removed = freed = 0
            for text, size in rows:
                if text not in keep:
                    self.delete(text)
                    removed += 1
                    freed += size
        log.info("gc finished", extra={"removed": removed, "freed_bytes": freed})
        return GcResult(removed, freed)


def _cbor_links(value: object, found: list[CID]) -> None:
    # libipld decodes CID links to their binary form; a byte string that parses as a sha2-256
    # CID is treated as a link, which at worst keeps an unneeded block through gc.
    if isinstance(value, bytes) and len(value) in (36, 37) and value[:1] in (b"\x01", b"\x00"):
        try:
            found.append(as_cid(value[1:] if value[0] == 0 else value))
        except Exception:
            pass
    elif isinstance(value, dict):
        for v in value.values():
            _cbor_links(v, found)
    elif isinstance(value, list):
        for v in value:
            _cbor_links(v, found)
