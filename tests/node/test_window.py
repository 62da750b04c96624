"""The per-provider window test at bf16 (verify.window), with real nodes on 127.0.0.1: a cheater steering its
greedy answers among near ties passes every per-sequence check, yet a verifier following its feed signs a window
proof naming its receipts, which excludes it, and which another verifier re-checks by replay; an honest bf16
provider answering the same requests fills windows without one."""

from __future__ import annotations

import json

import httpx
import pytest
from typer.testing import CliRunner

from agoranet.cli.verify_cmd import verify_app
from agoranet.core.identity import Identity
from agoranet.core.records import ReceiptBody, decode_record, verify_record
from agoranet.engine.models import model_cid, resolve_model
from agoranet.node.judge import ReplayVerifier
from agoranet.node.node import ProviderOptions
from agoranet.node.verifier import VerifierConfig
from agoranet.verify.tolerances import default_tolerances, tolerance_for
from agoranet.verify.window import window_test

from ..conftest import wait_for

WORDS = ["list", "sort", "tree", "file", "json", "loop", "sum", "graph", "cache", "string", "queue", "date"]


def _window_size() -> int:
    test = window_test(tolerance_for(default_tolerances(model_cid(resolve_model("agora-tiny")[0])).body, "bf16"))
    assert test is not None, "the shipped record must carry bf16's window test"
    return test.size


def _ask(url: str, n: int) -> None:
    for i in range(n):
        prompt = f"def {WORDS[i % len(WORDS)]}_{i}(items):\n    # {WORDS[(i * 5 + 3) % len(WORDS)]} them\n"
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "agora-tiny", "prompt": prompt, "max_tokens": 64, "temperature": 0})
        assert r.status_code == 200, r.text


@pytest.mark.slow
def test_a_bf16_near_tie_cheater_passing_every_sequence_check_is_caught_by_its_window(nodes, tmp_path) -> None:
    size = _window_size()
    p, prov = nodes.provider("cheater", ProviderOptions(threads=1, precision="bf16", cheat="near_ties"))
    peer = str(prov.identity.peer_id)
    v, role = nodes.verifier(config=VerifierConfig(audit_fraction=1.0, seed=0, sources=(p.url,), poll_interval_s=0.2))
    _ask(p.url, 2 * size)
    wait_for(lambda: role.audited >= 2 * size, timeout=300, what="every receipt audited")
    verdicts = [decode_record(d).body for _, _, d in role.state.since("verdict", 0, 1000)]
    assert len(verdicts) == 2 * size and all(x.ok for x in verdicts), [x.failure for x in verdicts if not x.ok]
    assert role.state.count("fraud-proof") == 0  # every receipt passes the per-position and per-sequence checks
    assert role.window_proofs >= 1
    standing = role.reputation.providers[peer]
    assert standing.excluded and standing.window_proofs and not standing.fraud_proofs
    rep = httpx.get(f"{v.url}/agora/v1/reputation").json()["providers"][peer]
    assert rep["excluded"] and rep["score"] == 0.0

    feed = httpx.get(f"{v.url}/agora/v1/window-proofs").json()["window_proofs"]
    proof = feed[0]["record"]
    body = proof["body"]
    assert body["provider"] == peer and body["precision"] == "bf16" and len(body["receipt_cids"]) == size
    assert body["total"] > body["window"]["limit"]
    # another verifier (its own model and the same shipped record) re-checks it by replaying the receipts
    other, other_role = nodes.verifier("other")
    r = httpx.post(f"{other.url}/agora/v1/window-proofs", json={"record": proof}, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["holds"] is True and r.json()["provider"] == peer, r.json()
    assert other_role.reputation.providers[peer].excluded
    # and so does `agora verify check --fraud-proof FILE`, given the window proof
    (tmp_path / "window.json").write_text(json.dumps(proof))
    cli = CliRunner().invoke(verify_app, ["check", "--fraud-proof", str(tmp_path / "window.json"), "--home",
                                          str(tmp_path / "cli")], catch_exceptions=False)
    assert cli.exit_code == 0 and "window proof holds" in cli.stdout, cli.stdout


@pytest.mark.slow
def test_an_honest_bf16_provider_fills_windows_without_a_window_proof(nodes) -> None:
    size = _window_size()
    p, prov = nodes.provider("honest", ProviderOptions(threads=1, precision="bf16"))
    peer = str(prov.identity.peer_id)
    v, role = nodes.verifier(config=VerifierConfig(audit_fraction=1.0, seed=0, sources=(p.url,), poll_interval_s=0.2))
    _ask(p.url, 2 * size)
    wait_for(lambda: role.audited >= 2 * size, timeout=300, what="every receipt audited")
    assert role.window_proofs == 0 and role.state.count("window-proof") == 0
    assert not role.reputation.providers[peer].excluded
    assert role.reputation.providers[peer].passed == 2 * size

    # A verifier forging a window proof against it (honest receipts, made-up scores) is found out by the re-check:
    # the replayed excesses stay within the limit, the proof is stored as false, its issuer marked, nobody excluded.
    receipts = [verify_record(d, ReceiptBody) for _, _, d in role.state.since("audited-receipt", 0, size)]
    entries = [(r, role.state.get(r.body.request)[1], 1.0) for r in receipts]
    forger = Identity.generate()
    forged = ReplayVerifier(forger).window_proof(entries)
    assert forged.body.total > forged.body.window.limit
    r = httpx.post(f"{v.url}/agora/v1/window-proofs", json={"record": forged.to_json()}, timeout=300)
    assert r.status_code == 200 and r.json()["holds"] is False, r.text
    assert "the proof claimed" in r.json()["detail"]
    assert role.state.count("false-window-proof") == 1 and not role.reputation.providers[peer].excluded
    assert role.reputation.verifiers[str(forger.peer_id)].false_proofs == [str(forged.cid)]


def test_an_open_window_survives_a_restart_and_closes_at_its_size(tmp_path) -> None:
    from agoranet.node.state import NodeState

    key = ("peer", "bafymodel", "bf16")
    state = NodeState(tmp_path / "state.db")
    assert [state.window_add(key, f"r{i}", 0.1 * i, 4) for i in range(3)] == [[], [], []]
    assert state.window_add(key, "r1", 9.0, 4) == []  # a receipt already in the open window counts once
    assert state.window_add(("other", "bafymodel", "bf16"), "x", 1.0, 4) == []  # windows are per provider and class
    state.close()
    state = NodeState(tmp_path / "state.db")
    assert state.window_add(key, "r3", 0.3, 4) == [("r0", 0.0), ("r1", 0.1), ("r2", 0.2), ("r3", 0.3)]
    assert state.window_add(key, "r4", 0.4, 4) == []  # the closed window's receipts are gone; a new one opens
    state.close()
