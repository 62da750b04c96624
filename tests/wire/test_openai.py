"""The one decoder of stream chunks: what it reads, and what it refuses."""

import asyncio

import pytest

from agoranet.core.identity import Identity
from agoranet.core.errors import RecordError
from agoranet.core.records import sign_record
from agoranet.wire.openai import ReceiptPart, StreamChunk, error_message, gateway_summary
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
    record = sign_record(Identity.generate(), receipt_body())
    part = ReceiptPart.read(ReceiptPart(record).json)
    assert part.receipt == record and part.provider == record.signer
    summary = gateway_summary([part], request_id="r", gateway="g", credits=None)
    assert summary["receipt_cid"] == str(record.cid) and summary["receipts"] == [part.json] and "credits" not in summary
    forged = ReceiptPart(record).json | {"receipt": record.to_json() | {"signer": str(Identity.generate().peer_id)}}
    for bad in (forged, {}, None, {"receipt": 5}):
        with pytest.raises(RecordError):
            ReceiptPart.read(bad)


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
