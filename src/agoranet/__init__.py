"""Agora: an open, verifiable network for AI inference.

The names below load on first use (PEP 562), so that importing one light module of the package — the
sampling rule a vLLM server loads as its logits processor (`agoranet.engine.vllm_rule`) — does not pull
in the records, keys and their dependencies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agoranet.core.cid import CID, cid_of, parse_cid
    from agoranet.core.errors import AgoraError
    from agoranet.core.identity import Identity, PeerId
    from agoranet.core.records import OfferBody, ReceiptBody, Record, sign_record, verify_record

__version__ = "0.1.0"
_EXPORTS = {
    "CID": "agoranet.core.cid", "cid_of": "agoranet.core.cid", "parse_cid": "agoranet.core.cid",
    "AgoraError": "agoranet.core.errors", "Identity": "agoranet.core.identity", "PeerId": "agoranet.core.identity",
    "OfferBody": "agoranet.core.records", "ReceiptBody": "agoranet.core.records", "Record": "agoranet.core.records",
    "sign_record": "agoranet.core.records", "verify_record": "agoranet.core.records",
}
__all__ = [
    "AgoraError", "CID", "Identity", "OfferBody", "PeerId", "ReceiptBody", "Record",
    "cid_of", "parse_cid", "sign_record", "verify_record",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'agoranet' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
