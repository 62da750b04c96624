"""Content identifiers: CIDv1, sha2-256, base32 (`b…`), byte-identical to what IPFS computes."""

from __future__ import annotations

import hashlib

from multiformats import CID, multihash

from agoranet.core.errors import InvalidCID

__all__ = ["CID", "RAW", "DAG_CBOR", "DAG_PB", "LIBP2P_KEY", "cid_of", "cid_from_digest", "parse_cid"]

RAW = "raw"
DAG_CBOR = "dag-cbor"
DAG_PB = "dag-pb"
LIBP2P_KEY = "libp2p-key"


def cid_from_digest(digest: bytes, codec: str) -> CID:
    """CIDv1 of a sha2-256 digest already computed (streaming hashers use this)."""
    return CID("base32", 1, codec, multihash.wrap(digest, "sha2-256"))


def cid_of(data: bytes, codec: str = RAW) -> CID:
    """CIDv1 (sha2-256) of `data` encoded with `codec`."""
    return cid_from_digest(hashlib.sha256(data).digest(), codec)


def parse_cid(text: str | bytes | CID) -> CID:
    """Parse a CID from its string or binary form, with a clear error when it is not one."""
    if isinstance(text, CID):
        return text
    try:
        cid = CID.decode(text)
    except Exception as exc:  # multiformats raises several unrelated types
        shown = text if isinstance(text, str) else text.hex()
        raise InvalidCID(f"not a CID: {shown[:80]!r}") from exc
    if cid.hashfun.name != "sha2-256":
        raise InvalidCID(f"CID {cid} uses {cid.hashfun.name}; Agora accepts sha2-256 only")
    return cid
