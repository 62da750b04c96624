"""Pay for what was delivered: a stream its client cuts is billed (and counted against the key's quota)
for the tokens relayed, by a partial receipt the provider signs; concurrent requests cannot overrun a
token quota, because admission reserves the most each request can use."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from agoranet.core.records import ReceiptBody, token_charge, verify_record
from agoranet.engine.stub import StubEngine
from agoranet.log.credits import provider, user
from agoranet.net.gossip import GossipConfig
from agoranet.node.node import ProviderOptions

from ..conftest import FAST_GOSSIP, start_gateway, start_provider, wait_for

PRICES = {"input_per_mtok": 1_000_000, "output_per_mtok": 3_000_000}
# Honest heartbeats that live 9 s: on a loaded machine 3 s ones lapse now and then, and honest providers
# dropping out of discovery is not what these tests are about.
LASTING = GossipConfig(interval_s=FAST_GOSSIP, missed_heartbeats=30)
MSG = [{"role": "user", "content": "add two numbers"}]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("billing")
    gw, gateway = start_gateway(root / "gw", charge_credits=True)
    prov, role = start_provider(root / "p", ProviderOptions(pricing=PRICES), peers=[gw.url],
                                engine=StubEngine(model_name="agora-tiny", token_delay_s=0.05),
                                gossip=LASTING)
    wait_for(lambda: str(role.identity.peer_id) in gateway.discovery.members(), what="the provider")
    try:
        yield gw.url, gateway, role, prov.url
    finally:
        prov.stop()
        gw.stop()


def funded(gateway, name: str, amount: int, quota: int = 0) -> tuple[str, str]:
    key, secret = gateway.keys.create(name, quota_tokens=quota)
    gateway.credits.ledger.mint(amount)
    gateway.credits.ledger.fund(user(key.id), amount)
    return key.id, secret


def settled(gateway) -> bool:
    return not any(name.startswith("escrow:") for name in gateway.credits.ledger.balances())


@pytest.mark.slow
def test_a_stream_cut_by_its_client_is_billed_for_the_tokens_delivered(net):
    url, gateway, role, prov_url = net
    peer = str(role.identity.peer_id)
    key_id, secret = funded(gateway, "cutter", 10_000)
    earned = gateway.credits.ledger.balance(provider(peer))
    delivered = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                      timeout=30, json={"model": "agora-tiny", "messages": MSG, "max_tokens": 60,
                                        "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():  # read a dozen tokens of sixty, then leave
            delivered += '"content":"' in line and '"content":""' not in line
            if delivered >= 12:
                break
    wait_for(lambda: settled(gateway) and role.active == 0, timeout=20, what="the cut stream to settle")
    receipts = httpx.get(f"{prov_url}/agora/v1/receipts", params={"limit": 100}).json()["receipts"]
    partial = verify_record(receipts[-1]["record"], ReceiptBody).body
    assert partial.finish_reason == "cancelled"
    assert 12 <= len(partial.output_tokens) < 60  # what was relayed, not what the provider went on to make
    charge = token_charge(partial.prompt_tokens, len(partial.output_tokens), **PRICES)
    assert partial.price.charged == charge > 0
    assert gateway.credits.ledger.balance(user(key_id)) == 10_000 - charge
    assert gateway.credits.ledger.balance(provider(peer)) == earned + charge
    assert gateway.keys.get(key_id).used_tokens == partial.prompt_tokens + len(partial.output_tokens)


@pytest.mark.slow
def test_concurrent_requests_cannot_overrun_a_token_quota(net):
    url, gateway, _, _ = net
    quota = 200  # one request reserves its prompt bound (3 tokens a byte + overheads: 108) + max_tokens
    key_id, secret = funded(gateway, "crowd", 100_000, quota=quota)

    async def one(client: httpx.AsyncClient) -> int:
        r = await client.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                              json={"model": "agora-tiny", "messages": MSG, "max_tokens": 40})
        return r.status_code

    async def crowd() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client) for _ in range(8)))

    codes = asyncio.run(crowd())
    used = gateway.keys.get(key_id).used_tokens
    assert codes.count(200) >= 1 and 429 in codes, codes
    assert used <= quota, f"{codes.count(200)} requests used {used} tokens of a quota of {quota}"
