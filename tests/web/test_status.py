"""The status document and /metrics of a real 3-node network (two providers, one storage peer)."""

from __future__ import annotations

import io
import json
import logging
import re

import httpx
from openai import OpenAI

from agoranet.core.identity import Identity
from agoranet.core.logs import JsonFormatter, configure_logging
from agoranet.web.observe import TrafficWindow
from agoranet.web.peers import PeerWatch

from ..conftest import wait_for
from .conftest import RunningNode


def status(node: RunningNode) -> dict:
    return httpx.get(f"{node.url}/agora/v1/status").json()


def scrape(node: RunningNode) -> dict[str, float]:
    """Every sample of the node's /metrics, keyed by name{labels}."""
    text = httpx.get(f"{node.url}/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    total = 0.0
    for key, value in samples.items():
        m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})?", key)
        if m and m.group(1) == name:
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += value
    return total


def test_every_node_sees_the_network_with_roles_models_and_signed_offers(network) -> None:
    a, b, c = network
    s = wait_for(lambda: (s := status(a)) and len([p for p in s["peers"] if p["health"] == "ok"]) == 3 and s,
                 timeout=10, interval=0.05, what="3 healthy peers")
    peers = {p["url"]: p for p in s["peers"]}
    assert peers[a.url]["self"] and peers[a.url]["peer_id"] == a.peer_id
    assert peers[b.url]["peer_id"] == b.peer_id and "provider" in peers[b.url]["roles"]
    assert peers[c.url]["roles"] == ["storage"] and peers[c.url]["models"] == []
    assert peers[b.url]["models"][0]["name"] == "agora-tiny" and peers[b.url]["models"][0]["cid"].startswith("bafy")
    offers = {o["provider"]: o for o in s["offers"]}
    assert set(offers) == {a.peer_id, b.peer_id}
    for offer in offers.values():
        assert offer["verified"] and offer["precision"] == "fp32"
        assert offer["models"][0]["input_per_mtok"] == 100_000 and offer["models"][0]["output_per_mtok"] == 200_000
    assert s["health"]["status"] == "ok" and s["log"]["size"] >= 1
    storage = status(c)
    assert storage["storage"]["blocks"] == 0 and "log" not in storage and "verification" not in storage


def test_a_forged_offer_relayed_by_a_peer_shows_as_invalid(network) -> None:
    a = network[0]
    genuine = status(a)["offers"][0]
    forged = {"cid": genuine["cid"], "record": genuine["record"] | {
        "body": genuine["record"]["body"] | {"url": "http://evil.example"}}}
    view = a.dashboard.offer_view(forged)
    assert view["verified"] is False and "signature" in view["error"]
    other = Identity.generate()
    assert a.dashboard.offer_view({"cid": genuine["cid"], "record": genuine["record"] | {"signer": str(other.peer_id)}})[
        "verified"] is False
    assert a.dashboard.offer_view({"cid": "bafyfake"})["verified"] is False


