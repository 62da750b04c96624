"""UnixFS import and export: files and directories as IPFS DAGs, giving kubo's CIDs.

Import matches `ipfs add --cid-version 1 --raw-leaves --chunker size-1048576` with the balanced
layout and 1024 links per node (the IPIP-499 profile): a file of one chunk is a bare raw leaf; a
longer one is a tree of dag-pb nodes typed UnixFS File (with filesize and blocksizes) whose links
have an empty name. Directories are dag-pb UnixFS Directory nodes, links sorted by name with Tsize.
Like `ipfs add -r`, hidden entries (names starting with a dot) are skipped unless `hidden=True`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from agoranet.core.cid import CID, DAG_PB, RAW, cid_from_digest
from agoranet.store.blockstore import Blockstore, as_cid
from agoranet.store.dagpb import PBLink, UnixFSData, UnixFSType, decode_node, decode_unixfs, encode_node, encode_unixfs
from agoranet.store.errors import MalformedBlock, NotAFile, StoreError, UnsupportedDag

__all__ = ["CHUNK_SIZE", "MAX_LINKS", "BlockSink", "add_path", "add_bytes", "model_cid", "import_path",
           "cat", "export"]

CHUNK_SIZE = 1 << 20
MAX_LINKS = 1024
# kubo switches a directory to a HAMT once its links' names + CIDs exceed this estimate.
HAMT_THRESHOLD = 256 * 1024

BlockSink = Callable[[CID, bytes | memoryview], None]
"""Receives every block the importer makes, already addressed; must be thread-safe. The bytes are only
valid during the call (the importer reuses its chunk buffers): copy them to keep them."""


@dataclass(frozen=True)
class _Child:
    """A finished node as its parent links to it."""

    cid: CID
    tsize: int  # cumulative bytes of the sub-DAG (the link's Tsize)
    filesize: int  # file bytes under it (the parent's blocksizes entry)


_local = threading.local()


def _buffer(size: int) -> bytearray:
    """This thread's chunk buffer, reused: a fresh 1 MiB bytes object per chunk costs an allocation
    and 256 page faults every time."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None or len(buffer) != size:
        buffer = _local.buffer = bytearray(size)
    return buffer


def _discard(cid: CID, data: bytes | memoryview) -> None:
    pass


def _emit(sink: BlockSink, data: bytes | memoryview, codec: str) -> CID:
    cid = cid_from_digest(hashlib.sha256(data).digest(), codec)
    sink(cid, data)
    return cid


def _file_node(children: list[_Child], sink: BlockSink) -> _Child:
    filesize = sum(c.filesize for c in children)
    payload = encode_unixfs(UnixFSData(UnixFSType.FILE, filesize=filesize,
                                       blocksizes=tuple(c.filesize for c in children)))
    block = encode_node([PBLink(c.cid, "", c.tsize) for c in children], payload)
    cid = _emit(sink, block, DAG_PB)
    return _Child(cid, len(block) + sum(c.tsize for c in children), filesize)


def _balanced(leaves: list[_Child], sink: BlockSink, max_links: int) -> _Child:
    # go-unixfs's balanced layout fills each level left to right, so grouping each level's nodes
    # max_links at a time, bottom-up, yields the same tree.
    level = leaves
    while len(level) > 1:
        level = [_file_node(level[i:i + max_links], sink) for i in range(0, len(level), max_links)]
    return level[0]


def _import_file(path: Path, size: int, sink: BlockSink, chunk_size: int, max_links: int,
                 pool: ThreadPoolExecutor) -> _Child:
    if size == 0:
        return _Child(_emit(sink, b"", RAW), 0, 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        def leaf(offset: int) -> _Child:
            buffer = _buffer(chunk_size)
            n = os.preadv(fd, [buffer], offset)
            chunk = memoryview(buffer)[:n]
            return _Child(_emit(sink, chunk, RAW), n, n)

        # sha256 and file writes release the GIL, so chunks are hashed and stored in parallel.
        leaves = list(pool.map(leaf, range(0, size, chunk_size)))
    finally:
        os.close(fd)
    if sum(c.filesize for c in leaves) != size:
        raise StoreError(f"{path} changed size while it was being added", hint="add it again once it is stable")
    return _balanced(leaves, sink, max_links)


def _import(path: Path, sink: BlockSink, chunk_size: int, max_links: int, hidden: bool,
            pool: ThreadPoolExecutor) -> _Child:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        target = os.fsencode(os.readlink(path))
        block = encode_node([], encode_unixfs(UnixFSData(UnixFSType.SYMLINK, data=target)))
        return _Child(_emit(sink, block, DAG_PB), len(block), 0)
    if stat.S_ISREG(st.st_mode):
        return _import_file(path, st.st_size, sink, chunk_size, max_links, pool)
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} is neither a file, a directory nor a symlink", hint="remove it or add its parent without it")
    names = sorted((e for e in os.listdir(path) if hidden or not e.startswith(".")), key=os.fsencode)
    links = []
    for name in names:
        child = _import(path / name, sink, chunk_size, max_links, hidden, pool)
        links.append(PBLink(child.cid, name, child.tsize))
    if sum(len(link.name.encode("utf-8", "surrogateescape")) + len(bytes(link.cid)) for link in links) > HAMT_THRESHOLD:
        raise UnsupportedDag(f"directory {path} is too large for a single UnixFS node")
    block = encode_node(links, encode_unixfs(UnixFSData(UnixFSType.DIRECTORY)))
    return _Child(_emit(sink, block, DAG_PB), len(block) + sum(link.tsize for link in links), 0)


