"""`agora node --roles …` as users run it: one process, one identity, one port serving several roles,
found by a plain `agora provide` by gossip, driven by the official openai SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from agoranet.core.records import verify_record

from ..conftest import FAST_GOSSIP, NodeProcess, fetch_receipt, free_port, provider_process, wait_for
from .test_cli import agora

MSG = [{"role": "user", "content": "write a function that reverses a list"}]


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """`agora node --roles gateway,provider,verifier` and a plain provider that gossips with it."""
    root = tmp_path_factory.mktemp("node-cmd")
    node = NodeProcess(["node", "--roles", "gateway,provider,verifier", "--threads", "1", "--audit-fraction", "1",
                        "--gossip-interval", str(FAST_GOSSIP)], root / "node", free_port())
    other = None
    try:
        node.wait_ready()
        other = provider_process(root / "other", node.url, price_out=400_000).wait_ready()
        ids = {"own": httpx.get(f"{node.url}/provider/agora/v1/offer").json()["record"]["signer"],
               "other": httpx.get(f"{other.url}/agora/v1/offer").json()["record"]["signer"]}
        wait_for(lambda: [m for m in httpx.get(f"{node.url}/v1/models").json()["data"]
                          if m["agora"]["providers"] == 2], what="the node's gateway to find both providers")
        yield node, other, ids
    finally:
        if other is not None:
            other.stop()
        node.stop()


def ask(url: str, peer: str, **kw):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(model="agora-tiny", messages=MSG, max_tokens=12, temperature=0.7,
                                          extra_body={"provider": {"only": [peer]}}, **kw)


@pytest.mark.slow
def test_the_gateway_owns_v1_and_serves_its_own_provider_and_others_with_receipts(net):
    node, _, ids = net
    assert [m["owned_by"] for m in httpx.get(f"{node.url}/v1/models").json()["data"]] == ["agora"]  # the gateway's
    for peer in ids.values():
        r = ask(node.url, peer, seed=5)
        agora = r.model_extra["agora"]
        receipt = fetch_receipt(agora)
        assert receipt.signer == agora["provider"] == peer
        assert receipt.body.output_text == r.choices[0].message.content and len(agora["receipts"]) == 1
        chunks = list(ask(node.url, peer, seed=5, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == receipt.body.output_text
    # The node's own signed receipts are at its root too (where its dashboard links them).
    own = ask(node.url, ids["own"]).model_extra["agora"]["receipt_cid"]
    assert httpx.get(f"{node.url}/agora/v1/records/{own}").json()["record"]["signer"] == ids["own"]


@pytest.mark.slow
def test_the_provider_serves_under_the_url_its_signed_offer_names(net):
    node, other, ids = net
    offer = httpx.get(f"{node.url}/provider/agora/v1/offer").json()["record"]
    assert offer["body"]["url"] == f"{node.url}/provider" and offer["signer"] == ids["own"]
    direct = openai.OpenAI(base_url=f"{offer['body']['url']}/v1", api_key="unused", max_retries=0)
    assert direct.models.list().data[0].owned_by == ids["own"]
    r = direct.chat.completions.create(model="agora-tiny", messages=MSG, max_tokens=4)
    assert verify_record(r.model_extra["agora"]["summary"]).signer == ids["own"]
    # One identity, one membership: the other provider knows this node by its root URL, with all its roles.
    members = httpx.get(f"{other.url}/agora/v1/peers").json()["members"]
    assert members[ids["own"]] == node.url
    assert httpx.get(f"{node.url}/agora/v1/status").json()["node"]["roles"] == [
        "log", "credits", "verifier", "provider", "witness", "network", "gateway"]


@pytest.mark.slow
def test_the_nodes_verifier_replays_receipts_it_fetches_from_each_offers_url(net):
    node, _, ids = net
    for peer in ids.values():
        ask(node.url, peer)
    # The gateway hands every receipt to the node's own verifier, which fetches the canonical request
    # from the URL of the offer routed by: /provider on this node, the root of the other one.
    table = wait_for(lambda: (t := httpx.get(f"{node.url}/agora/v1/reputation").json()["providers"])
                     and all(t.get(p, {}).get("passed") for p in ids.values()) and t,
                     what="both providers' receipts to be replayed")
    assert not any(row["failed"] for row in table.values())


def test_unknown_roles_and_options_of_roles_not_run_are_one_clear_line(tmp_path):
    r = agora("node", "--roles", "gateway,bogus", "--port", "0", home=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "unknown role 'bogus'" in r.stderr and "gateway, provider, verifier, storage" in r.stderr
    assert not (tmp_path / "identity.key").exists()  # refused before anything was made
    r = agora("node", "--roles", "provider", "--charge-credits", "--port", "0", home=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--charge-credits is for a node running gateway" in r.stderr


@pytest.mark.parametrize("engine", ["vllm", "upstream"])
def test_provide_with_an_upstream_that_does_not_answer_says_so_without_a_traceback(tmp_path, real_model,
                                                                                    real_model_tolerances, engine):
    """An engine that cannot start (nothing listens at --upstream) ends `agora provide` with one error line
    naming the fix, not uvicorn's traceback."""
    url = f"http://127.0.0.1:{free_port()}"
    r = agora("provide", "--engine", engine, "--model", str(real_model), "--upstream", url, "--upstream-model", "m",
              "--tolerances", str(real_model_tolerances), "--port", str(free_port()), home=tmp_path)
    assert r.returncode == 1, r.stderr
    out = r.stdout + r.stderr
    assert "does not answer GET /models" in out and "start it first" in out
    assert "Traceback" not in out
