"""A gateway's dashboard and /metrics as an operator reads them: the network it routes over, per-provider
traffic, tokens, latency and credits, checked against what the clients were actually served."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from agoranet.core.identity import Identity
from agoranet.engine.stub import StubEngine
from agoranet.log.credits import user
from agoranet.net.gossip import GossipConfig
from agoranet.node.gateway import Gateway, GatewayConfig
from agoranet.node.node import ProviderOptions, build_gateway_node, build_provider_node
from agoranet.node.server import BackgroundServer, bind, url_of
from agoranet.web import mount_dashboard

from ..conftest import FAST_GOSSIP, wait_for
from .conftest import ARTIFACTS
from .test_status import sample

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "agora.json"
MSG = [{"role": "user", "content": "add two numbers"}]
PRICES = [{"input_per_mtok": 1_000_000, "output_per_mtok": 3_000_000},  # 1 µcr a prompt token, 3 an output one
          {"input_per_mtok": 2_000_000, "output_per_mtok": 5_000_000}]


@dataclass
class Console:
    url: str
    gateway: Gateway
    peers: list[str]  # the two providers' peer ids, cheaper first
    key_id: str
    secret: str
    served: list[dict[str, Any]]  # every answer's signed receipt summary, as the clients got them
    streams: int


@pytest.fixture(scope="module")
def console(tmp_path_factory) -> Iterator[Console]:
    """A charging gateway with its dashboard, two stub providers at different prices, a funded key, and
    traffic: 6 plain and 4 streamed chats, each routed by price or pinned to one provider."""
    root = tmp_path_factory.mktemp("console")
    home = root / "gw"
    home.mkdir()
    Identity.generate().save(home / "identity.key")
    sock = bind()
    url = url_of(sock)
    app, gateway = build_gateway_node(home, url, [], config=GatewayConfig(charge_credits=True),
                                      gossip=GossipConfig(interval_s=FAST_GOSSIP))
    mount_dashboard(app, url=url)
    gw = BackgroundServer(app, sock).start()
    providers = [_provider(root / f"p{i}", PRICES[i], url) for i in range(2)]
    peers = [str(p.identity.peer_id) for _, p in providers]
    try:
        wait_for(lambda: set(peers) <= set(gateway.discovery.members()), what="both providers")
        key, secret = gateway.keys.create("ann")
        gateway.credits.ledger.mint(1_000_000)
        gateway.credits.ledger.fund(user(key.id), 1_000_000)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
        served = []
        for i in range(10):
            pin = {"order": [peers[i % 2]], "allow_fallbacks": False}
            args = dict(model="agora-tiny", messages=MSG, max_tokens=4 + i, extra_body={"provider": pin})
            if i < 6:
                served.append(client.chat.completions.create(**args).model_extra["agora"]["summary"]["body"])
            else:
                chunks = list(client.chat.completions.create(stream=True, **args))
                served.append(chunks[-1].model_extra["agora"]["summary"]["body"])
        with pytest.raises(openai.NotFoundError):  # counted as an outcome too
            client.chat.completions.create(model="no-such-model", messages=MSG)
        yield Console(url, gateway, peers, key.id, secret, served, streams=4)
    finally:
        for server, _ in providers:
            server.stop()
        gw.stop()


def _provider(home: Path, prices: dict[str, int], gateway: str) -> tuple[BackgroundServer, Any]:
    """A stub provider gossiping to the gateway, with its dashboard (the page checks receipts in its log)."""
    home.mkdir()
    Identity.generate().save(home / "identity.key")
    sock = bind()
    app, provider = build_provider_node(home, url_of(sock), ProviderOptions(pricing=prices), peers=[gateway],
                                        gossip=GossipConfig(interval_s=FAST_GOSSIP),
                                        engine=StubEngine(model_name="agora-tiny", token_delay_s=0.002))
    mount_dashboard(app, url=url_of(sock))
    return BackgroundServer(app, sock).start(), provider


def scrape(url: str) -> dict[str, float]:
    samples = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def test_metrics_label_every_served_route_and_count_each_providers_traffic(console) -> None:
    httpx.get(f"{console.url}/v1/models")
    s = scrape(console.url)
    assert sample(s, "agora_http_requests_total", route="/v1/chat/completions", method="POST", status="200") == 10
    assert sample(s, "agora_http_requests_total", route="/v1/chat/completions", status="404") == 1
    assert sample(s, "agora_http_requests_total", route="unmatched", method="POST") == 0
    assert sample(s, "agora_http_requests_total", route="/v1/models") >= 1
    for i, peer in enumerate(console.peers):
        mine = console.served[i::2]
        assert sample(s, "agora_gateway_provider_requests_total", provider=peer, outcome="ok") == len(mine)
        assert sample(s, "agora_gateway_provider_prompt_tokens_total", provider=peer) == sum(
            r["prompt_tokens"] for r in mine)
        assert sample(s, "agora_gateway_provider_completion_tokens_total", provider=peer, model="agora-tiny") == sum(
            r["completion_tokens"] for r in mine)
        assert sample(s, "agora_gateway_provider_charged_microcredits_total", provider=peer) == sum(
            r["price"]["charged"] for r in mine)
    assert sample(s, "agora_gateway_requests_total", kind="chat", outcome="ok") == 10
    assert sample(s, "agora_gateway_requests_total", kind="chat", outcome="model_not_found") == 1
    # TTFT once per stream; one inter-token gap per streamed token after the first.
    assert sample(s, "agora_gateway_time_to_first_token_seconds_count", model="agora-tiny") == console.streams
    gaps = sum(r["completion_tokens"] - 1 for r in console.served[6:])
    assert sample(s, "agora_gateway_inter_token_latency_seconds_count", model="agora-tiny") == gaps
    assert sample(s, "agora_gateway_request_duration_seconds_count", kind="chat") == 11
    assert sample(s, "agora_gateway_failovers_total") == 0
    charged = sum(r["price"]["charged"] for r in console.served)
    assert sample(s, "agora_gateway_credits_moved_microcredits_total", to="provider") == charged
    assert sample(s, "agora_gateway_credits_moved_microcredits_total", to="refund") > 0


def test_a_gateways_status_shows_the_network_it_routes_over(console) -> None:
    s = httpx.get(f"{console.url}/agora/v1/status").json()
    assert {o["provider"] for o in s["offers"]} == set(console.peers) and all(o["verified"] for o in s["offers"])
    assert {p["peer_id"] for p in s["peers"]} >= set(console.peers)  # the providers gossip found, as nodes
    rows = {r["peer"]: r for r in s["routing"]["providers"]}
    for i, peer in enumerate(console.peers):
        mine = console.served[i::2]
        row = rows[peer]
        assert row["served"] == len(mine) and row["share"] == 0.5 and row["state"] == "ok"
        assert row["models"][0]["output_per_mtok"] == PRICES[i]["output_per_mtok"]
        assert row["completion_tokens"] == sum(r["completion_tokens"] for r in mine)
        assert row["charged"] == sum(r["price"]["charged"] for r in mine)
        assert row["precision"] == "stub" and row["engine"] == "stub"
    assert s["traffic"]["requests_total"] == 11
    assert s["traffic"]["completion_tokens_total"] == sum(r["completion_tokens"] for r in console.served)
    latency = s["routing"]["latency"]
    assert latency["requests"] == 10 and latency["p50_ms"] > 0 and latency["ttft_p50_ms"] > 0
    accounts = {(a["kind"], a["id"]): a for a in s["credits"]["by_account"]}
    charged = sum(r["price"]["charged"] for r in console.served)
    ann = accounts[("user", console.key_id)]
    assert ann["name"] == "ann" and ann["balance"] == 1_000_000 - charged and ann["charged"] == charged
    for i, peer in enumerate(console.peers):
        assert accounts[("provider", peer)]["balance"] == sum(r["price"]["charged"] for r in console.served[i::2])


def test_the_grafana_dashboard_only_queries_metrics_a_node_exports(console) -> None:
    board = json.loads(GRAFANA.read_text())
    text = httpx.get(f"{console.url}/metrics").text  # declared families (some have no samples yet) and samples
    exported = set(re.findall(r"^# TYPE (\S+)", text, re.M)) | {re.sub(r"\{.*", "", k) for k in scrape(console.url)}
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    for expr in exprs:
        names = set(re.findall(r"\b(agora_[a-z0-9_]+)", expr))
        assert names, f"panel query names no agora metric: {expr}"
        assert names <= exported, f"{expr} names metrics no node exports: {names - exported}"


def micro(n: int) -> str:
    """How the page writes an amount of micro-credits (see dashboard.js `credits`)."""
    return f"{n / 1e6:,.2f} cr" if abs(n) >= 1_000_000 else f"{n:,} µcr"


def test_the_console_page_shows_the_routed_network_with_the_numbers_served(console, page) -> None:
    page.goto(console.url + "/")
    page.wait_for_selector("body[data-ready]")
    page.wait_for_selector("#routing tr.route >> nth=1")
    for i, peer in enumerate(console.peers):
        mine = console.served[i::2]
        row = page.locator(f'#routing tr.route[data-peer="{peer}"]')
        assert row.locator("td.served").inner_text() == str(len(mine))
        assert row.locator("td.share").inner_text() == "50%"
        assert row.locator("td.errors").inner_text() == "0"
        assert row.locator("td.tokens").inner_text() == (
            f"{sum(r['prompt_tokens'] for r in mine):,} / {sum(r['completion_tokens'] for r in mine):,}")
        assert row.locator("td.charged").inner_text() == micro(sum(r["price"]["charged"] for r in mine))
        assert f"{micro(PRICES[i]['input_per_mtok'])} in · {micro(PRICES[i]['output_per_mtok'])} out" in row.inner_text()
        assert "stub · stub" in row.inner_text() and "no verdicts" in row.inner_text()
    assert page.locator("#r-providers").inner_text() == "2 of 2"
    assert page.locator("#r-failovers").inner_text() == "0"
    assert page.locator("#r-ttft50").inner_text().endswith("ms")
    assert page.locator("#t-total").inner_text() == "11"
    assert page.locator("#peers-count").inner_text() == "3 of 3 nodes"  # this gateway and the two providers
    assert page.locator("#offers tr.offer").count() == 2 and page.locator("#offers td.ok").count() == 2
    charged = sum(r["price"]["charged"] for r in console.served)
    ann = page.locator(f'#credit-accounts tr.account.user[data-account="{console.key_id}"]')
    assert "ann" in ann.inner_text() and ann.locator("td.balance").inner_text() == micro(1_000_000 - charged)
    for i, peer in enumerate(console.peers):
        earned = page.locator(f'#credit-accounts tr.account.provider[data-account="{peer}"] td.balance')
        assert earned.inner_text() == micro(sum(r["price"]["charged"] for r in console.served[i::2]))
    text = page.locator("body").inner_text()
    assert not re.search(r"\b1[6-9]\d{11}\b", text), "a raw millisecond timestamp is shown"
    assert "by_account" not in text and "open_requests" not in text  # no raw key/value dump of the credits
    ARTIFACTS.mkdir(exist_ok=True)
    for width in (1400, 1024, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(100)
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        wide = page.evaluate("""() => [...document.querySelectorAll('body *')].filter((e) =>
          e.getBoundingClientRect().right > document.documentElement.clientWidth + 1 && !e.closest('.scroll'))
          .slice(0, 8).map((e) => `${e.tagName}#${e.id}.${e.className} ${Math.round(e.getBoundingClientRect().right)}`)""")
        assert overflow <= 0, f"the page scrolls sideways by {overflow} px at {width} px wide: {wide}"
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ARTIFACTS / f"gateway-console-{width}.png"), full_page=True)


def test_the_playground_sends_the_api_key_a_gateway_requires(console, page) -> None:
    page.goto(console.url + "/")
    page.wait_for_selector("body[data-ready]")
    page.fill("#chat-max-tokens", "6")
    page.click("#chat-send")  # no key: the gateway says so, and the page says where to put one
    page.wait_for_function("document.querySelector('#chat-verdict').textContent.startsWith('✗')")
    assert "API key" in page.locator("#chat-verdict").inner_text()
    page.fill("#chat-key", console.secret)
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-verdict').textContent.includes('verified in the log')",
                           timeout=30_000)
    receipt = page.locator("#chat-receipt").inner_text()
    assert receipt.startswith("bafyrei") and page.locator("#chat-answer").inner_text()
