"""A gateway in front of two real provider processes it found by gossip, driven by the official SDK."""

from __future__ import annotations

import asyncio
import secrets

import httpx
import openai
import pytest
from ..conftest import fetch_receipt, FULL, provider_process, start_gateway, start_provider, wait_for

from agoranet.core.identity import Identity
from agoranet.core.records import OfferBody, ReceiptBody, sign_record, verify_record
from agoranet.engine.stub import StubEngine
from agoranet.node.gateway import Candidate, GatewayConfig, Router
from agoranet.wire.openai import ProviderPreferences

MSG = [{"role": "user", "content": "write a function that reverses a list"}]
CHEAP, DEAR = 100_000, 400_000


# Every test here shares one network of two `agora provide` processes (~16 s to start on a loaded 2-core box).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """Gateway (in-process) + provider A (cheap) + provider B (dear), both `agora provide --peer gateway`."""
    root = tmp_path_factory.mktemp("gwnet")
    gw_server, gateway = start_gateway(root / "gw")
    procs = [provider_process(root / name, gw_server.url, price_out=price)
             for name, price in (("a", CHEAP), ("b", DEAR))]
    try:
        for p in procs:
            p.wait_ready()
        ids = [httpx.get(f"{p.url}/agora/v1/offer").json()["record"]["signer"] for p in procs]
        wait_for(lambda: set(ids) <= set(gateway.discovery.members()), what="both providers to be discovered")
        yield gw_server.url, gateway, dict(zip("ab", procs)), dict(zip("ab", ids))
    finally:
        for p in procs:
            p.stop()
        gw_server.stop()


def sdk(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **kw)


def ask(url: str, provider: dict | None = None, agora: dict | None = None, **kw):
    extra = ({"provider": provider} if provider else {}) | ({"agora": agora} if agora else {})
    return sdk(url).chat.completions.create(model="agora-tiny", messages=MSG, max_tokens=12, temperature=0.7,
                                            extra_body=extra, **kw)


def test_sdk_through_gateway_is_served_by_discovered_providers(net):
    url, _, _, ids = net
    assert [m.id for m in sdk(url).models.list().data] == ["agora-tiny"]
    r = ask(url, seed=3)
    agora = r.model_extra["agora"]
    receipt = fetch_receipt(agora)  # compact by default: fetched by CID, checked against the signed summary
    assert receipt.signer == agora["provider"] in ids.values()
    assert receipt.body.output_text == r.choices[0].message.content and len(agora["receipts"]) == 1
    chunks = list(ask(url, seed=3, stream=True, stream_options={"include_usage": True}, agora=FULL["agora"]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content  # gateway fixed seed + same sampling, any provider
    assert chunks[-1].usage.completion_tokens == 12
    assert all("logprobs" not in c.choices[0].model_dump(exclude_none=True) for c in chunks if c.choices)
    last = chunks[-1].model_extra["agora"]
    assert verify_record(last["receipts"][0]["receipt"], ReceiptBody).body.output_text == text


def test_sort_by_price_picks_the_cheaper_provider(net):
    url, _, _, ids = net
    for name in ("a", "b"):  # both off probation (3 requests served here): else b, unproven, leads 10% of requests
        for _ in range(3):
            ask(url, {"only": [ids[name]]})
    for _ in range(5):
        assert ask(url, {"sort": "price"}).model_extra["agora"]["provider"] == ids["a"]


def test_default_routing_prefers_cheap_but_spreads_load(net):
    _, gateway, _, ids = net
    cands = asyncio.run(gateway.discovery.find_offers("agora-tiny"))
    router = Router(GatewayConfig())
    firsts = [router.plan([Candidate(o, o.body.models[0]) for o in cands], ProviderPreferences())[0].peer
              for _ in range(400)]
    share = firsts.count(ids["a"]) / len(firsts)
    assert 0.75 < share < 0.99  # price ratio 1:4 (in+out 2:5) → about 86% to the cheaper one


def test_only_and_ignore_are_honoured(net):
    url, _, procs, ids = net
    assert ask(url, {"only": [ids["b"]]}).model_extra["agora"]["provider"] == ids["b"]
    assert ask(url, {"only": [procs["b"].url]}).model_extra["agora"]["provider"] == ids["b"]
    for _ in range(3):
        assert ask(url, {"ignore": [ids["a"]]}).model_extra["agora"]["provider"] == ids["b"]
    assert ask(url, {"order": [ids["b"], ids["a"]]}).model_extra["agora"]["provider"] == ids["b"]
    assert ask(url, {"max_price": {"completion": CHEAP}}).model_extra["agora"]["provider"] == ids["a"]
    with pytest.raises(openai.NotFoundError, match="none is left to route to"):
        ask(url, {"only": ["12D3KooWnobody"], "require_verified": True})


def test_forged_or_expired_offer_never_gets_traffic(net, tmp_path):
    url, gateway, _, ids = net
    canary, canary_provider = start_provider(tmp_path / "canary", engine=StubEngine(model_name="agora-tiny"))
    try:
        honest = httpx.get(f"{canary.url}/agora/v1/offer").json()["record"]
        # Forged: the canary's real offer with its price cut to zero, signature left as it was.
        forged = {**honest, "body": {**honest["body"], "models": [
            {**honest["body"]["models"][0], "input_per_mtok": 0, "output_per_mtok": 0}]}}
        # Expired and from-the-future: validly signed by a stranger, pointing at the canary.
        stranger = Identity.generate()
        body = verify_record(honest, OfferBody).body
        now = body.issued_ms
        expired = sign_record(stranger, body.model_copy(update={"issued_ms": now - 10_000, "expires_ms": now - 1,
                                                                "nonce": secrets.token_hex(4)}))
        future = sign_record(stranger, body.model_copy(update={"issued_ms": now + 3_600_000,
                                                               "expires_ms": now + 7_200_000}))
        before = dict(gateway.discovery.rejected)
        r = httpx.post(f"{url}/agora/v1/gossip", json={"records": [forged, expired.to_json(), future.to_json()]})
        assert r.status_code == 200
        rejected = gateway.discovery.rejected
        assert rejected["bad_signature"] == before.get("bad_signature", 0) + 1
        assert rejected["expired"] == before.get("expired", 0) + 1
        assert rejected["from_future"] == before.get("from_future", 0) + 1
        for _ in range(4):
            assert ask(url, {"sort": "price"}).model_extra["agora"]["provider"] in ids.values()
        assert canary_provider.served == 0
    finally:
        canary.stop()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_bad_requests_get_openai_errors_on_the_hot_path(net, path):
    url = net[0]
    r = httpx.post(url + path, content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url + path, json={"model": "agora-tiny", "max_tokens": "many"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "invalid_value" and err["param"] == "max_tokens"
    r = httpx.post(url + path, content=b"x" * (2 << 20))  # over the node's 1 MiB body limit
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url + path, json={"model": "no-such-model", "messages": MSG, "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
