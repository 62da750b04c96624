"""`agora log …` against real nodes on loopback: honest logs pass, tampering, forgery and forks fail."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from typer.testing import CliRunner

from agoranet.cli.console import CHECK_FAILED, UNREACHABLE
from agoranet.cli.log_cmd import log_app
from agoranet.core.identity import Identity
from agoranet.core.records import sign_record
from agoranet.log.credits import CreditLedger, provider, user
from agoranet.log.records import CreditMoveBody, TreeHeadBody
from agoranet.log.transparency import TransparencyLog
from agoranet.node.log_api import log_router
from agoranet.node.server import BackgroundServer

from ..conftest import free_port

runner = CliRunner()


def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` on a free loopback port in a thread; yield its base URL; stop it afterwards."""
    with BackgroundServer(app) as server:
        yield server.url


@pytest.fixture
def node(tmp_path: Path):
    """Start a node serving a given log (optionally through extra routes that shadow the real ones)."""
    stack = []

    def start(tlog: TransparencyLog, app: FastAPI | None = None) -> str:
        app = app or FastAPI()
        app.include_router(log_router(tlog))
        gen = serve(app)
        stack.append(gen)
        return next(gen)

    yield start
    for gen in stack:
        gen.close()


def moves(identity: Identity, n: int, tag: str) -> list[bytes]:
    return [
        sign_record(identity, CreditMoveBody(seq=1000 + i, kind="fund", debit="operator", credit=f"user:{tag}",
                                             amount=1, timestamp_ms=0)).encode()
        for i in range(n)
    ]


def honest_log(path: Path, identity: Identity) -> TransparencyLog:
    tlog = TransparencyLog(path, identity)
    ledger = CreditLedger(tlog)
    ledger.mint(1_000)
    for i in range(4):
        ledger.fund(user(f"u{i}"), 100)
        ledger.hold(f"q{i}", user(f"u{i}"), 60)
        ledger.settle(f"q{i}", provider("12D3KooWP"), 40)
    return tlog


def invoke(*args: str):
    return runner.invoke(log_app, list(args), catch_exceptions=False)


def test_an_honest_log_passes_every_check(tmp_path: Path, node) -> None:
    identity = Identity.generate()
    tlog = honest_log(tmp_path / "log.db", identity)
    url = node(tlog)
    saved = tmp_path / "head.json"
    result = invoke("head", url, "--size", "5", "--save", str(saved))
    assert result.exit_code == 0 and "signature valid" in result.output and str(identity.peer_id) in result.output
    cid = str(tlog.entry(7).cid)
    result = invoke("verify-inclusion", url, cid)
    assert result.exit_code == 0 and f"{cid} is entry 7 of {tlog.size}" in result.output
    result = invoke("verify-consistency", url, str(saved), str(tlog.size))
    assert result.exit_code == 0 and f"size {tlog.size} extends size 5" in result.output
    result = invoke("audit", url, "--known-head", str(saved))
    assert result.exit_code == 0, result.output
    assert f"{tlog.size} entries" in result.output and f"{tlog.size} signatures valid" in result.output


def test_a_tampered_entry_fails_the_audit(tmp_path: Path, node) -> None:
    identity = Identity.generate()
    honest_log(tmp_path / "log.db", identity).close()
    db = sqlite3.connect(tmp_path / "log.db")
    (data,) = db.execute("SELECT record FROM entries WHERE idx = 3").fetchone()  # settles request q0
    assert b"q0" in data
    db.execute("UPDATE entries SET record = ? WHERE idx = 3", (data.replace(b"q0", b"q7"),))
    db.commit()
    db.close()
    url = node(TransparencyLog(tmp_path / "log.db", identity))
    result = invoke("audit", url)
    assert result.exit_code == CHECK_FAILED
    assert "tampered entry 3" in result.output and "do not trust this log" in result.output


