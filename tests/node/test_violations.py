"""No escape by declaration: a receipt its provider made unjudgeable is a signed violation that excludes it; a
verifier signs such violations only for what its provider chose, never for a class it merely does not hold."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from agoranet.core.errors import ModelUnavailable
from agoranet.core.identity import Identity
from agoranet.core.records import ReceiptBody, Record, sign_record, verify_record
from agoranet.engine.models import model_cid, resolve_model
from agoranet.net.gossip import GossipConfig
from agoranet.node.cheat import DECLARED_RULE, UNKNOWN_MODEL
from agoranet.node.judge import ReplayVerifier, UnverifiableReceipt, Violation
from agoranet.node.node import ProviderOptions, build_verifier_node
from agoranet.node.server import BackgroundServer, bind, url_of
from agoranet.node.verifier import VerifierConfig
from agoranet.wire.canonical import CanonicalRequest
from agoranet.verify.rules import RULE, RULE_DIGEST

from ..conftest import FAST_GOSSIP, start_gateway, start_provider, wait_for

MSG = [{"role": "user", "content": "add two numbers"}]
UNHELD = ("fp16", "precision", "unknown_model")  # classes no verifier here holds: gateways route none to them
ESCAPES = (*UNHELD, "rule")


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """A gateway following one verifier that pulls every provider's receipts: one honest provider, and one
    per escape (declared fp16, a made-up precision, a model CID nobody stores, a retired sampling rule)."""
    root = tmp_path_factory.mktemp("violations")
    servers = []
    v_sock = bind()  # its URL first: the gateway follows it
    try:
        gw, gateway = start_gateway(root / "gw", reputation_interval_s=0.3, verifiers=(url_of(v_sock),))
        servers.append(gw)
        providers = {}
        for name in ("honest", *ESCAPES):
            server, prov = start_provider(root / name, ProviderOptions(threads=1, cheat=None if name == "honest"
                                                                       else name),
                                          peers=[gw.url], gossip=GossipConfig(interval_s=FAST_GOSSIP))
            servers.append(server)
            providers[name] = (server.url, str(prov.identity.peer_id))
        app, role = build_verifier_node(root / "verifier", VerifierConfig(
            audit_fraction=1.0, sources=tuple(url for url, _ in providers.values()), poll_interval_s=0.2, seed=0))
        v = BackgroundServer(app, v_sock).start()
        servers.append(v)
        yield gw.url, gateway, v.url, role, providers
    finally:
        for s in reversed(servers):
            s.stop()


def test_gateway_routes_no_request_to_what_no_verifier_can_judge(net):
    gw_url, gateway, _, _, providers = net
    wait_for(lambda: gateway.verifiers.classes, what="the verifier's calibrated classes")
    wait_for(lambda: len(asyncio.run(gateway.discovery.find_offers("agora-tiny"))) == 5, what="5 agora-tiny offers")
    assert not gateway.verifiers.judgeable(model_cid(resolve_model("agora-tiny")[0]), "fp16")
    client = openai.OpenAI(base_url=f"{gw_url}/v1", api_key="x", max_retries=0)
    for name, why in (("fp16", "no verifier holds tolerances"), ("precision", "no verifier holds tolerances"),
                      ("rule", "applying a sampling rule no verifier judges")):
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model="agora-tiny", messages=MSG, max_tokens=4,
                                           extra_body={"provider": {"only": [providers[name][0]]}})
        assert why in str(err.value)
    served = {client.chat.completions.create(model="agora-tiny", messages=MSG, max_tokens=4, seed=i)
              .model_extra["agora"]["provider"] for i in range(4)}
    assert served == {providers["honest"][1]}
    states = {row["peer"]: row["state"] for row in gateway.routing_table(
        asyncio.run(gateway.discovery.find_offers("agora-tiny")))["providers"]}
    assert states[providers["honest"][1]] == "ok"
    for name in UNHELD:
        assert states[providers[name][1]].startswith("no traffic: no verifier holds tolerances"), states
    assert states[providers["rule"][1]] == f"no traffic: it applies sampling rule {DECLARED_RULE!r}, which no " \
                                          "verifier judges"


def test_a_feed_follower_signs_what_its_provider_chose_and_skips_classes_it_does_not_hold(net, tmp_path):
    """A retired rule is its provider's choice: a violation that excludes it. A class this verifier holds no
    tolerance record for (fp16, a made-up precision, a model it never calibrated) may be another verifier's:
    skipped and counted, never signed (it used to be a violation, which pushed honest providers of classes
    other verifiers hold out of every gateway following this one)."""
    _, gateway, verifier_url, role, providers = net
    receipts = {}
    for name, (url, _) in providers.items():
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "agora-tiny", "messages": MSG, "max_tokens": 8, "temperature": 0.8, "seed": 1})
        assert r.status_code == 200, r.text
        receipts[name] = r.json()["agora"]["receipt_cid"]

    def judged():
        rep = httpx.get(f"{verifier_url}/agora/v1/reputation").json()["providers"]
        done = all(rep.get(providers[n][1], {}).get("verified") for n in ("honest", "rule"))
        return rep if done and role.not_judged >= len(UNHELD) else None

    rep = wait_for(judged, timeout=120, what="a verdict on the honest and the rule-declaring provider")
    honest = rep[providers["honest"][1]]
    assert honest["passed"] >= 1 and (honest["failed"], honest["excluded"], honest["violations"]) == (0, False, [])
    row = rep[providers["rule"][1]]
    assert (row["failed"], row["excluded"], row["score"]) == (1, True, 0.0)  # counted exactly like a failed verdict
    assert row["violations"] == [receipts["rule"]] and row["fraud_proofs"] == []
    for name in UNHELD:
        assert providers[name][1] not in rep, name
    verdicts = [verify_record(v["record"]).body
                for v in httpx.get(f"{verifier_url}/agora/v1/verdicts").json()["verdicts"]]
    bad = {v.receipt: v for v in verdicts if not v.ok}
    assert set(bad) == {receipts["rule"]} and not {receipts[n] for n in UNHELD} & {v.receipt for v in verdicts}
    f = bad[receipts["rule"]].failure
    assert f.kind == "violation" and f.detail.startswith("rule: ") and DECLARED_RULE in f.detail
    assert role.metrics()["verifier_violations_total"] == 1
    assert role.metrics()["verifier_not_judged_total"] == len(UNHELD)
    # the gateway following this verifier shuts the rule-declaring one out as it does a cheater with a fraud proof
    wait_for(lambda: gateway.verifiers.excluded(providers["rule"][1]), what="the exclusion")
    assert not any(gateway.verifiers.excluded(providers[n][1]) for n in ("honest", *UNHELD))

    # and `agora verify` says so, with the judged-bad exit code
    from typer.testing import CliRunner

    from agoranet.cli.verify_cmd import verify_app

    url = providers["rule"][0]
    out = CliRunner().invoke(verify_app, [receipts["rule"], "--node", url, "--home", str(tmp_path)])
    assert out.exit_code == 3 and "VIOLATION" in out.output, out.output


# -- the judge's rules, receipt by receipt ----------------------------------------------------------------

MODEL_CID = model_cid(resolve_model("agora-tiny")[0])
PROVIDER = Identity.generate()


def receipt(kind: str = "completion", **changes) -> tuple[Record[ReceiptBody], bytes]:
    request = CanonicalRequest(kind=kind, model=MODEL_CID, request_id="req-1", prompt="def f(",
                               sampling={"temperature": 0.0, "top_p": 1.0, "seed": 1, "max_tokens": 4, "stop": []},
                               top_logprobs=0, prefix_tokens=[])
    data = request.encode()
    from agoranet.core.cid import DAG_CBOR, cid_of

    body = ReceiptBody(model=MODEL_CID, precision="fp32", rule=RULE, rule_digest=RULE_DIGEST, request=str(cid_of(data, DAG_CBOR)), request_id="req-1",
                       prompt_tokens=6, output_tokens=[], output_text="", logprobs=[], top_logprobs=[],
                       sampling={"temperature": 0.0, "top_p": 1.0, "seed": 1, "max_tokens": 4, "stop": []},
                       finish_reason="length", price={"input_per_mtok": 0, "output_per_mtok": 0, "charged": 0},
                       started_ms=0, finished_ms=0)
    return sign_record(PROVIDER, body.model_copy(update=changes)), data


@pytest.fixture(scope="module")
def judge():
    return ReplayVerifier(Identity.generate())


@pytest.mark.parametrize("changes, kind", [
    ({"precision": "fp16"}, "precision"), ({"precision": "FP32 "}, "precision"), ({"precision": ""}, "precision"),
    ({"model": UNKNOWN_MODEL}, "model"), ({"prompt_tokens": 1 << 20}, "length"),
    ({"prompt_tokens": 1000}, "range"),  # within agora-tiny's 1,024-token context, beyond the 960 calibrated
    ({"rule": "agora-gumbel-v1"}, "rule"), ({"rule": "agora-gumbel-v9"}, "rule"), ({"rule": "upstream"}, "rule"),
])
def test_each_unjudgeable_declaration_is_a_signed_violation(judge, changes, kind):
    rec, request = receipt(**changes)
    j = judge.judge(rec, request)
    v = verify_record(j.verdict.encode()).body
    assert (v.ok, v.failure.kind, v.provider, j.proof) == (False, "violation", str(PROVIDER.peer_id), None)
    assert v.failure.detail.startswith(f"{kind}: ")


def test_a_malformed_request_its_provider_signed_is_a_violation(judge):
    rec, request = receipt(kind="chat")  # a chat request without messages, under the provider's signature
    assert judge.judge(rec, request).verdict.body.failure.detail.startswith("request: ")


def test_a_model_the_offer_does_not_name_is_a_violation(judge):
    rec, _ = receipt()
    judge.declared(rec)  # nothing wrong with it on its own
    with pytest.raises(Violation) as err:
        judge.declared(rec, {(MODEL_CID, "bf16")})
    assert err.value.kind == "offer"


def test_fetching_a_model_nobody_stores_is_the_providers_fault_a_broken_store_is_not():
    rec, request = receipt(model=UNKNOWN_MODEL)

    def nobody(cid: str):
        raise ModelUnavailable(f"no storage peer has {cid}")

    def broken(cid: str):
        raise OSError("disk full")

    for fetch, violation in ((nobody, True), (broken, False)):
        judge = ReplayVerifier(Identity.generate(), fetch=fetch)
        judge._tables[UNKNOWN_MODEL] = judge._tables[MODEL_CID]  # a tolerance record exists, the model is the issue
        if violation:
            assert judge.judge(rec, request).verdict.body.failure.detail.startswith("model: ")
        else:
            with pytest.raises(UnverifiableReceipt, match="disk full"):
                judge.judge(rec, request)


def test_a_provider_sells_only_what_a_tolerance_record_covers(tmp_path):
    from types import SimpleNamespace

    from agoranet.node.node import TOLERANCES_DIR, NotSellable, check_sellable
    from agoranet.verify.tolerances import SequenceStats, class_tolerance, tolerances_record

    engine = SimpleNamespace(name="transformers", model_cid=MODEL_CID, precision="fp16")
    check_sellable(SimpleNamespace(name="transformers", model_cid=MODEL_CID, precision="bf16"), tmp_path, [])  # shipped
    with pytest.raises(NotSellable, match="'fp16'") as err:
        check_sellable(engine, tmp_path, [])
    assert "agora verify calibrate" in str(err.value) and "bf16, fp32" in str(err.value)
    with pytest.raises(NotSellable, match="no tolerance record covers model"):
        check_sellable(SimpleNamespace(name="transformers", model_cid=UNKNOWN_MODEL, precision="fp32"), tmp_path, [])
    check_sellable(SimpleNamespace(name="upstream", model_cid=UNKNOWN_MODEL, precision="upstream"), tmp_path, [])
    # `agora verify calibrate` writes HOME/tolerances/CID.json: then the class may be sold from that home
    stats = SequenceStats(flips=[0], flip_margins=[0.0], lp_means=[0.0], max_prompt_tokens=1024,
                          max_output_tokens=64, batch_sizes=(1,))
    fp16 = class_tolerance("fp16", (0.5, 0.3, 0.4, 0.2), (0.5, 0.3, 0.4, 0.2), sequences=8, confirm_sequences=8,
                           stats=stats)
    record = tolerances_record(Identity.generate(), MODEL_CID, [fp16], hardware="test", method="tests")
    (tmp_path / TOLERANCES_DIR).mkdir()
    (tmp_path / TOLERANCES_DIR / f"{MODEL_CID}.json").write_text(json.dumps(record.to_json()))
    check_sellable(engine, tmp_path, [])


def test_a_verifier_fetches_a_model_it_lacks_by_cid_and_a_model_nobody_stores_is_a_violation(
        tmp_path, real_model, real_model_tolerances):
    """Real nodes: a storage peer holding a locally built model, a provider serving it, and a verifier that
    holds its tolerance record but not the model (it fetches it by CID); a receipt naming a calibrated model
    that no storage peer has is the provider's violation."""
    from agoranet.node.app import create_app
    from agoranet.node.storage_role import StorageRole
    from agoranet.store.unixfs import add_path
    from agoranet.verify.tolerances import load_tolerances, tolerances_record

    sock = bind()
    storage = StorageRole(tmp_path / "storage", url_of(sock), [])
    cid = str(add_path(storage.store, real_model))
    table = load_tolerances(real_model_tolerances).body
    nobody = tmp_path / "nobody.json"  # a tolerance record for a model no peer stores
    nobody.write_text(json.dumps(tolerances_record(Identity.generate(), UNKNOWN_MODEL, table.classes, hardware="test",
                                                   method="tests").to_json()))
    with BackgroundServer(create_app([storage], max_request_bytes=1 << 20), sock) as peer:
        server, prov = start_provider(tmp_path / "provider", ProviderOptions(
            model=str(real_model), threads=1, tolerance_files=[real_model_tolerances]))
        app, role = build_verifier_node(tmp_path / "verifier", VerifierConfig(audit_fraction=0.0),
                                        tolerance_files=[real_model_tolerances, nobody], storage_peers=[peer.url])
        try:
            with BackgroundServer(app, bind()) as verifier:
                r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
                    "model": real_model.name, "messages": MSG, "max_tokens": 8, "temperature": 0.8, "seed": 2})
                assert r.status_code == 200, r.text
                cid_asked = r.json()["agora"]["receipt_cid"]
                judged = httpx.post(f"{verifier.url}/agora/v1/verify", timeout=300,
                                    json={"receipt_cid": cid_asked, "node": server.url}).json()
                assert judged["ok"], judged  # replayed with the model fetched from the storage peer
                assert (tmp_path / "verifier" / "models" / cid / "config.json").exists()

                receipt = verify_record(httpx.get(f"{server.url}/agora/v1/records/{cid_asked}").json()["record"],
                                        ReceiptBody)
                request = httpx.get(f"{server.url}/agora/v1/records/{receipt.body.request}",
                                    headers={"accept": "application/vnd.ipld.dag-cbor"}).content
                stranger = Identity.generate()
                orphan = sign_record(stranger, receipt.body.model_copy(update={"model": UNKNOWN_MODEL}))
                judged = httpx.post(f"{verifier.url}/agora/v1/verify", timeout=300,
                                    json={"receipt": orphan.to_json(), "request": request.hex()}).json()
                failure = judged["verdict"]["body"]["failure"]
                assert not judged["ok"] and failure["kind"] == "violation", judged
                assert "cannot be fetched by its CID" in failure["detail"]
                assert role.reputation.providers[str(stranger.peer_id)].excluded
                assert not role.reputation.providers[str(prov.identity.peer_id)].excluded
        finally:
            server.stop()


