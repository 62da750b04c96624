"""`agora verify`'s record fetching: signed records and canonical requests by CID from a node, or from a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agoranet.core.cid import parse_cid
from agoranet.core.errors import InvalidCID, RecordError
from agoranet.core.records import ReceiptBody, Record, verify_record
from agoranet.net.agora_client import AgoraClient, call


def fetch_record(node: str, cid: str) -> Record[Any]:
    """A signed record by CID from a node, checked (canonical bytes, known type, valid signature)."""
    _check_cid(cid)
    return call(node, lambda client: client.record(cid))


def fetch_receipt(node: str, cid: str) -> tuple[Record[ReceiptBody], bytes]:
    """A receipt by CID from a node, checked, and the canonical request bytes it binds."""
    _check_cid(cid)

    async def fetch(client: AgoraClient) -> tuple[Record[ReceiptBody], bytes]:
        receipt = await client.record(cid)
        if not isinstance(receipt.body, ReceiptBody):
            raise RecordError(f"{cid} is a {receipt.type} record, not a receipt")
        return receipt, await client.record_bytes(receipt.body.request)

    return call(node, fetch)


def _check_cid(cid: str) -> None:
    try:
        parse_cid(cid)
    except InvalidCID:
        raise InvalidCID(f"{cid!r} is not a CID") from None  # asking a node for it would only say "no record"


def load_record_file(path: Path) -> Record[Any]:
    """A record saved as JSON: its `to_json` view, or a verdict file holding a `fraud_proof` key."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecordError(f"cannot read a record from {path}: {exc}") from exc
    return verify_record(doc.get("fraud_proof", doc))
