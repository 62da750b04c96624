"""Routing preferences named as users copy them: provider URLs as printed (with `/v1`), and a 404 that says
which preference left no provider."""

from __future__ import annotations

import httpx
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
