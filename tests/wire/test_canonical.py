"""The canonical request a receipt binds: its bytes may never change, and it reads back typed."""

import pytest

from agoranet.core.cid import DAG_CBOR, cid_of
from agoranet.core.errors import MalformedRecord
from agoranet.core.records import encode_canonical
from agoranet.engine.base import GenerationRequest, Sampling
from agoranet.wire.canonical import CanonicalRequest

CHAT = GenerationRequest("req-1", "chat", Sampling(0.7, 0.9, 42, 16, ("x",)),
                         messages=(("system", "s"), ("user", "é")), top_logprobs=3, prefix_tokens=(1, 2))
PLAIN = GenerationRequest("", "completion", Sampling(1, 1, 2**62, 64, ()), prompt="hello")


@pytest.mark.parametrize("request_, cid", [
    # CIDs of the bytes provider.canonical_request encoded before the typed model replaced it
    (CHAT, "bafyreihry4siafgknxsl2zkjoyvhxmven7rblmsdyxjdzzknmhkmd4mf74"),
    (PLAIN, "bafyreicspofnbplcrnpjvh3smwrqstu5rh6uqldgjnjf3ekldyqyu36z2a"),
])
def test_canonical_bytes_are_those_receipts_already_bind(request_, cid):
    data = request_.canonical("bafkcid").encode()
    assert str(cid_of(data, DAG_CBOR)) == cid
    again = CanonicalRequest.decode(data)
    assert GenerationRequest.from_canonical(again) == request_ and again.encode() == data


def test_a_request_of_the_wrong_shape_says_what_is_wrong():
    good = CHAT.canonical("bafkcid").model_dump(exclude_none=True)
    with pytest.raises(MalformedRecord, match="sampling.seed"):
        CanonicalRequest.decode(encode_canonical(good | {"sampling": good["sampling"] | {"seed": "42"}}))
    with pytest.raises(MalformedRecord, match="kind"):
        CanonicalRequest.decode(encode_canonical(good | {"kind": "image"}))
