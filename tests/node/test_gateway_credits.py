"""Credits on a gateway that charges them: escrow, settlement on receipts, 402, conservation, statements, audit."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import httpx
import openai
import pytest
from typer.testing import CliRunner
from ..conftest import FAST_GOSSIP, start_gateway, start_provider, wait_for
from ..core.test_records import receipt_body

from agoranet.cli.main import app as cli
from agoranet.core.identity import Identity
from agoranet.core.records import PriceCharged, sign_record
from agoranet.engine.stub import StubEngine
from agoranet.log.credits import ISSUANCE, provider, user
from agoranet.net.gossip import GossipConfig
from agoranet.node.credits_role import Escrow, PriceBound, max_price, prompt_token_bound
from agoranet.node.node import ProviderOptions
from agoranet.wire.openai import ChatCompletionRequest

# 1 micro-credit per prompt token, 3 per completion token: charges are easy to read
PRICES = {"input_per_mtok": 1_000_000, "output_per_mtok": 3_000_000}
MSG = [{"role": "user", "content": "add two numbers"}]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("credits")
    gw, gateway = start_gateway(root / "gw", charge_credits=True)
    prov, prov_role = start_provider(root / "p", ProviderOptions(pricing=PRICES),
                                     engine=StubEngine(model_name="agora-tiny"), peers=[gw.url],
                                     gossip=GossipConfig(interval_s=FAST_GOSSIP))
    slow, slow_role = start_provider(root / "slow", ProviderOptions(pricing=PRICES),
                                     engine=StubEngine(model_name="slow", token_delay_s=0.05), peers=[gw.url],
                                     gossip=GossipConfig(interval_s=FAST_GOSSIP))
    peer = str(prov_role.identity.peer_id)
    wait_for(lambda: {peer, str(slow_role.identity.peer_id)} <= set(gateway.discovery.members()),
             what="the providers")
    try:
        yield gw.url, gateway, peer, root / "gw", slow_role
    finally:
        slow.stop()
        prov.stop()
        gw.stop()


def funded(gateway, name: str, amount: int) -> tuple[str, str]:
    key, secret = gateway.keys.create(name)
    if amount:
        gateway.credits.ledger.mint(amount)
        gateway.credits.ledger.fund(user(key.id), amount)
    return key.id, secret


def balance(gateway, key_id: str) -> int:
    return gateway.credits.ledger.balance(user(key_id))


def chat(url: str, secret: str, **kw):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
    return client.chat.completions.create(messages=MSG, **{"model": "agora-tiny", "max_tokens": 8} | kw)


def no_escrow_open(gateway) -> bool:
    return not any(name.startswith("escrow:") for name in gateway.credits.ledger.balances())


def test_a_funded_key_pays_exactly_what_the_receipts_charge(net):
    url, gateway, peer, _, _ = net
    key_id, secret = funded(gateway, "ann", 10_000)
    earned_before = gateway.credits.ledger.balance(provider(peer))
    r = chat(url, secret)
    charged = r.model_extra["agora"]["summary"]["body"]["price"]["charged"]
    assert charged == 16 + 3 * 8  # stub prompt: 1 + 15 bytes; 8 tokens out
    assert balance(gateway, key_id) == 10_000 - charged
    assert r.model_extra["agora"]["credits"] | {"held": 0} == {"held": 0, "charged": charged, "verifier_fee": 0,
                                                                "balance": 10_000 - charged}
    last = None
    for chunk in chat(url, secret, stream=True):
        last = (chunk.model_extra or {}).get("agora", last)
    assert balance(gateway, key_id) == 10_000 - 2 * charged
    assert last["credits"]["charged"] == charged
    assert gateway.credits.ledger.balance(provider(peer)) == earned_before + 2 * charged
    shown = httpx.get(f"{url}/agora/v1/credits/balance", headers={"authorization": f"Bearer {secret}"}).json()
    assert shown == {"key": key_id, "account": user(key_id), "balance": 10_000 - 2 * charged}
    assert no_escrow_open(gateway)


def test_a_request_that_fails_refunds_its_whole_hold(net):
    url, gateway, _, _, _ = net
    key_id, secret = funded(gateway, "bo", 10_000)
    size = gateway.credits.ledger.log.size
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # the provider allows at most 512
        chat(url, secret, max_tokens=600)
    with pytest.raises(openai.BadRequestError):
        chat(url, secret, max_tokens=600, stream=True)
    assert balance(gateway, key_id) == 10_000 and no_escrow_open(gateway)
    moves = [m for m in gateway.credits.ledger.log.entries(size, size + 10)]
    assert len(moves) == 4  # hold and full refund, twice


def test_a_stream_the_client_abandons_pays_only_what_was_delivered_and_stops_its_provider(net):
    url, gateway, _, _, slow = net
    key_id, secret = funded(gateway, "fay", 10_000)
    earned = gateway.credits.ledger.balance(provider(str(slow.identity.peer_id)))
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {secret}"}, timeout=30,
                      json={"model": "slow", "messages": MSG, "max_tokens": 100, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():  # up to the first token's text (the opening chunk's content is "")
            if '"content":"' in line and '"content":""' not in line:
                break
        assert balance(gateway, key_id) < 10_000  # held while it streams
        assert slow.active == 1
    # The gateway has the provider sign a partial receipt for the tokens it relayed, then closes its
    # stream, which stops the generation at once (100 tokens would take 5 s); the rest of the hold
    # comes back.
    wait_for(lambda: slow.active == 0, timeout=5, what="the provider to stop generating")
    wait_for(lambda: no_escrow_open(gateway), timeout=10, what="the abandoned stream's settlement")
    paid = gateway.credits.ledger.balance(provider(str(slow.identity.peer_id))) - earned
    assert 0 < paid < 3 * 100 and balance(gateway, key_id) == 10_000 - paid


def test_an_unfunded_key_gets_402_and_nothing_changes(net):
    url, gateway, _, _, _ = net
    _, broke = funded(gateway, "cy", 0)
    # the hold bounds the prompt at 3 tokens a byte + overheads: 108 for MSG, + 3 per token out
    key_id, poor = funded(gateway, "di", 120)
    before, size = gateway.credits.ledger.balances(), gateway.credits.ledger.log.size
    for secret in (broke, poor):
        for stream in (False, True):
            response = httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {secret}"},
                                  json={"model": "agora-tiny", "messages": MSG, "max_tokens": 8, "stream": stream})
            assert response.status_code == 402
            assert response.json()["error"]["code"] == "insufficient_quota"
            assert "agora keys fund" in response.json()["error"]["message"]
    assert gateway.credits.ledger.balances() == before and gateway.credits.ledger.log.size == size
    assert chat(url, poor, max_tokens=2).choices[0].message.content  # a small enough request still fits
    assert balance(gateway, key_id) == 120 - (16 + 3 * 2)


def test_concurrent_requests_conserve_every_credit(net):
    url, gateway, peer, _, _ = net
    keys = [funded(gateway, f"crowd{i}", 5_000) for i in range(3)]
    ledger = gateway.credits.ledger
    users_before = sum(balance(gateway, k) for k, _ in keys)
    earned_before = ledger.balance(provider(peer))

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(i: int) -> int:
                _, secret = keys[i % len(keys)]
                body = {"model": "agora-tiny", "messages": MSG, "max_tokens": 4 + i % 5}
                r = await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"})
                assert r.status_code == 200, r.text
                return r.json()["agora"]["summary"]["body"]["price"]["charged"]
            return await asyncio.gather(*(one(i) for i in range(24)))

    charges = asyncio.run(run())
    assert sum(ledger.balances().values()) == 0  # issuance is minus everything minted
    assert ledger.balances()[ISSUANCE] < 0 and no_escrow_open(gateway)
    assert users_before - sum(balance(gateway, k) for k, _ in keys) == sum(charges)
    assert ledger.balance(provider(peer)) - earned_before == sum(charges)
    assert ledger.replay() == ledger.balances()
    assert gateway.credits.status()["credits"]["held"] == 0 and gateway.credits.status()["credits"]["open_requests"] == 0


def test_the_provider_proves_its_earnings_and_the_gateway_log_audits(net):
    url, gateway, peer, home, _ = net
    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "create", "eve", "--credits", "500", "--home", str(home)])
    assert created.exit_code == 0, created.output
    secret = created.output.split("shown only now:")[1].split()[0]
    key_id = secret.split("_")[1]
    assert runner.invoke(cli, ["keys", "fund", key_id, "250", "--home", str(home)]).exit_code == 0
    assert balance(gateway, key_id) == 750  # the CLI wrote to the running gateway's ledger
    chat(url, secret)
    earned = gateway.credits.ledger.balance(provider(peer))
    assert earned > 0
    shown = runner.invoke(cli, ["credits", "statement", url, peer])
    assert shown.exit_code == 0, shown.output
    assert f"earned {earned} micro-credits" in shown.output
    audited = runner.invoke(cli, ["log", "audit", url])
    assert audited.exit_code == 0, audited.output
    assert "credit accounts balanced" in audited.output
    nobody = runner.invoke(cli, ["credits", "statement", url, "12D3KooWNobody"])
    assert nobody.exit_code == 0 and "earned 0 micro-credits in 0 payments" in nobody.output


def test_max_price_bounds_the_stub_prompt_and_caps_payments(net):
    _, gateway, _, _, _ = net
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG + [{"role": "system", "content": "é\n"}]})
    assert prompt_token_bound(req) >= 1 + len("add two numbers") + len("é\n".encode())
    bounds = [PriceBound(1_000_000, 3_000_000, 4096), PriceBound(2_000_000, 1_000_000, 4096)]
    assert max_price(10, 8, bounds) == 10 * 2 + 8 * 3
    assert max_price(10, 8, bounds, fee_ppm=100_000) == 44 + 5
    assert max_price(10**9, 8, [PriceBound(1_000_000, 0, 2048)]) == 2048  # no prompt is longer than the context
    signer = Identity.generate()
    peer = str(signer.peer_id)

    def receipt(charged: int):
        return sign_record(signer, receipt_body(price=PriceCharged(input_per_mtok=1, output_per_mtok=1, charged=charged)))

    payments, fee = gateway.credits.payments(Escrow("x", user("z"), 50), [receipt(70)], None)
    assert payments == [(provider(peer), 50)] and fee == 0  # never more than was held
    gateway.credits.verifier_fee_ppm = 100_000
    try:
        payments, fee = gateway.credits.payments(Escrow("x", user("z"), 50), [receipt(30)], "12D3KooWVerifier")
    finally:
        gateway.credits.verifier_fee_ppm = 0
    assert payments == [(provider(peer), 30), ("verifier:12D3KooWVerifier", 3)] and fee == 3


def test_a_receipt_charging_more_than_its_offer_is_not_paid(net, tmp_path):
    url, gateway, _, _, _ = net
    server, greedy = start_provider(tmp_path / "greedy", ProviderOptions(pricing=PRICES),
                                    engine=StubEngine(model_name="greedy"), peers=[url],
                                    gossip=GossipConfig(interval_s=FAST_GOSSIP))
    peer = str(greedy.identity.peer_id)
    try:
        wait_for(lambda: peer in gateway.discovery.members(), what="the greedy provider")
        greedy.offer()  # signed at PRICES, and announced unchanged for half its lifetime...
        greedy.config = replace(greedy.config, output_per_mtok=10 * PRICES["output_per_mtok"])  # ...but charging 10x
        key_id, secret = funded(gateway, "gus", 10_000)
        with pytest.raises(openai.APIStatusError) as err:
            chat(url, secret, model="greedy")
        assert err.value.status_code == 502 and "providers_failed" in str(err.value.body)
        with pytest.raises(openai.APIError, match="more than its offer allows"):  # the text came, then the
            list(chat(url, secret, model="greedy", stream=True))  # refusal: it is no paid, verifiable answer
        wait_for(lambda: no_escrow_open(gateway), what="the holds to be released")
        assert balance(gateway, key_id) == 10_000  # nothing was paid for either
        assert gateway.credits.ledger.balance(provider(peer)) == 0
    finally:
        server.stop()