def import_path(path: str | os.PathLike[str], sink: BlockSink = _discard, *, chunk_size: int = CHUNK_SIZE,
                max_links: int = MAX_LINKS, hidden: bool = False, workers: int | None = None) -> CID:
    """Chunk a file or directory into UnixFS blocks, hand each to `sink`, return the root CID."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise StoreError(f"{path} does not exist", hint="check the path")
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        return _import(path, sink, chunk_size, max_links, hidden, pool).cid


def model_cid(path: str | os.PathLike[str]) -> CID:
    """The CID a model directory (or any file tree) gets when added, computed without a store."""
    return import_path(path)


def add_path(store: Blockstore, path: str | os.PathLike[str], *, pin: bool = True, **options) -> CID:
    """Add a file or directory to `store` (pinned unless told otherwise); returns its root CID."""
    with store.gc_lock:
        with store.batch() as sink:
            root = import_path(path, sink, **options)
        if pin:
            store.pin(root, check=False)
    return root


def add_bytes(store: Blockstore, data: bytes, *, pin: bool = True, chunk_size: int = CHUNK_SIZE,
              max_links: int = MAX_LINKS) -> CID:
    """Add in-memory bytes as a UnixFS file; same CID as adding a file with those bytes."""
    with store.gc_lock:
        with store.batch() as sink:
            pieces = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
            leaves = [_Child(_emit(sink, piece, RAW), len(piece), len(piece)) for piece in pieces]
            root = _balanced(leaves, sink, max_links).cid
        if pin:
            store.pin(root, check=False)
    return root


def _unixfs(store: Blockstore, cid: CID) -> tuple[list[PBLink], UnixFSData]:
    node = decode_node(store.get(cid))
    return list(node.links), decode_unixfs(node.data)


def cat(store: Blockstore, cid: CID | str) -> Iterator[bytes]:
    """The bytes of the file at `cid`, in pieces, each block verified as it is read."""
    cid = as_cid(cid)
    if cid.codec.name == RAW:
        yield store.get(cid)
        return
    if cid.codec.name != DAG_PB:
        raise NotAFile(f"{cid} is {cid.codec.name}, not a UnixFS file")
    links, meta = _unixfs(store, cid)
    if meta.type not in (UnixFSType.FILE, UnixFSType.RAW):
        raise NotAFile(f"{cid} is a UnixFS {meta.type.name.lower()}, not a file")
    if meta.data:
        yield meta.data
    for link in links:
        yield from cat(store, link.cid)


def export(store: Blockstore, cid: CID | str, dest: str | os.PathLike[str]) -> None:
    """Write the file, directory or symlink at `cid` to `dest` (which must not exist yet)."""
    cid = as_cid(cid)
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise StoreError(f"{dest} already exists", hint="choose a new destination path")
    if cid.codec.name == DAG_PB:
        links, meta = _unixfs(store, cid)
        if meta.type == UnixFSType.DIRECTORY:
            dest.mkdir()
            for link in links:
                if link.name in ("", ".", "..") or "/" in link.name or "\0" in link.name:
                    raise MalformedBlock(f"directory {cid} has an unsafe entry name {link.name!r}")
                export(store, link.cid, dest / link.name)
            return
        if meta.type == UnixFSType.SYMLINK:
            os.symlink(os.fsdecode(meta.data or b""), dest)
            return
        if meta.type == UnixFSType.HAMT_SHARD:
            raise UnsupportedDag(f"{cid} is a HAMT-sharded directory")
    tmp = dest.with_name(f".{dest.name}.partial")
    with open(tmp, "wb") as f:
        for piece in cat(store, cid):
            f.write(piece)
    os.replace(tmp, dest)
