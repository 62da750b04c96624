"""The provider's OpenAI API, driven by the official SDK over real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import openai
import pytest

from agoranet.core.records import OfferBody, verify_record
from agoranet.engine.models import resolve_model
from agoranet.engine.tokenizer import ByteTokenizer
from agoranet.wire.openai import ReceiptPart

from ..conftest import FULL, fetch_receipt

TOK = ByteTokenizer.from_dir(resolve_model("agora-tiny")[0])
MSG = [{"role": "user", "content": "write a function that reverses a list"}]


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_chat_with_logprobs_carries_a_verifiable_receipt(provider):
    url, prov = provider
    raw = sdk(url).chat.completions.with_raw_response.create(
        model="agora-tiny", messages=MSG, max_tokens=24, temperature=0.8, seed=11, logprobs=True, top_logprobs=3,
    )
    r = raw.parse()
    text = r.choices[0].message.content
    agora = r.model_extra["agora"]
    assert "receipt" not in agora and "request" not in agora  # compact by default: CID, URL, signed summary
    receipt = fetch_receipt(agora)  # by CID, checked against the summary
    assert str(receipt.cid) == agora["receipt_cid"] == raw.headers["x-agora-receipt"]
    summary = verify_record(agora["summary"]).body
    assert summary.output_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert (summary.completion_tokens, summary.price) == (len(receipt.body.output_tokens), receipt.body.price)
    assert receipt.signer == agora["provider"] == str(prov.identity.peer_id)
    body = receipt.body
    assert TOK.decode(body.output_tokens) == text == body.output_text
    assert body.model == prov.engine.model_cid and body.precision == "fp32"
    assert body.sampling.seed == 11 and body.sampling.temperature == 0.8
    assert r.usage.completion_tokens == len(body.output_tokens) == len(r.choices[0].logprobs.content)
    first = r.choices[0].logprobs.content[0]
    assert len(first.top_logprobs) == 3 and first.logprob == pytest.approx(body.logprobs[0])
    assert body.price.charged > 0
    # The receipt and the canonical request it binds are retrievable by CID.
    fetched = httpx.get(f"{url}/agora/v1/records/{receipt.cid}").json()
    assert verify_record(fetched["record"]) == receipt
    request = httpx.get(f"{url}/agora/v1/records/{body.request}").json()["request"]
    assert request["messages"] == MSG and request["sampling"]["seed"] == 11
    cbor = httpx.get(f"{url}/agora/v1/records/{receipt.cid}", headers={"accept": "application/vnd.ipld.dag-cbor"})
    assert verify_record(cbor.content) == receipt


def test_streamed_chat_matches_its_receipt(provider):
    url, _ = provider
    stream = sdk(url).chat.completions.create(
        model="agora-tiny", messages=MSG, max_tokens=40, temperature=0.9, seed=5, stream=True, logprobs=True,
        stream_options={"include_usage": True}, extra_body=FULL,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.usage.completion_tokens == 40
    receipt = ReceiptPart.read(last.model_extra["agora"]).receipt  # asked in full: the record and its summary
    assert receipt.body.output_text == text == TOK.decode(receipt.body.output_tokens)
    assert all("agora" not in (c.model_extra or {}) for c in chunks[:-1])


def test_stream_and_plain_give_the_same_answer_for_the_same_seed(provider):
    url, _ = provider
    args = dict(model="agora-tiny", messages=MSG, max_tokens=30, temperature=0.8, seed=99)
    plain = sdk(url).chat.completions.create(**args).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in sdk(url).chat.completions.create(**args, stream=True)
                       if c.choices)
    assert plain == streamed


@pytest.mark.slow
def test_same_seed_same_text_other_seeds_differ(provider):
    url, _ = provider
    client = sdk(url)

    def ask(seed: int) -> str:
        return client.chat.completions.create(model="agora-tiny", messages=MSG, max_tokens=32, temperature=1.0,
                                              seed=seed).choices[0].message.content

    assert ask(1) == ask(1)
    assert len({ask(s) for s in range(2, 8)}) >= 5


@pytest.mark.slow
def test_sampled_tokens_do_not_depend_on_logprobs_max_tokens_or_streaming(provider):
    url, _ = provider
    client = sdk(url)
    args = dict(model="agora-tiny", messages=MSG, temperature=0.9, top_p=0.95, seed=1234)

    def tokens(**kw) -> list[int]:
        if kw.pop("stream", False):
            chunks = list(client.chat.completions.create(**args | kw, stream=True))
            agora = next(c.model_extra["agora"] for c in chunks
                         if "receipt_cid" in ((c.model_extra or {}).get("agora") or {}))
        else:
            agora = client.chat.completions.create(**args | kw).model_extra["agora"]
        return fetch_receipt(agora).body.output_tokens

    base = tokens(max_tokens=32)
    assert len(base) > 8
    assert tokens(max_tokens=32, logprobs=True, top_logprobs=7) == base
    assert tokens(max_tokens=32, logprobs=True, top_logprobs=1, stream=True) == base
    assert tokens(max_tokens=48)[: len(base)] == base  # more room only lets it run on
    assert tokens(max_tokens=8) == base[:8]
    assert tokens(max_tokens=32, seed=1235) != base


def test_completions_endpoint_with_logprobs_echo_and_stop(provider):
    url, _ = provider
    client = sdk(url)
    r = client.completions.create(model="agora-tiny", prompt="def add(a, b):\n", max_tokens=20, temperature=0,
                                  logprobs=2, echo=True)
    choice = r.choices[0]
    assert choice.text.startswith("def add(a, b):\n")
    assert len(choice.logprobs.tokens) == r.usage.completion_tokens == 20
    assert all(len(t) == 2 for t in choice.logprobs.top_logprobs)
    full = client.completions.create(model="agora-tiny", prompt="import os\n", max_tokens=40, temperature=0).choices[0].text
    stop = full[5:7]
    cut = client.completions.create(model="agora-tiny", prompt="import os\n", max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full[: full.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="agora-tiny", prompt="import os\n", max_tokens=40, temperature=0, stop=[stop], stream=True) if c.choices)
    assert streamed == cut.choices[0].text


def test_models_and_signed_offer(provider):
    url, prov = provider
    models = sdk(url).models.list().data
    assert [m.id for m in models] == ["agora-tiny"]
    offer = httpx.get(f"{url}/agora/v1/offer").json()
    record = verify_record(offer["record"], OfferBody)
    assert offer["cid"] == str(record.cid)
    assert record.body.models[0].cid == models[0].model_extra["agora"]["cid"] == prov.engine.model_cid
    assert record.body.url == url and record.body.expires_ms > record.body.issued_ms


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "agora-tiny"}, 400, "messages"),
        ({"model": "gpt-9", "messages": MSG}, 404, "not served here"),
        ({"model": "agora-tiny", "messages": MSG, "max_tokens": -5}, 400, "max_tokens"),
        ({"model": "agora-tiny", "messages": MSG, "max_tokens": 100000}, 400, "at most"),
        ({"model": "agora-tiny", "messages": MSG, "temperature": 7}, 400, "temperature"),
        ({"model": "agora-tiny", "messages": [{"role": "user", "content": "x" * 900}], "max_tokens": 500}, 400,
         "context"),
        ({"model": "agora-tiny", "messages": []}, 400, "messages"),
        ({"model": "agora-tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ],
)
def test_bad_requests_get_openai_style_errors(provider, body, status, needle):
    url, _ = provider
    r = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_invalid_json_and_huge_bodies_are_refused_and_provider_keeps_serving(provider):
    url, _ = provider
    r = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "agora-tiny", "messages": [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    huge = json.dumps({"model": "agora-tiny", "messages": [{"role": "user", "content": "a" * 5_000_000}]})
    r = httpx.post(f"{url}/v1/chat/completions", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    ok = sdk(url).chat.completions.create(model="agora-tiny", messages=MSG, max_tokens=4)
    assert ok.usage.completion_tokens == 4


@pytest.mark.slow
async def test_concurrent_requests_are_batched_and_match_sequential_ones(provider):
    url, prov = provider
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    async def ask(i: int) -> str:
        r = await client.chat.completions.create(
            model="agora-tiny", messages=[{"role": "user", "content": f"task {i}" * (i + 1)}], max_tokens=24,
            temperature=0.7, seed=i)
        return r.choices[0].message.content

    sequential = [await ask(i) for i in range(6)]
    before = prov.engine.max_batch_seen = 0
    concurrent = await asyncio.gather(*(ask(i) for i in range(6)))
    assert list(concurrent) == sequential
    assert prov.engine.max_batch_seen > max(before, 1)
    await client.close()


async def test_disconnecting_client_frees_its_slot(provider):
    url, prov = provider
    async with httpx.AsyncClient() as client:
        async with client.stream("POST", f"{url}/v1/chat/completions", json={
            "model": "agora-tiny", "messages": MSG, "max_tokens": 256, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    break
    for _ in range(100):
        if prov.active == 0:
            break
        await asyncio.sleep(0.05)
    assert prov.active == 0
