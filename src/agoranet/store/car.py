"""CAR v1 archives: the format IPFS, Filecoin and Arweave bundlers exchange DAGs in.

A CAR is varint(len) + DAG-CBOR header {roots: [CID], version: 1}, then one section per block:
varint(len(cid) + len(data)) + binary CID + data. Export writes the DAG depth-first from the root
(as `ipfs dag export` does); import streams sections and checks every block against its CID.
"""

from __future__ import annotations

from typing import BinaryIO

import libipld

from agoranet.core.cid import CID, parse_cid
from agoranet.store.blockstore import Blockstore, as_cid, verify_block
from agoranet.store.dagpb import encode_varint
from agoranet.store.errors import BlockMismatch, MalformedCar

__all__ = ["export_car", "import_car", "car_header"]

# Bounds on what a length prefix may claim, so a hostile CAR cannot make us allocate gigabytes:
# a CID plus a block of at most 4 MiB (the most kubo and Agora's storage peers accept), a small header.
MAX_SECTION = (4 << 20) + 128
MAX_HEADER = 1 << 20


def car_header(roots: list[CID]) -> bytes:
    """The length-prefixed CAR v1 header, as canonical DAG-CBOR (keys sorted: roots, version)."""
    body = bytearray(b"\xa2\x65roots")
    body += bytes([0x80 + len(roots)]) if len(roots) < 24 else b"\x98" + bytes([len(roots)])
    for root in roots:
        link = b"\x00" + bytes(root)
        body += b"\xd8\x2a\x58" + bytes([len(link)]) + link
    body += b"\x67version\x01"
    return encode_varint(len(body)) + bytes(body)


def export_car(store: Blockstore, root: CID | str, out: BinaryIO) -> int:
    """Write the DAG under `root` to `out` as a CAR v1; returns the number of blocks written."""
    root = as_cid(root)
    out.write(car_header([root]))
    count = 0
    for cid, data in store.walk(root):
        raw = bytes(cid)
        out.write(encode_varint(len(raw) + len(data)))
        out.write(raw)
        out.write(data)
        count += 1
    return count


def _read_varint(f: BinaryIO) -> int | None:
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            if shift == 0:
                return None
            raise MalformedCar("CAR ends inside a length prefix")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise MalformedCar("CAR has an overlong length prefix")


def _read_exact(f: BinaryIO, n: int, limit: int, what: str) -> bytes:
    if n > limit:
        raise MalformedCar(f"CAR {what} claims {n} bytes, more than the {limit} allowed")
    data = f.read(n)
    if len(data) != n:
        raise MalformedCar(f"CAR is truncated: wanted {n} bytes, got {len(data)}")
    return data


def _split_cid(section: bytes) -> tuple[CID, bytes]:
    """Split a section into its binary CID (v1: version, codec, multihash) and the block data."""
    if section[:2] == b"\x12\x20":  # a CIDv0 is a bare sha2-256 multihash
        raise MalformedCar("CAR contains a CIDv0 block; Agora stores CIDv1 only")
    pos = 0
    fields = []
    for _ in range(4):  # version, codec, hash function, digest length
        value = shift = 0
        while True:
            if pos >= len(section):
                raise MalformedCar("CAR section ends inside its CID")
            byte = section[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
        fields.append(value)
    end = pos + fields[3]
    if fields[0] != 1 or end > len(section):
        raise MalformedCar("CAR section does not start with a CIDv1")
    try:
        cid = parse_cid(section[:end]).set(base="base32")
    except Exception as exc:
        raise MalformedCar(f"CAR section has an unusable CID: {exc}") from exc
    return cid, section[end:]


def import_car(store: Blockstore, f: BinaryIO, *, pin: bool = True) -> list[CID]:
    """Read a CAR v1 into `store`, verifying every block; pins complete roots; returns the roots."""
    length = _read_varint(f)
    if length is None:
        raise MalformedCar("file is empty")
    try:
        header = libipld.decode_dag_cbor(_read_exact(f, length, MAX_HEADER, "header"))
        roots = [as_cid(r[1:] if r[:1] == b"\x00" else r) for r in header["roots"]]
        version = header["version"]
    except MalformedCar:
        raise
    except Exception as exc:
        raise MalformedCar(f"CAR header is not valid: {exc}") from exc
    if version != 1:
        raise MalformedCar(f"CAR version {version} is not supported; only version 1")
    with store.gc_lock:
        while (size := _read_varint(f)) is not None:
            cid, data = _split_cid(_read_exact(f, size, MAX_SECTION, "section"))
            try:
                verify_block(cid, data)
            except BlockMismatch as exc:
                raise MalformedCar(f"CAR block does not match its CID {cid}; nothing after it was imported") from exc
            store.put_trusted(cid, data)
        if pin:
            for root in roots:
                if not store.missing(root):
                    store.pin(root, check=False)
    return roots
