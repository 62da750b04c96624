"""Signed tree heads travel by gossip between real nodes; a forked log is caught, proven and routed around."""

from __future__ import annotations

import httpx
import pytest
from ..conftest import FAST_GOSSIP, start_provider, wait_for

from agoranet.core.identity import Identity
from agoranet.core.records import sign_record
from agoranet.engine.stub import StubEngine
from agoranet.log.records import SplitViewProof, SplitViewsBody, TreeHeadBody, check_heads, verify_tree_head
from agoranet.log.transparency import TransparencyLog
from agoranet.net.gossip import GossipConfig, now_ms
from agoranet.node.node import build_gateway_node
from agoranet.node.server import BackgroundServer, bind, url_of
from agoranet.web import mount_dashboard

MSG = [{"role": "user", "content": "hi"}]


def start_gateway(home, peers=()):
    """A gateway that also serves its status and metrics (the dashboard), gossiping every FAST_GOSSIP s."""
    Identity.load_or_create(home / "identity.key")
    sock = bind()
    app, gateway = build_gateway_node(home, url_of(sock), list(peers), gossip=GossipConfig(interval_s=FAST_GOSSIP))
    mount_dashboard(app, url=url_of(sock))
    return BackgroundServer(app, sock).start(), gateway


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """A gateway and three stub providers that joined it by gossip: `a` and `c` get forked, `b` stays honest."""
    root = tmp_path_factory.mktemp("heads")
    gw, gateway = start_gateway(root / "gw")
    servers, provs = {}, {}
    for name in "abc":
        servers[name], provs[name] = start_provider(root / name, engine=StubEngine(model_name="agora-tiny"),
                                                    peers=[gw.url], gossip=GossipConfig(interval_s=FAST_GOSSIP))
    ids = {name: str(p.identity.peer_id) for name, p in provs.items()}
    try:
        wait_for(lambda: set(ids.values()) <= set(gateway.discovery.members()), what="the providers to join")
        yield {"gw": gw, "gateway": gateway, "servers": servers, "provs": provs, "ids": ids, "root": root}
    finally:
        for s in servers.values():
            s.stop()
        gw.stop()


def heads_at(url: str) -> dict[str, dict]:
    return httpx.get(f"{url}/agora/v1/log/heads").json()["heads"]


def push(url: str, *records: dict) -> None:
    assert httpx.post(f"{url}/agora/v1/gossip", json={"records": list(records)}).status_code == 200


def chat(url: str, **provider) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=10,
                      json={"model": "agora-tiny", "messages": MSG, "max_tokens": 4, "provider": provider})


def twin_head(net, name: str, size: int) -> dict:
    """A head signed with provider `name`'s own key by a second log of another history (a fork)."""
    identity = Identity.load(net["root"] / name / "identity.key")
    with TransparencyLog(net["root"] / f"twin-{name}.db", identity) as twin:
        twin.append_many([f"twin {name} entry {i}".encode() for i in range(size)])
        return twin.head().to_json()


def test_heads_spread_by_gossip_and_a_growing_log_is_checked_for_consistency(net):
    gw, ids, servers = net["gw"], net["ids"], net["servers"]
    wait_for(lambda: set(ids.values()) <= set(heads_at(gw.url)), what="the gateway to hold every provider's head")
    # a provider's head reaches the other providers too, relayed through the gateway
    wait_for(lambda: ids["a"] in heads_at(servers["b"].url), what="a's head to reach b")
    before = heads_at(gw.url)[ids["b"]]["record"]["body"]["size"]
    assert chat(servers["b"].url).status_code == 200  # b logs a receipt: its log grows
    wait_for(lambda: heads_at(gw.url)[ids["b"]]["record"]["body"]["size"] > before, what="b's larger head")
    status = httpx.get(f"{gw.url}/agora/v1/status", params={"peers": "false"}).json()["witness"]
    assert status["untrusted"] == [] and status["logs"] >= 3
    metrics = httpx.get(f"{gw.url}/metrics").text
    checks = [line for line in metrics.splitlines() if line.startswith("agora_witness_consistency_checks_total")]
    assert checks and float(checks[0].split()[-1]) >= 1, "the larger head was checked with a proof from b"
    assert httpx.get(f"{gw.url}/agora/v1/log/split-views").json() == {"untrusted": [], "split_views": []}


def test_forged_heads_are_rejected_and_counted(net):
    gw, gateway, ids = net["gw"], net["gateway"], net["ids"]
    wait_for(lambda: ids["b"] in heads_at(gw.url), what="b's head")
    real = heads_at(gw.url)[ids["b"]]["record"]
    tampered = {**real, "body": {**real["body"], "root": "00" * 32, "timestamp_ms": real["body"]["timestamp_ms"] + 1}}
    impostor = Identity.generate()  # a valid signature, but not by the log the head speaks for
    borrowed = sign_record(impostor, TreeHeadBody(**{**real["body"], "root": "11" * 32})).to_json()
    rejected = dict(gateway.discovery.rejected)
    push(gw.url, tampered, borrowed)
    assert gateway.discovery.rejected["bad_signature"] == rejected.get("bad_signature", 0) + 1
    assert gateway.discovery.rejected["wrong_signer"] == rejected.get("wrong_signer", 0) + 1
    assert heads_at(gw.url)[ids["b"]]["record"]["body"]["root"] == real["body"]["root"]
    assert ids["b"] not in httpx.get(f"{gw.url}/agora/v1/log/split-views").json()["untrusted"]


