"""Receipts bound to the exchange: a provider answering with an old honest receipt of its own (made for
another request, or for this very request earlier) never has it relayed as a paid answer."""

from __future__ import annotations

import httpx
import openai
import pytest

from agoranet.core.identity import Identity
from agoranet.engine.stub import StubEngine
from agoranet.log.credits import provider, user
from agoranet.net.gossip import GossipConfig
from agoranet.node.cheat import MADE_UP, hostile_provider_app, sybil_records
from agoranet.node.node import ProviderOptions
from agoranet.node.server import BackgroundServer
from agoranet.node.reputation import Reputation
from agoranet.verify.records import VerdictBody

from . import chat
from ..conftest import FAST_GOSSIP, start_gateway, start_provider, wait_for

PRICES = {"input_per_mtok": 1_000_000, "output_per_mtok": 3_000_000}
# Honest heartbeats that live 9 s: on a loaded machine 3 s ones lapse now and then, and honest providers
# dropping out of discovery is not what these tests are about.
LASTING = GossipConfig(interval_s=FAST_GOSSIP, missed_heartbeats=30)


def ask(url: str, secret: str, order: list[str], *, stream: bool, content: str = "add two numbers"):
    """A chat request through the gateway, routed to `order` first; the answer text and `agora` field."""
    return chat(url, secret, stream=stream, content=content, timeout=600, seed=7,
                extra_body={"provider": {"order": order}, "agora": {"receipt": "full"}})  # what a turncoat replays


def offered_urls(gw_url: str) -> set[str]:
    return {p["url"] for p in httpx.get(f"{gw_url}/agora/v1/providers").json()["providers"]}


@pytest.mark.slow
def test_an_old_receipt_is_never_relayed_or_paid_as_the_answer(tmp_path):
    gw, gateway = start_gateway(tmp_path / "gw", charge_credits=True)
    servers = [gw]
    try:
        honest, honest_role = start_provider(tmp_path / "honest", ProviderOptions(pricing=PRICES), peers=[gw.url],
                                             engine=StubEngine(model_name="agora-tiny"), gossip=LASTING)
        servers.append(honest)
        # Two keys that serve honestly first, then turn: one replays old receipts with made-up text, the
        # other its old answer verbatim (the same request asked again: right text, right receipt, no work).
        turncoats = {}
        for name in ("replay", "cache"):
            server, role = start_provider(tmp_path / name, ProviderOptions(pricing=PRICES), peers=[gw.url],
                                          engine=StubEngine(model_name="agora-tiny"), gossip=LASTING)
            turncoats[name] = (server, role)
        peers = {str(r.identity.peer_id) for r in [honest_role] + [r for _, r in turncoats.values()]}
        wait_for(lambda: peers <= set(gateway.discovery.members()), what="the providers")
        key, secret = gateway.keys.create("ann")
        gateway.credits.ledger.mint(100_000)
        gateway.credits.ledger.fund(user(key.id), 100_000)

        old = {}
        for name, (server, role) in turncoats.items():
            text, agora = ask(gw.url, secret, [server.url], stream=False)
            assert agora["provider"] == str(role.identity.peer_id) and text == agora["receipt"]["body"]["output_text"]
            old[name] = (role, agora)
            model = role.offer().body.models[0]
            server.stop()  # the honest node goes; a hostile one takes its key, on another port
            hostile = BackgroundServer(hostile_provider_app(name, receipt=agora)).start()
            servers.append(hostile)
            identity = Identity.load(tmp_path / name / "identity.key")
            assert httpx.post(f"{gw.url}/agora/v1/gossip",
                              json={"records": sybil_records(identity, hostile.url, model)}).status_code == 200
            wait_for(lambda: hostile.url in offered_urls(gw.url), what=f"the {name} turncoat's offer")
        earned = {name: gateway.credits.ledger.balance(provider(str(role.identity.peer_id)))
                  for name, (role, _) in old.items()}

        for name, (role, agora) in old.items():
            peer = str(role.identity.peer_id)
            for stream in (False, True):
                # `cache` is asked the very request it answered before; `replay` a new one.
                content = "add two numbers" if name == "cache" else f"a new question, streamed={stream}"
                try:
                    text, got = ask(gw.url, secret, [peer], stream=stream, content=content)
                except openai.APIError as exc:  # a stream whose receipt does not match ends in an error
                    assert stream and "receipt" in str(exc)
                    continue
                # Failed over to the honest provider: its own receipt, and never the made-up text.
                assert got["provider"] == str(honest_role.identity.peer_id), name
                assert MADE_UP not in text and got["receipt_cid"] != agora["receipt_cid"]
            assert gateway.routing.of(peer).failures >= 1, name
            assert gateway.credits.ledger.balance(provider(peer)) == earned[name], f"{name} was paid again"
    finally:
        for server in reversed(servers):
            server.stop()


def test_reputation_counts_each_receipt_once():
    reputation = Reputation()
    verdict = VerdictBody(receipt="bafyreceipt", provider="12D3KooWprovider", model="m", precision="fp32", ok=True,
                          checked_positions=8, verified_ms=1)
    for _ in range(5):  # the same receipt submitted again and again, as a replaying provider would
        reputation.add_verdict(verdict)
    assert reputation.providers["12D3KooWprovider"].verified == 1

