"""Ledger and crash safety: bounded integer amounts, holds a crash left open are refunded at restart,
and malformed continuation prefixes are a 400."""

from __future__ import annotations

import httpx
from typer.testing import CliRunner

from agoranet.cli.gateway_cmd import keys_app
from agoranet.core.identity import Identity
from agoranet.log.credits import CreditLedger, user
from agoranet.log.transparency import TransparencyLog
from agoranet.node.gateway import GatewayConfig
from agoranet.node.keys import KEYS_FILE, KeyStore
from agoranet.node.node import build_node
from agoranet.node.server import BackgroundServer, bind, url_of


def test_a_funding_amount_near_2_63_is_refused_clearly_and_the_ledger_stays_integer(tmp_path):
    runner = CliRunner()
    Identity.generate().save(tmp_path / "identity.key")
    key, _ = KeyStore(tmp_path / KEYS_FILE).create("alice")
    assert runner.invoke(keys_app, ["fund", key.id, "1000", "--home", str(tmp_path)]).exit_code == 0
    for amount in (2**62, 2**63 - 1, 2**63 + 5):
        out = runner.invoke(keys_app, ["fund", key.id, str(amount), "--home", str(tmp_path)])
        assert out.exit_code == 1 and "error:" in out.output and "Traceback" not in out.output, out.output
    log = TransparencyLog(tmp_path / "log.db", Identity.load(tmp_path / "identity.key"))
    ledger = CreditLedger(log)
    balances = ledger.balances()
    assert all(type(v) is int for v in balances.values()) and balances[user(key.id)] == 1000, balances
    assert ledger.replay() == {k: v for k, v in balances.items() if not k.startswith("escrow:")}
    log.close()


def test_holds_left_open_by_a_killed_gateway_are_refunded_when_it_restarts(tmp_path):
    Identity.generate().save(tmp_path / "identity.key")
    keys = KeyStore(tmp_path / KEYS_FILE)
    key, secret = keys.create("alice")
    log = TransparencyLog(tmp_path / "log.db", Identity.load(tmp_path / "identity.key"))
    ledger = CreditLedger(log)
    ledger.mint(500)
    ledger.fund(user(key.id), 500)
    ledger.hold("req-cut-mid-stream.1", user(key.id), 300)  # the gateway is killed before it settles
    log.close()

    sock = bind()
    node = build_node(tmp_path, url_of(sock), ["gateway"], gateway=GatewayConfig(charge_credits=True))
    with BackgroundServer(node.app, sock) as server:
        r = httpx.get(f"{server.url}/agora/v1/credits/balance", headers={"authorization": f"Bearer {secret}"})
        assert r.json()["balance"] == 500, r.text
        assert node.gateway.credits.ledger.open_escrows() == []


def test_malformed_prefix_tokens_get_a_400_not_a_500(provider):
    url, _ = provider
    for tokens, param in (([-1], "agora.prefix_tokens.0"), ([1 << 20], "agora.prefix_tokens")):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "agora-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "agora": {"prefix_tokens": tokens}})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "agora-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "agora": {"prefix_tokens": [65] * 2000}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
