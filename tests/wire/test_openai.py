"""The one decoder of stream chunks: what it reads, and what it refuses."""

import asyncio

import pytest

from agoranet.core.identity import Identity
from agoranet.core.errors import RecordError
from agoranet.core.records import ReceiptSummaryBody, sign_record
from agoranet.wire.openai import (
    ReceiptPart, StreamChunk, check_summary, error_message, gateway_summary, read_summary,
)
from agoranet.wire.sse import StreamTruncated, sse_payloads

from ..core.test_records import receipt_body


def test_chat_and_completion_chunks_read_alike():
    chat = StreamChunk.decode(b'{"choices":[{"index":0,"delta":{"content":"hi"},"logprobs":null,'
                              b'"finish_reason":null}],"agora":{"token":7}}')
    assert chat.deltas == [("hi", None, None)] and chat.token == 7 and chat.usage is None
    plain = StreamChunk.decode(b'{"choices":[{"index":0,"text":"yo","finish_reason":"stop"}]}')
    assert plain.deltas == [("yo", None, "stop")] and plain.token is None
    usage = StreamChunk.decode(b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}')
    assert usage.deltas == [] and usage.usage.total_tokens == 5 and not usage.has_receipt


@pytest.mark.parametrize("data", [b'[1]', b'{"choices":{"a":1}}', b'{"choices":[{"text":5}]}',
                                  b'{"agora":{"token":"7"}}', b'not json'])
def test_a_chunk_of_the_wrong_shape_is_a_value_error(data):
    with pytest.raises(ValueError):
        StreamChunk.decode(data)


def test_a_receipt_is_read_typed_and_checked():
    key = Identity.generate()
    record = sign_record(key, receipt_body())
    signed = sign_record(key, ReceiptSummaryBody.of(record))
    part = ReceiptPart.read(ReceiptPart(record, signed).json)
    assert part.receipt == record and part.provider == record.signer and part.summary == signed
    summary = gateway_summary([part.json], request_id="r", gateway="g", credits=None)
    assert summary["receipt_cid"] == str(record.cid) and summary["receipts"] == [part.json] and "credits" not in summary
    forged = ReceiptPart(record, signed).json | {"receipt": record.to_json() | {"signer": str(Identity.generate().peer_id)}}
    other = sign_record(key, receipt_body().model_copy(update={"output_text": "something else"}))
    lying = ReceiptPart(record, signed).json | {"summary": sign_record(key, ReceiptSummaryBody.of(other)).to_json()}
    stranger = ReceiptPart(record, sign_record(Identity.generate(), ReceiptSummaryBody.of(record))).json
    no_summary = {k: v for k, v in part.json.items() if k != "summary"}
    for bad in (forged, lying, stranger, no_summary, {}, None, {"receipt": 5}):
        with pytest.raises(RecordError):
            ReceiptPart.read(bad)


def test_a_compact_receipt_carries_the_cid_url_and_signed_summary_only():
    key = Identity.generate()
    record = sign_record(key, receipt_body())
    part = ReceiptPart(record, sign_record(key, ReceiptSummaryBody.of(record)), b"\x01")
    compact = part.compact("http://p/agora/v1/records/x")
    assert set(compact) == {"receipt_cid", "provider", "summary", "receipt_url"}
    assert read_summary(compact) == part.summary
    check_summary(read_summary(compact), record)  # what a client does once it fetched the record by CID
    with pytest.raises(RecordError):
        read_summary(compact | {"receipt_cid": str(sign_record(key, receipt_body().model_copy(
            update={"output_text": "x"})).cid)})


def test_error_bodies_are_read_only_when_they_are_error_bodies():
    assert error_message({"error": {"message": "busy", "code": "rate_limited"}}) == "busy"
    assert error_message({"detail": "x"}) is None and error_message("text") is None


def test_sse_payloads_stop_at_done_and_notice_a_cut():
    async def lines(items):
        for item in items:
            yield item

    async def collect(items):
        return [p async for p in sse_payloads(lines(items))]

    assert asyncio.run(collect([b": ping", b"data: {}", b"", "data: [1]", b"data: [DONE]", b"data: late"])) == [
        b"{}", b"[1]"]
    with pytest.raises(StreamTruncated):
        asyncio.run(collect([b"data: {}"]))
