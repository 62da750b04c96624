"""Real storage peers for tests: uvicorn servers on 127.0.0.1, each in its own thread and event loop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from agoranet.core.identity import Identity
from agoranet.node.replication import StorageReplicator
from ..conftest import free_port
from agoranet.node.storage_api import StorageAccess, storage_app
from agoranet.store import Blockstore

OPERATOR = {"authorization": "Bearer test-operator-token"}  # what writes to these peers send


class StoragePeerServer:
    def __init__(self, root: Path, port: int, peers: list[str], recheck_interval: float) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.store = Blockstore(root)
        self.replicator = StorageReplicator(self.store, self.url, peers, recheck_interval=recheck_interval,
                                            state_path=root / "replicas.json", probe_timeout=1.0,
                                            identity=Identity.generate())
        app = storage_app(self.store, self.replicator, StorageAccess(operator_token=OPERATOR["authorization"][7:]))
        config = uvicorn.Config(app, host="127.0.0.1", port=port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"storage peer {self.url} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()

    @property
    def running(self) -> bool:
        return self.thread.is_alive()


@pytest.fixture
def storage_peers(tmp_path):
    """Start n storage peers that know each other; stops whatever is still running afterwards."""
    started: list[StoragePeerServer] = []

    def start(n: int, recheck_interval: float = 0.3) -> list[StoragePeerServer]:
        ports = [free_port() for _ in range(n)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        peers = [StoragePeerServer(tmp_path / f"peer{i}", port, urls, recheck_interval) for i, port in enumerate(ports)]
        for peer in peers:
            peer.start()
            started.append(peer)
        return peers

    yield start
    for peer in started:
        if peer.running:
            peer.stop()


def pinned_at(peer: StoragePeerServer, cid) -> bool:
    try:
        return httpx.get(f"{peer.url}/agora/v1/blocks/{cid}/pin").json()["pinned"]
    except httpx.TransportError:
        return False
