"""Adding to a store on a full disk: one clear error, and the store stays exactly as it was."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from agoranet.store import Blockstore


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def agora(*args: str, home) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agoranet.cli", *args], env=dict(os.environ, AGORA_HOME=str(home)),
                          capture_output=True, text=True, timeout=120)


def test_add_on_full_disk_fails_cleanly_and_keeps_the_store_consistent(tiny_disk, tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"kept\n" * 100)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))  # 3 MiB onto a 2 MiB disk
    ok = agora("store", "add", str(small), home=tiny_disk)
    assert ok.returncode == 0, ok.stderr

    full = agora("store", "add", str(big), home=tiny_disk)
    assert full.returncode == 1
    assert "No space left on device" in full.stderr and "Traceback" not in full.stderr

    with Blockstore(tiny_disk / "blocks") as store:
        assert store.verify_all() == []  # every listed block is whole and hashes to its CID
        cids = store.cids()
        assert all(store.has(c) for c in cids)
        assert len(store.pins()) == 1
        listed = {store.path_of(c) for c in cids}
    on_disk = {p for p in (tiny_disk / "blocks" / "data").rglob("*") if p.is_file()}
    assert on_disk == listed  # no half-written or unlisted block files left behind
    again = agora("store", "add", str(small), home=tiny_disk)  # still usable
    assert again.returncode == 0, again.stderr
