"""Two verifiers that calibrated different models behind one gateway: each is handed only the receipts of the
classes it holds, so neither signs a violation for a class the other sells, and an honest provider stays in."""

from __future__ import annotations

import httpx

from agoranet.net.gossip import GossipConfig
from agoranet.node.node import ProviderOptions, build_verifier_node
from agoranet.node.server import BackgroundServer, bind, url_of
from agoranet.node.verifier import VerifierConfig

from ..conftest import FAST_GOSSIP, start_gateway, start_provider, wait_for


def test_a_verifier_is_handed_only_the_classes_it_holds(tmp_path, real_model, real_model_tolerances) -> None:
    tiny_sock, bpe_sock = bind(), bind()
    gw, gateway = start_gateway(tmp_path / "gw", reputation_interval_s=0.3,
                                verifiers=(url_of(tiny_sock), url_of(bpe_sock)))
    server, prov = start_provider(tmp_path / "p", ProviderOptions(threads=1), peers=[gw.url],
                                  gossip=GossipConfig(interval_s=FAST_GOSSIP))
    peer = str(prov.identity.peer_id)
    tiny_app, tiny = build_verifier_node(tmp_path / "v-tiny", VerifierConfig(audit_fraction=1.0, seed=0))
    bpe_app, bpe = build_verifier_node(tmp_path / "v-bpe", VerifierConfig(audit_fraction=1.0, seed=0),
                                       models=[str(real_model)], tolerance_files=[real_model_tolerances])
    try:
        with BackgroundServer(tiny_app, tiny_sock), BackgroundServer(bpe_app, bpe_sock):
            wait_for(lambda: peer in gateway.discovery.members(), what="the provider")
            wait_for(lambda: len(gateway.verifiers._held) == 2, what="both verifiers' classes")
            for seed in range(3):
                r = httpx.post(f"{gw.url}/v1/chat/completions", timeout=60, json={
                    "model": "agora-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                    "seed": seed})
                assert r.status_code == 200, r.text
            wait_for(lambda: tiny.audited >= 3, what="the agora-tiny verifier's audits")
            assert bpe.audited == 0 and bpe.violations == 0  # it holds no agora-tiny tolerances: never handed one
            assert tiny.violations == 0 and tiny.reputation.providers[peer].passed >= 3
            assert not gateway.verifiers.excluded(peer)
    finally:
        server.stop()
        gw.stop()


def test_a_verifier_following_a_feed_judges_only_the_classes_it_holds(nodes, tmp_path) -> None:
    """Not through a gateway: a verifier that calibrated agora-tiny at fp32 only, following an honest bf16
    provider's feed (the shipped record covers bf16, another verifier may hold it), skips its receipts and
    counts them; it used to sign each a 'not calibrated' violation that excluded the provider. A stranger
    posting those receipts to it is refused the same way, instead of getting them signed as violations."""
    from agoranet.core.records import ReceiptBody, verify_record

    from ..conftest import FULL, tolerance_file

    fp32_only = tolerance_file(tmp_path / "fp32.json", {"fp32": {}})
    p, prov = nodes.provider(opts=ProviderOptions(threads=1, precision="bf16"))
    peer = str(prov.identity.peer_id)
    v, role = nodes.verifier(config=VerifierConfig(audit_fraction=1.0, seed=0, sources=(p.url,), poll_interval_s=0.2),
                             tolerance_files=[fp32_only])
    answers = []
    for seed in range(2):
        r = httpx.post(f"{p.url}/v1/chat/completions", timeout=60, json={
            "model": "agora-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "seed": seed}
            | FULL)
        assert r.status_code == 200, r.text
        answers.append(r.json()["agora"])
    assert verify_record(answers[0]["receipt"], ReceiptBody).body.precision == "bf16"
    wait_for(lambda: role.not_judged >= 2, what="the feed's receipts, skipped")
    assert (role.audited, role.violations) == (0, 0) and peer not in role.reputation.providers
    for path, extra in (("receipts", {}), ("verify", {"request": answers[1]["request"]})):
        r = httpx.post(f"{v.url}/agora/v1/{path}", json={"receipt": answers[1]["receipt"]} | extra)
        assert r.status_code == 400 and r.json()["error"]["code"] == "receipt_not_replayable", r.text
        assert "holds no tolerance record for model" in r.json()["error"]["message"]
    assert (role.audited, role.violations) == (0, 0)