def test_metrics_count_real_requests_tokens_and_latency_per_node(network) -> None:
    a, b, c = network
    before_a, before_b = scrape(a), scrape(b)
    client = OpenAI(base_url=f"{b.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "add two numbers"}]
    plain = client.chat.completions.create(model="agora-tiny", messages=messages, max_tokens=6, temperature=0)
    streamed = list(client.chat.completions.create(model="agora-tiny", messages=messages, max_tokens=5, stream=True))
    assert plain.usage.completion_tokens == 6 and streamed[-1].model_extra["agora"]["receipt_cid"]
    after_a, after_b = scrape(a), scrape(b)

    def moved(name: str, **labels: str) -> float:
        return sample(after_b, name, **labels) - sample(before_b, name, **labels)

    chat = {"route": "/v1/chat/completions", "method": "POST"}
    assert moved("agora_http_requests_total", status="200", **chat) == 2
    assert moved("agora_http_request_duration_seconds_count", **chat) == 2
    assert moved("agora_http_request_duration_seconds_sum", **chat) > 0
    assert moved("agora_receipts_total", role="provider") == 2
    assert moved("agora_completion_tokens_total", role="provider") == 11
    assert moved("agora_prompt_tokens_total", role="provider") == 2 * plain.usage.prompt_tokens
    assert moved("agora_engine_steps_total", role="provider") >= 9
    assert moved("agora_log_entries", role="log") >= 2
    assert sample(after_b, "agora_node_info", peer_id=b.peer_id) == 1
    # One registry per node app: the other provider in the same process saw none of it.
    assert sample(after_a, "agora_receipts_total") == sample(before_a, "agora_receipts_total")
    storage = scrape(c)
    assert sample(storage, "agora_store_blocks", role="storage") == 0
    assert sample(storage, "agora_replication_intents", role="storage") == 0
    t = status(b)["traffic"]
    assert t["requests_total"] >= 2 and t["completion_tokens_total"] >= 11 and t["p99_ms"] >= t["p50_ms"] > 0


def test_log_page_is_decoded_and_bounded(network) -> None:
    b = network[1]
    page = httpx.get(f"{b.url}/agora/v1/status/log", params={"start": 0, "end": 10_000}).json()
    assert page["end"] - page["start"] == min(100, page["size"]) and page["entries"][0]["index"] == 0
    assert {e["type"] for e in page["entries"]} <= {"agora/offer/1", "agora/receipt/1"}
    bad = httpx.get(f"{b.url}/agora/v1/status/log", params={"start": 5, "end": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "end"


def test_traffic_window_gives_rates_and_percentiles_over_its_window() -> None:
    window = TrafficWindow(window_s=10)
    window.snapshot({"completion_tokens_total": 0}, now=100.0)
    for i in range(100):
        window.observe(seconds=(i + 1) / 1000, status=200 if i < 99 else 500, now=100.0 + i * 0.05)
    t = window.snapshot({"completion_tokens_total": 500}, now=105.0)
    assert t["requests_per_s"] == 20.0 and t["tokens_per_s"] == 100.0
    assert t["p50_ms"] == 50.0 and t["p99_ms"] == 99.0 and t["errors_total"] == 1
    later = window.snapshot({"completion_tokens_total": 500}, now=130.0)  # everything fell out of the window
    assert later["p50_ms"] is None and later["tokens_per_s"] == 0.0 and later["requests_total"] == 100


async def test_an_unreachable_peer_is_marked_unreachable() -> None:
    watch = PeerWatch(["http://127.0.0.1:9"], timeout=0.5)
    async with httpx.AsyncClient(timeout=0.5) as client:
        await watch.poll(client)
    (row,) = watch.status()["peers"]
    assert row["health"] == "unreachable" and row["error"] and row["last_seen_ms"] is None


def test_json_logs_carry_extra_fields_and_exceptions() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(json_lines=True, stream=stream)
        logging.getLogger("agoranet.test").info("replica placed", extra={"cid": "bafyx", "peer": "p1"})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("agoranet.test").exception("repair failed")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "replica placed" and first["cid"] == "bafyx" and first["peer"] == "p1"
    assert first["level"] == "info" and first["logger"] == "agoranet.test" and first["ts"].endswith("+00:00")
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]
    assert isinstance(JsonFormatter(), logging.Formatter)


def test_read_only_endpoints_answer_other_origins_but_inference_does_not(network) -> None:
    a, b = network[0], network[1]
    origin = {"origin": a.url}
    got = httpx.get(f"{b.url}/agora/v1/log/head", headers=origin)
    assert got.headers["access-control-allow-origin"] == "*"
    preflight = httpx.options(f"{b.url}/v1/chat/completions", headers=origin | {
        "access-control-request-method": "POST", "access-control-request-headers": "content-type"})
    # A browser sends the POST only after a 200 preflight that allows it: a page elsewhere cannot spend here.
    assert preflight.status_code == 400 and "POST" not in preflight.headers.get("access-control-allow-methods", "")
