"""Routing preferences named as users copy them: provider URLs as printed (with `/v1`), and a 404 that says
which preference left no provider."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from agoranet.engine.stub import StubEngine
from agoranet.net.gossip import GossipConfig
from agoranet.node.node import ProviderOptions

from ..conftest import FAST_GOSSIP, start_gateway, start_provider, wait_for

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    gw, gateway = start_gateway(root / "gw")
    started = [start_provider(root / f"p{i}", ProviderOptions(pricing={"output_per_mtok": 1000 * (i + 1)}),
                              engine=StubEngine(model_name="agora-tiny"), peers=[gw.url],
                              gossip=GossipConfig(interval_s=FAST_GOSSIP)) for i in range(2)]
    try:
        peers = {str(p.identity.peer_id): server.url for server, p in started}
        wait_for(lambda: set(peers) <= set(gateway.discovery.members()), what="both providers")
        yield gw.url, peers
    finally:
        for server, _ in started:
            server.stop()
        gw.stop()


def chat(url: str, provider: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=30,
                      json={"model": "agora-tiny", "messages": MSG, "max_tokens": 2, "provider": provider})


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
def test_a_provider_url_in_order_is_accepted_with_or_without_v1(net, suffix):
    url, peers = net
    for peer, provider_url in peers.items():
        r = chat(url, {"order": [provider_url + suffix], "allow_fallbacks": False})
        assert r.status_code == 200 and r.json()["agora"]["provider"] == peer


def test_require_verified_without_a_verifier_says_so_with_the_right_counts(net):
    url, _ = net
    r = chat(url, {"require_verified": True})
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_provider_matches"
    message = r.json()["error"]["message"]
    assert message.startswith("2 providers serve 'agora-tiny'")
    assert "2 not verified: this gateway follows no verifier (provider.require_verified)" in message
    assert "only/ignore" not in message


def test_a_404_names_each_preference_that_left_providers_out(net):
    url, peers = net
    cheap, dear = peers
    r = chat(url, {"ignore": [cheap], "max_price": {"completion": 1500}})
    message = r.json()["error"]["message"]
    assert r.status_code == 404 and "1 named in provider.ignore" in message and "1 over provider.max_price" in message


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_object"}), ("response_format", {"type": "json_schema", "json_schema": {}}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
    ("presence_penalty", 0.5), ("frequency_penalty", -1.0), ("logit_bias", {"50": 10}), ("n", 2),
])
def test_an_openai_field_agora_cannot_honour_is_refused_naming_it(net, field, value):
    url, _ = net
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "agora-tiny", "messages": MSG, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert field in r.json()["error"]["message"] and r.json()["error"]["code"] == "unsupported_parameter"


@pytest.mark.parametrize("field, value", [("best_of", 3), ("suffix", "}"), ("presence_penalty", 1.0)])
def test_completion_fields_are_refused_too(net, field, value):
    url, _ = net
    r = httpx.post(f"{url}/v1/completions", json={"model": "agora-tiny", "prompt": "x", field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_the_no_op_values_of_those_fields_are_accepted(net):
    url, _ = net
    r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "model": "agora-tiny", "messages": MSG, "max_tokens": 2, "response_format": {"type": "text"},
        "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "n": 1, "tool_choice": "none"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("prefs, param", [({"sortt": "price"}, "provider.sortt"),
                                          ({"data_collection": "deny"}, "provider.data_collection"),
                                          ({"zdr": True}, "provider.zdr")])
def test_unknown_or_unhonourable_provider_keys_are_refused(net, prefs, param):
    url, _ = net
    r = chat(url, prefs)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_quantizations_select_offers_by_precision_class(net):
    url, _ = net
    assert chat(url, {"quantizations": ["stub"]}).status_code == 200  # the stub engine's class
    r = chat(url, {"quantizations": ["fp8", "int4"]})
    assert r.status_code == 404 and "2 not of precision fp8/int4 (provider.quantizations)" in r.json()["error"]["message"]


def test_usage_reports_the_cost_in_credits_like_openrouter(net):
    url, _ = net
    r = chat(url, {}).json()
    assert r["usage"]["cost"] == r["agora"]["summary"]["body"]["price"]["charged"] / 1e6 > 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30, json={
            "model": "agora-tiny", "messages": MSG, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}) as s:
        events = [json.loads(line[5:]) for line in s.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
    last = events[-1]
    assert last["usage"]["cost"] == last["agora"]["summary"]["body"]["price"]["charged"] / 1e6 > 0


def test_embeddings_get_an_openai_404_saying_they_are_not_offered(net):
    url, peers = net
    for base in (url, next(iter(peers.values()))):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError, match="embeddings are not offered") as caught:
            client.embeddings.create(model="agora-tiny", input="hi")
        assert caught.value.code == "embeddings_not_offered"


def test_a_compact_answer_carries_the_receipt_cid_and_summary_and_the_record_is_fetched_by_cid(net):
    from agoranet.core.records import ReceiptBody, ReceiptSummaryBody, verify_record

    url, _ = net
    ask = {"model": "agora-tiny", "messages": MSG, "max_tokens": 32, "seed": 7}
    full = httpx.post(f"{url}/v1/chat/completions", timeout=30, json=ask | {"agora": {"receipt": "full"}})
    compact = httpx.post(f"{url}/v1/chat/completions", timeout=30, json=ask)  # the default
    assert full.status_code == compact.status_code == 200
    assert len(compact.content) < len(full.content) / 2, (len(compact.content), len(full.content))
    agora = compact.json()["agora"]
    assert "receipt" not in agora and all("receipt" not in p for p in agora["receipts"])
    record = httpx.get(agora["receipt_url"]).json()["record"]  # the provider serves it by CID
    receipt = verify_record(record, ReceiptBody)
    assert str(receipt.cid) == agora["receipt_cid"] and receipt.signer == agora["provider"]
    summary = verify_record(agora["summary"], ReceiptSummaryBody)  # signed by the provider, not the gateway
    assert summary.signer == receipt.signer and summary.body == ReceiptSummaryBody.of(receipt)
    assert summary.body.completion_tokens == len(receipt.body.output_tokens) == 32 and summary.body.receipt == str(
        receipt.cid)
    assert summary.body.price == receipt.body.price and summary.body.request == receipt.body.request
    assert compact.json()["usage"]["cost"] == receipt.body.price.charged / 1e6
