"""dag-pb nodes and their UnixFS payloads: the protobuf wire format IPFS uses for files and directories.

Encoding follows what kubo writes byte for byte: links before data, every link carries Hash, Name
(present even when empty) and Tsize; UnixFS fields in field-number order, blocksizes unpacked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from agoranet.core.cid import CID, parse_cid
from agoranet.store.errors import MalformedBlock

__all__ = ["PBLink", "PBNode", "UnixFSType", "UnixFSData", "encode_node", "decode_node",
           "encode_unixfs", "decode_unixfs", "encode_varint", "decode_varint"]


class UnixFSType(IntEnum):
    RAW = 0
    DIRECTORY = 1
    FILE = 2
    METADATA = 3
    SYMLINK = 4
    HAMT_SHARD = 5


@dataclass(frozen=True)
class PBLink:
    cid: CID
    name: str
    tsize: int


@dataclass(frozen=True)
class PBNode:
    links: tuple[PBLink, ...]
    data: bytes | None


@dataclass(frozen=True)
class UnixFSData:
    type: UnixFSType
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: tuple[int, ...] = field(default=())


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode an unsigned LEB128 varint at `pos`; returns (value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise MalformedBlock("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _field(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _field(number, 2) + encode_varint(len(value)) + value


def _fields(buf: bytes | memoryview):
    """Yield (field number, wire type, value) from a protobuf message; value is int or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = decode_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = decode_varint(buf, pos)
        elif wire_type == 2:
            length, pos = decode_varint(buf, pos)
            if pos + length > len(buf):
                raise MalformedBlock("protobuf field runs past the end of the block")
            value, pos = bytes(buf[pos:pos + length]), pos + length
        else:
            raise MalformedBlock(f"unexpected protobuf wire type {wire_type} in field {number}")
        yield number, wire_type, value


def encode_node(links: list[PBLink] | tuple[PBLink, ...], data: bytes | None) -> bytes:
    out = bytearray()
    for link in links:
        body = _bytes_field(1, bytes(link.cid)) + _bytes_field(2, link.name.encode()) \
            + _field(3, 0) + encode_varint(link.tsize)
        out += _bytes_field(2, body)
    if data is not None:
        out += _bytes_field(1, data)
    return bytes(out)


def decode_node(block: bytes | memoryview) -> PBNode:
    links: list[PBLink] = []
    data: bytes | None = None
    for number, wire_type, value in _fields(block):
        if number == 2 and wire_type == 2:
            cid, name, tsize = None, "", 0
            for n, wt, v in _fields(value):
                if n == 1 and wt == 2:
                    cid = parse_cid(v).set(base="base32")
                elif n == 2 and wt == 2:
                    name = v.decode("utf-8", "surrogateescape")
                elif n == 3 and wt == 0:
                    tsize = v
            if cid is None:
                raise MalformedBlock("dag-pb link without a Hash")
            links.append(PBLink(cid, name, tsize))
        elif number == 1 and wire_type == 2:
            data = value
        else:
            raise MalformedBlock(f"unknown field {number} in a dag-pb node")
    return PBNode(tuple(links), data)


def encode_unixfs(node: UnixFSData) -> bytes:
    out = bytearray(_field(1, 0) + encode_varint(int(node.type)))
    if node.data is not None:
        out += _bytes_field(2, node.data)
    if node.filesize is not None:
        out += _field(3, 0) + encode_varint(node.filesize)
    for size in node.blocksizes:
        out += _field(4, 0) + encode_varint(size)
    return bytes(out)


def decode_unixfs(payload: bytes | None) -> UnixFSData:
    if payload is None:
        raise MalformedBlock("dag-pb node has no UnixFS data")
    kind: int | None = None
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: list[int] = []
    for number, wire_type, value in _fields(payload):
        if number == 1 and wire_type == 0:
            kind = value
        elif number == 2 and wire_type == 2:
            data = value
        elif number == 3 and wire_type == 0:
            filesize = value
        elif number == 4 and wire_type == 0:
            blocksizes.append(value)
        elif number == 4 and wire_type == 2:  # packed, as some writers emit
            pos = 0
            while pos < len(value):
                size, pos = decode_varint(value, pos)
                blocksizes.append(size)
    if kind is None or kind not in UnixFSType._value2member_map_:
        raise MalformedBlock(f"UnixFS data has unknown type {kind}")
    return UnixFSData(UnixFSType(kind), data, filesize, tuple(blocksizes))
