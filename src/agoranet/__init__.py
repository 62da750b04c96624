"""Agora: an open, verifiable network for AI inference."""

from agoranet.core.cid import CID, cid_of, parse_cid
from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity, PeerId
from agoranet.core.records import OfferBody, ReceiptBody, Record, sign_record, verify_record

__version__ = "0.1.0"
__all__ = [
    "AgoraError", "CID", "Identity", "OfferBody", "PeerId", "ReceiptBody", "Record",
    "cid_of", "parse_cid", "sign_record", "verify_record",
]
