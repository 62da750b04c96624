import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agoranet.core.errors import BadSignature, MalformedRecord, RecordError, UnknownRecordType
from agoranet.core.identity import Identity
from agoranet.core.records import (
    OfferBody, OfferedModel, ReceiptBody, SamplingParams, TopLogprob, PriceCharged,
    decode_record, encode_canonical, sign_record, verify_record,
)
from agoranet.verify.rules import RULE, RULE_DIGEST

IDENT = Identity.generate()


def receipt_body(**over) -> ReceiptBody:
    fields = dict(
        model="bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku", precision="fp32", rule=RULE,
        rule_digest=RULE_DIGEST,
        request="bafyreigbtj4x7ip5legnfznufuopl4sg4knzc2cof6duas4b3q2fy6swua", request_id="req-1",
        prompt_tokens=5, output_tokens=[1, 2, 3], output_text="abc", logprobs=[-0.5, -1.25, -0.01],
        top_logprobs=[[TopLogprob(token=1, logprob=-0.5)]] * 3,
        sampling=SamplingParams(temperature=0.7, top_p=1.0, seed=42, max_tokens=3),
        finish_reason="length", price=PriceCharged(input_per_mtok=100, output_per_mtok=200, charged=1),
        started_ms=1, finished_ms=2,
    )
    fields.update(over)
    return ReceiptBody(**fields)


def test_round_trip_bytes_and_json():
    rec = sign_record(IDENT, receipt_body())
    again = verify_record(rec.encode(), ReceiptBody)
    assert again == rec and again.cid == rec.cid
    assert str(rec.cid).startswith("bafyrei")
    assert verify_record(rec.to_json()) == rec


def test_every_byte_flip_is_detected():
    data = sign_record(IDENT, receipt_body()).encode()
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            flipped = bytearray(data)
            flipped[i] ^= mask
            with pytest.raises(RecordError):
                verify_record(bytes(flipped))


def test_wrong_key_is_rejected():
    rec = sign_record(IDENT, receipt_body())
    forged = rec.to_wire() | {"signer": str(Identity.generate().peer_id)}
    with pytest.raises(BadSignature, match="does not match signer"):
        verify_record(encode_canonical(forged))


def test_unknown_type_and_wrong_expected_type_are_rejected():
    rec = sign_record(IDENT, receipt_body())
    with pytest.raises(UnknownRecordType, match="unknown record type"):
        verify_record(encode_canonical(rec.to_wire() | {"type": "agora/nope/1"}))
    with pytest.raises(UnknownRecordType, match="expected a agora/offer/1"):
        verify_record(rec.encode(), OfferBody)


def test_malformed_inputs_name_the_problem():
    with pytest.raises(MalformedRecord, match="not valid DAG-CBOR"):
        decode_record(b"\xff\x00")
    with pytest.raises(MalformedRecord, match="exactly the keys"):
        decode_record(encode_canonical({"type": "x"}))
    rec = sign_record(IDENT, receipt_body())
    bad_body = rec.to_wire()
    bad_body["body"] = dict(bad_body["body"], prompt_tokens=-1)
    with pytest.raises(MalformedRecord, match="prompt_tokens"):
        decode_record(encode_canonical(bad_body))
    with pytest.raises(MalformedRecord, match="NaN|nan|not allowed"):
        encode_canonical({"x": float("nan")})


def test_non_canonical_encoding_is_rejected():
    # {"a": 1} with the integer written in a 2-byte form instead of the shortest one.
    with pytest.raises(MalformedRecord, match="canonical"):
        decode_record(b"\xa1\x61a\x19\x00\x01")


def test_offer_record_round_trip():
    body = OfferBody(
        url="http://127.0.0.1:1", models=[OfferedModel(cid="bafy", name="agora-tiny", input_per_mtok=1,
        output_per_mtok=2, context_length=1024)], precision="fp32", rule=RULE, max_concurrency=8, hardware="cpu",
        engine="transformers", issued_ms=1, expires_ms=2, nonce="n",
    )
    assert verify_record(sign_record(IDENT, body).encode(), OfferBody).body == body


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 259), max_size=20),
    temperature=st.floats(0, 2, allow_nan=False),
    seed=st.integers(-(2**63), 2**63 - 1),
    request_id=st.text(max_size=30),
)
def test_receipts_round_trip_for_any_content(tokens, temperature, seed, request_id):
    body = receipt_body(
        output_tokens=tokens, logprobs=[-1.0] * len(tokens), top_logprobs=[[]] * len(tokens), request_id=request_id,
        sampling=SamplingParams(temperature=temperature, top_p=1.0, seed=seed, max_tokens=len(tokens)),
    )
    rec = sign_record(IDENT, body)
    assert verify_record(rec.encode()).body == body
