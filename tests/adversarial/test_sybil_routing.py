"""Sybil-resistant routing: free offers at dead URLs, an absurdly priced offer, and a provider that streams
an invalid token and dies cannot make honest requests fail, cost 402, or get the honest provider blamed."""

from __future__ import annotations

import httpx
import pytest

from agoranet.core.identity import Identity
from agoranet.engine.stub import StubEngine
from agoranet.log.credits import user
from agoranet.net.gossip import GossipConfig
from agoranet.node.cheat import hostile_provider_app, sybil_records
from agoranet.node.node import ProviderOptions
from agoranet.node.server import BackgroundServer

from . import chat as sdk_chat
from ..conftest import FAST_GOSSIP, free_port, start_gateway, start_provider, wait_for

PRICES = {"input_per_mtok": 1_000_000, "output_per_mtok": 3_000_000}
# Honest heartbeats that live 9 s: on a loaded machine 3 s ones lapse now and then, and honest providers
# dropping out of discovery is not what these tests are about.
LASTING = GossipConfig(interval_s=FAST_GOSSIP, missed_heartbeats=30)


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """A charging gateway and two honest stub providers that have each served enough to be off probation."""
    root = tmp_path_factory.mktemp("sybils")
    gw, gateway = start_gateway(root / "gw", charge_credits=True)
    servers, roles = [], []
    for name in ("a", "b"):
        server, role = start_provider(root / name, ProviderOptions(pricing=PRICES), peers=[gw.url],
                                      engine=StubEngine(model_name="agora-tiny"),
                                      gossip=LASTING)
        servers.append(server)
        roles.append(role)
    honest = [str(r.identity.peer_id) for r in roles]
    wait_for(lambda: set(honest) <= set(gateway.discovery.members()), what="the honest providers")
    key, secret = gateway.keys.create("user")
    gateway.credits.ledger.mint(10_000_000)
    gateway.credits.ledger.fund(user(key.id), 10_000_000)
    for peer in honest:
        for _ in range(3):  # GatewayConfig.probation_serves
            chat(gw.url, secret, provider={"order": [peer]})
    try:
        yield gw.url, gateway, secret, honest
    finally:
        for server in servers:
            server.stop()
        gw.stop()


def chat(url: str, secret: str, *, stream: bool = False, **extra):
    return sdk_chat(url, secret, stream=stream, extra_body=extra)


def gossip_sybil(gw_url: str, url: str, model, *, ttl_s: float = 60.0, **price) -> str:
    identity = Identity.generate()
    records = sybil_records(identity, url, model.model_copy(update=price), ttl_s=ttl_s)
    assert httpx.post(f"{gw_url}/agora/v1/gossip", json={"records": records}).status_code == 200
    return str(identity.peer_id)


def honest_model(gateway, honest: list[str]):
    return next(o for o in gateway.discovery.table.records() if o.signer == honest[0] and o.type == "agora/offer/1"
                ).body.models[0]


def known(gateway, peers: list[str]) -> bool:
    return set(peers) <= set(gateway.discovery.members())


@pytest.mark.slow
def test_a_sybil_streaming_an_invalid_token_is_blamed_not_the_honest_provider(net):
    url, gateway, secret, honest = net
    model = honest_model(gateway, honest)
    liar = BackgroundServer(hostile_provider_app("bad_token")).start()
    try:
        sybil = gossip_sybil(url, liar.url, model, ttl_s=10)  # gone before the next test
        wait_for(lambda: known(gateway, [sybil]), what="the lying sybil")
        expected, _ = chat(url, secret, provider={"order": [honest[0]]})
        before = gateway.routing.of(honest[0]).failures
        text, agora = chat(url, secret, stream=True, provider={"order": [sybil, honest[0]]})
        assert text == expected and agora["provider"] == honest[0]  # the bad token never reached the client
        assert gateway.routing.of(sybil).failures == 1
        assert gateway.routing.of(honest[0]).failures == before == 0
    finally:
        liar.stop()
    wait_for(lambda: not known(gateway, [sybil]), timeout=30, what="the lying sybil to lapse")


@pytest.mark.slow
def test_an_absurdly_priced_sybil_does_not_make_requests_unaffordable(net):
    url, gateway, secret, honest = net
    model = honest_model(gateway, honest)
    greedy = gossip_sybil(url, f"http://127.0.0.1:{free_port()}", model, ttl_s=10,
                          input_per_mtok=10**15, output_per_mtok=10**15)
    wait_for(lambda: known(gateway, [greedy]), what="the greedy sybil")
    for stream in (False, True, False, True):
        assert chat(url, secret, stream=stream)[1]["provider"] in honest
    # Even named first by the user, it is dropped from the plan rather than priced into the hold.
    assert chat(url, secret, provider={"order": [greedy] + honest})[1]["provider"] in honest
    wait_for(lambda: not known(gateway, [greedy]), timeout=30, what="the greedy sybil to lapse")


@pytest.mark.slow
def test_free_sybils_at_dead_urls_do_not_fail_honest_requests(net):
    url, gateway, secret, honest = net
    model = honest_model(gateway, honest)
    sybils = [gossip_sybil(url, f"http://127.0.0.1:{free_port()}", model, input_per_mtok=0, output_per_mtok=0)
              for _ in range(30)]
    wait_for(lambda: known(gateway, sybils), what="the sybils")
    served = [chat(url, secret)[1]["provider"] for _ in range(30)]
    assert set(served) <= set(honest) and len(served) == 30
    tried = sum(gateway.routing.of(s).failures for s in sybils)
    assert tried <= 10, f"sybils on probation led {tried} of 30 requests"
