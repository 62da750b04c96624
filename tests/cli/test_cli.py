"""The `agora` command as users run it: a real process, real exit codes, messages a person can act on."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest


def agora(*args: str, home: Path | None = None, timeout: float = 120,
          p2pd: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if home is not None:
        env["AGORA_HOME"] = str(home)
    if p2pd is not None:
        env["AGORA_P2PD"] = p2pd
    return subprocess.run([sys.executable, "-m", "agoranet.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_the_commands():
    r = agora("--help")
    assert r.returncode == 0
    for command in ("init", "provide", "demo", "id"):
        assert command in r.stdout


def test_init_creates_a_private_identity_and_refuses_to_overwrite(tmp_path):
    r = agora("init", home=tmp_path)
    assert r.returncode == 0, r.stderr
    key = tmp_path / "identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    peer = agora("id", home=tmp_path).stdout.strip()
    assert peer.startswith("12D3KooW") and peer in r.stdout
    assert "PRIVATE KEY" not in r.stdout + r.stderr

    again = agora("init", home=tmp_path)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--force" in again.stderr and "Traceback" not in again.stderr
    assert agora("id", home=tmp_path).stdout.strip() == peer

    forced = agora("init", "--force", home=tmp_path)
    assert forced.returncode == 0 and agora("id", home=tmp_path).stdout.strip() != peer


def test_corrupted_or_missing_key_file_gives_one_clear_line(tmp_path):
    missing = agora("id", home=tmp_path)
    assert missing.returncode == 1 and "agora init" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "identity.key").write_text("not a key\n")
    r = agora("id", home=tmp_path)
    assert r.returncode == 1
    assert "not a readable Ed25519 private key" in r.stderr and "Traceback" not in r.stderr
    provide = agora("provide", "--port", "0", home=tmp_path)
    assert provide.returncode == 1 and "not a readable Ed25519" in provide.stderr


@pytest.mark.slow
def test_provide_explains_bad_options(tmp_path):
    r = agora("provide", "--model", str(tmp_path / "nowhere"), "--port", "0", home=tmp_path)
    assert r.returncode == 1 and "no model" in r.stderr and "Traceback" not in r.stderr
    r = agora("provide", "--precision", "fp7", "--port", "0", home=tmp_path)
    assert r.returncode == 1 and "unknown precision" in r.stderr
    # fp16 loads, but no tolerance record covers it: nobody could judge what it sells, so it does not start
    r = agora("provide", "--precision", "fp16", "--port", "0", home=tmp_path)
    assert r.returncode == 1 and "no tolerance record covers" in r.stderr and "'fp16'" in r.stderr, r.stderr
    assert "agora verify calibrate" in r.stderr and "--tolerances" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = agora("provide", "--port", str(port), home=tmp_path)
    assert r.returncode == 1 and "cannot listen" in r.stderr and "--port" in r.stderr


def test_discovery_options_that_do_not_fit_and_a_missing_daemon_are_one_clear_line(tmp_path):
    r = agora("gateway", "--bootstrap", "/ip4/127.0.0.1/tcp/1", "--port", "0", home=tmp_path)
    assert r.returncode == 1 and "--bootstrap is for --discovery libp2p" in r.stderr and "Traceback" not in r.stderr
    r = agora("provide", "--discovery", "libp2p", "--peer", "http://127.0.0.1:1", "--port", "0", home=tmp_path)
    assert r.returncode == 1 and "--peer seeds HTTP gossip" in r.stderr
    r = agora("node", "--roles", "gateway", "--discovery", "carrier-pigeon", "--port", "0", home=tmp_path)
    assert r.returncode == 1 and "give http or libp2p" in r.stderr
    r = agora("gateway", "--discovery", "libp2p", "--p2p-nat", "teleport", "--port", "0", home=tmp_path)
    assert r.returncode == 1 and "autonat, port-map" in r.stderr
    r = agora("gateway", "--discovery", "libp2p", "--port", "0", home=tmp_path, p2pd=str(tmp_path / "no-p2pd"))
    assert r.returncode == 1 and "pip install 'agoranet[p2p]'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_demo_runs_twice_and_leaves_nothing_behind(tmp_path):
    for _ in range(2):
        r = agora("demo", "--max-tokens", "24", home=tmp_path, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "receipt bafyrei" in r.stdout and "signature valid" in r.stdout
        assert "decode to the answer: yes" in r.stdout
        # What it is doing while models load, before the network is up.
        steps = [r.stdout.index(s) for s in ("starting a verifier", "gateway up at", "starting provider-a",
                                             "starting provider-b", "waiting for the gateway", "network up in")]
        assert steps == sorted(steps)
    assert list(tmp_path.iterdir()) == []  # the demo keeps its state in a temporary directory


@pytest.mark.slow
def test_demo_cheater_is_caught_proven_and_cut_off(tmp_path):
    r = agora("demo", "--cheater", "--max-tokens", "24", home=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "served by the cheater after" in r.stdout and "fraud proof bafyrei" in r.stdout
    assert "re-checked by a third party" in r.stdout and "holds" in r.stdout
    assert "the cheater gets no more traffic" in r.stdout, r.stdout


@pytest.mark.parametrize("flag", ["--price-in", "--price-out"])
def test_a_negative_price_is_refused_before_anything_starts(tmp_path, flag):
    r = agora("provide", flag, "-5", "--port", "1", home=tmp_path)
    said = " ".join(r.stderr.replace("│", " ").split())  # typer draws its error in a box, wrapped at any width
    assert r.returncode == 2 and flag in said and ("x>=0" in said or "greater than or equal to 0" in said), said
    assert "Traceback" not in r.stderr and not (tmp_path / "log.db").exists()