def test_a_model_fetch_that_fails_because_the_verifiers_own_peers_are_down_is_not_a_violation(tmp_path) -> None:
    """Only a storage peer answering that it lacks the model makes it the provider's violation; when every peer
    of the verifier is unreachable the verifier cannot tell, and judges nothing (its problem, not theirs)."""
    from agoranet.node.node import model_fetcher

    from ..conftest import free_port

    fetch = model_fetcher(tmp_path, [f"http://127.0.0.1:{free_port()}"])  # a closed port: connection refused
    verifier = ReplayVerifier(Identity.generate(), models=[], fetch=fetch)
    with pytest.raises(UnverifiableReceipt, match="cannot fetch model") as err:
        verifier.context_length(UNKNOWN_MODEL)
    assert not isinstance(err.value, Violation) and "unreachable" in str(err.value)


def test_a_receipt_declaring_another_class_than_its_offer_sells_is_refused_and_a_violation(tmp_path, caplog):
    """Sold as fp32, declared bf16 (looser tolerances): the gateway refuses to relay or pay it, and a verifier
    shown the provider's signed offer signs a violation."""
    gw, gateway = start_gateway(tmp_path / "gw")
    server, prov = start_provider(tmp_path / "p", ProviderOptions(threads=1), peers=[gw.url],
                                  gossip=GossipConfig(interval_s=FAST_GOSSIP))
    app, role = build_verifier_node(tmp_path / "verifier", VerifierConfig(audit_fraction=0.0))
    try:
        with BackgroundServer(app, bind()) as verifier:
            offer = prov.offer()
            assert offer.body.precision == "fp32"
            wait_for(lambda: asyncio.run(gateway.discovery.find_offers("agora-tiny")), what="the offer")
            prov.engine.precision = "bf16"  # from now on its receipts declare bf16; its signed offer still says fp32
            r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=60, json={
                "model": "agora-tiny", "messages": MSG, "max_tokens": 4, "seed": 3})
            assert r.status_code == 502 and "without a receipt bound to this request" in r.text, r.text
            assert "a receipt declaring model" in caplog.text and "'fp32'" in caplog.text  # unpaid, and why
            direct = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
                "model": "agora-tiny", "messages": MSG, "max_tokens": 4, "seed": 3}).json()["agora"]
            assert verify_record(direct["summary"]).body.precision == "bf16"
            judged = httpx.post(f"{verifier.url}/agora/v1/verify", timeout=60, json={
                "receipt_cid": direct["receipt_cid"], "node": server.url, "offer": offer.to_json()}).json()
            failure = judged["verdict"]["body"]["failure"]
            assert not judged["ok"] and failure["kind"] == "violation" and failure["detail"].startswith("offer: ")
            assert role.reputation.providers[str(prov.identity.peer_id)].excluded
    finally:
        server.stop()
        gw.stop()