def test_a_forged_head_fails_every_command(tmp_path: Path, node) -> None:
    identity, forger = Identity.generate(), Identity.generate()
    tlog = honest_log(tmp_path / "log.db", identity)
    real = tlog.head().to_json()
    app = FastAPI()

    @app.get("/agora/v1/log/head")
    def forged_head() -> dict:  # the honest log's head with a doctored root: signature breaks
        return {**real, "body": {**real["body"], "root": "ab" * 32}}

    url = node(tlog, app)
    for args in (("head", url), ("audit", url), ("verify-inclusion", url, str(tlog.entry(0).cid))):
        result = invoke(*args)
        assert result.exit_code == CHECK_FAILED and "forged or malformed tree head" in result.output, args

    # a head signed by another key in the log's name is just as forged
    other = FastAPI()
    body = TreeHeadBody(log_id=str(identity.peer_id), size=tlog.size, root=real["body"]["root"], timestamp_ms=1)

    @other.get("/agora/v1/log/head")
    def impostor_head() -> dict:
        return sign_record(forger, body).to_json()

    result = invoke("audit", node(tlog, other))
    assert result.exit_code == CHECK_FAILED and "signed by another key" in result.output


def test_a_head_signed_over_entries_it_does_not_match_fails_the_audit(tmp_path: Path, node) -> None:
    identity = Identity.generate()
    tlog = honest_log(tmp_path / "log.db", identity)
    app = FastAPI()

    @app.get("/agora/v1/log/head")
    def lying_head() -> dict:  # validly signed by the log, but over a root its entries do not give
        return sign_record(identity, TreeHeadBody(
            log_id=str(identity.peer_id), size=tlog.size, root="cd" * 32, timestamp_ms=1,
        )).to_json()

    result = invoke("audit", node(tlog, app))
    assert result.exit_code == CHECK_FAILED and "forged head or altered entries" in result.output


def test_a_fork_is_caught_against_a_saved_head(tmp_path: Path, node) -> None:
    identity = Identity.generate()
    common = moves(identity, 10, "a")
    with TransparencyLog(tmp_path / "a.db", identity) as honest:
        honest.append_many(common + moves(identity, 10, "b"))
        saved = tmp_path / "seen.json"
        saved.write_text(json.dumps(honest.head(15).to_json()))
    forked = TransparencyLog(tmp_path / "b.db", identity)  # same key, history rewritten after entry 10
    forked.append_many(common + moves(identity, 12, "c"))
    url = node(forked)
    result = invoke("audit", url, "--known-head", str(saved))
    assert result.exit_code == CHECK_FAILED and "fork" in result.output and "rewrote its history" in result.output
    result = invoke("verify-consistency", url, str(saved), "22")
    assert result.exit_code == CHECK_FAILED and "fork: log" in result.output and "stop trusting" in result.output


def test_an_unreachable_node_is_one_clear_line(tmp_path: Path) -> None:
    result = invoke("head", f"http://127.0.0.1:{free_port()}")
    assert result.exit_code == UNREACHABLE
    assert result.output.count("\n") == 1 and "cannot reach" in result.output


def test_exit_statuses_separate_bad_input_from_bad_logs_and_dead_nodes(tmp_path: Path, node) -> None:
    """1: what the user gave is wrong (a refused size, an unreadable saved head); 3: the log is caught
    (above); 4: no node answered (above). The same statuses hold for every command (console.py)."""
    identity = Identity.generate()
    tlog = honest_log(tmp_path / "log.db", identity)
    url = node(tlog)
    refused = invoke("head", url, "--size", str(tlog.size + 5))
    assert refused.exit_code == 1 and "answered 400" in refused.output, refused.output
    missing = invoke("verify-consistency", url, str(tmp_path / "nowhere.json"), str(tlog.size))
    assert missing.exit_code == 1 and "cannot read a saved head" in missing.output, missing.output
    assert invoke("head").exit_code == 2  # click's own usage error: the URL is missing
