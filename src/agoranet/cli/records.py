"""`agora verify`'s record fetching: signed records and canonical requests by CID from a node, or from a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from agoranet.core.cid import parse_cid
from agoranet.core.errors import InvalidCID, RecordError
from agoranet.core.records import ReceiptBody, Record, verify_record
from agoranet.node.judge import UnverifiableReceipt
from agoranet.node.records_api import CBOR


def fetch_record(node: str, cid: str, client: httpx.Client | None = None) -> Record[Any]:
    """A signed record by CID from a node, checked (canonical bytes, known type, valid signature)."""
    try:
        parse_cid(cid)
    except InvalidCID:
        raise InvalidCID(f"{cid!r} is not a CID") from None  # asking a node for it would only say "no record"
    raw = _fetch_bytes(node, cid, client)
    record: Record[Any] = verify_record(raw)
    if str(record.cid) != cid:
        raise RecordError(f"{node} returned a record whose CID is {record.cid}, not {cid}")
    return record


def fetch_receipt(node: str, cid: str, client: httpx.Client | None = None) -> tuple[Record[ReceiptBody], bytes]:
    receipt = fetch_record(node, cid, client)
    if not isinstance(receipt.body, ReceiptBody):
        raise RecordError(f"{cid} is a {receipt.type} record, not a receipt")
    return receipt, _fetch_bytes(node, receipt.body.request, client)


def _fetch_bytes(node: str, cid: str, client: httpx.Client | None) -> bytes:
    url = f"{node.rstrip('/')}/agora/v1/records/{cid}"
    try:
        r = (client or httpx).get(url, headers={"accept": CBOR}, timeout=30)
    except httpx.HTTPError as exc:
        raise UnverifiableReceipt(f"cannot reach {node}: {exc}") from exc
    if r.status_code != 200:
        raise UnverifiableReceipt(f"{node} has no record {cid} (HTTP {r.status_code})")
    return r.content


def load_record_file(path: Path) -> Record[Any]:
    """A record saved as JSON: its `to_json` view, or a verdict file holding a `fraud_proof` key."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecordError(f"cannot read a record from {path}: {exc}") from exc
    return verify_record(doc.get("fraud_proof", doc))