def test_a_fork_at_the_same_size_is_proven_kept_spread_and_routed_around(net):
    gw, ids, servers = net["gw"], net["ids"], net["servers"]
    wait_for(lambda: ids["a"] in heads_at(gw.url), what="a's head")
    assert {chat(gw.url, only=[ids["a"]]).json()["agora"]["provider"]} == {ids["a"]}  # a serves before the fork
    wait_for(lambda: heads_at(gw.url)[ids["a"]]["record"]["body"]["size"] == net["provs"]["a"].log.log.size,
             what="a's head after its receipt")
    held = heads_at(gw.url)[ids["a"]]["record"]
    push(gw.url, twin_head(net, "a", held["body"]["size"]))

    wait_for(lambda: ids["a"] in httpx.get(f"{gw.url}/agora/v1/log/split-views").json()["untrusted"],
             what="the gateway to catch the fork", timeout=10)
    (served,) = httpx.get(f"{gw.url}/agora/v1/log/split-views", params={"log_id": ids["a"]}).json()["split_views"]
    proof = SplitViewProof.from_json(served["proof"])  # re-checked here, trusting nobody
    assert served["conclusive"] and proof.conclusive and proof.first.body.log_id == ids["a"]
    assert held["body"]["root"] in (proof.first.body.root, proof.second.body.root)

    # the gateway stops routing to a: asked for a alone it refuses, otherwise someone else serves
    refused = chat(gw.url, only=[ids["a"]])
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "no_provider_matches"
    assert {chat(gw.url).json()["agora"]["provider"] for _ in range(4)} <= {ids["b"], ids["c"]}
    # the twin head was newer, so gossip relays it: b (and a itself, whose key was used) catch the fork too
    for name in "ba":
        url = servers[name].url
        wait_for(lambda url=url: ids["a"] in httpx.get(f"{url}/agora/v1/log/split-views").json()["untrusted"],
                 what=f"{name} to catch the fork", timeout=10)


def test_a_fork_behind_the_head_is_proven_with_the_logs_own_answers(net):
    """A smaller head of another history: the log's consistency proof fails, and its own head at that
    size has another root — two signed roots for one size."""
    gw, ids = net["gw"], net["ids"]
    for _ in range(2):  # c's log needs a history to fork behind its head: its offer and two receipts
        assert chat(net["servers"]["c"].url).status_code == 200
    wait_for(lambda: heads_at(gw.url).get(ids["c"], {}).get("record", {}).get("body", {}).get("size", 0) >= 3,
             what="c's grown head")
    size = heads_at(gw.url)[ids["c"]]["record"]["body"]["size"]
    push(gw.url, twin_head(net, "c", size - 1))

    def proofs() -> list[SplitViewProof]:
        views = httpx.get(f"{gw.url}/agora/v1/log/split-views", params={"log_id": ids["c"]}).json()["split_views"]
        return [SplitViewProof.from_json(v["proof"]) for v in views]

    wait_for(lambda: len(proofs()) == 2, what="the gateway to catch c's fork", timeout=10)
    assert ids["c"] in httpx.get(f"{gw.url}/agora/v1/log/split-views").json()["untrusted"]
    found = proofs()
    assert any(not p.conclusive for p in found), "c's failed consistency proof is kept"
    conclusive = [p for p in found if p.conclusive]
    assert conclusive and conclusive[0].first.body.size == size - 1
    signed_now = verify_tree_head(httpx.get(f"{net['servers']['c'].url}/agora/v1/log/head",
                                            params={"size": size - 1}).json())
    assert signed_now.body.root in (conclusive[0].first.body.root, conclusive[0].second.body.root)


def fork_proof(tmp_path, identity: Identity, size: int = 3) -> dict:
    """Two heads of one size and different roots, both signed with `identity`'s key: a conclusive fork."""
    heads = []
    for n in (1, 2):
        with TransparencyLog(tmp_path / f"fork-{identity.peer_id}-{n}.db", identity) as forked:
            forked.append_many([f"history {n} entry {i}".encode() for i in range(size)])
            heads.append(forked.head())
    split = check_heads(heads[0], heads[1], [])
    assert split is not None and split.conclusive
    return split.to_json()


def test_a_node_that_never_saw_a_fork_learns_it_from_a_witness_report(tmp_path):
    # Two gateways that have never seen a head of the forked log; a witness report reaches the first
    # (pushed, as gossip would bring it): it re-checks the proof, distrusts the log, and its own report
    # carries the proof on to the second by gossip. A report whose proof does not re-check changes nothing.
    first, g1 = start_gateway(tmp_path / "g1")
    second, _ = start_gateway(tmp_path / "g2", peers=[first.url])
    try:
        forked, honest, witness = Identity.generate(), Identity.generate(), Identity.generate()
        report = sign_record(witness, SplitViewsBody(proofs=[fork_proof(tmp_path, forked)], issued_ms=now_ms()))
        push(first.url, report.to_json())
        for url in (first.url, second.url):
            wait_for(lambda url=url: str(forked.peer_id) in httpx.get(f"{url}/agora/v1/log/split-views").json()[
                "untrusted"], what="the fork to be learnt", timeout=10)
        assert g1.routing.exclusions and g1.routing.exclusions[0](str(forked.peer_id))

        proof = fork_proof(tmp_path, honest)
        proof["second"] = proof["first"]  # one head twice: consistent, so no evidence of anything
        rejected = g1.discovery.rejected["bad_split_view"]
        push(first.url, sign_record(witness, SplitViewsBody(proofs=[proof], issued_ms=now_ms())).to_json())
        assert g1.discovery.rejected["bad_split_view"] == rejected + 1
        assert str(honest.peer_id) not in httpx.get(f"{first.url}/agora/v1/log/split-views").json()["untrusted"]
    finally:
        second.stop()
        first.stop()
