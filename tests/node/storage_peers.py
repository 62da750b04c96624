"""Real storage peers for tests: uvicorn servers on 127.0.0.1, each in its own thread and event loop."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from agoranet.core.identity import Identity
from agoranet.node.replication import StorageReplicator
from agoranet.node.server import BackgroundServer, bind, url_of
from agoranet.node.storage_api import StorageAccess, storage_app
from agoranet.store import Blockstore

OPERATOR = {"authorization": "Bearer test-operator-token"}  # what writes to these peers send


class StoragePeerServer:
    """A storage peer's app on a socket bound up front (peers know each other's URLs before any starts)."""

    def __init__(self, root: Path, sock: socket.socket, peers: list[str], recheck_interval: float) -> None:
        self.url = url_of(sock)
        self.store = Blockstore(root)
        self.replicator = StorageReplicator(self.store, self.url, peers, recheck_interval=recheck_interval,
                                            state_path=root / "replicas.json", probe_timeout=1.0,
                                            identity=Identity.generate())
        app = storage_app(self.store, self.replicator, StorageAccess(operator_token=OPERATOR["authorization"][7:]))
        self.server = BackgroundServer(app, sock)

    def start(self) -> None:
        self.server.start(timeout=10)

    def stop(self) -> None:
        self.server.stop()
        assert not self.server.running

    @property
    def running(self) -> bool:
        return self.server.running


@pytest.fixture
def storage_peers(tmp_path):
    """Start n storage peers that know each other; stops whatever is still running afterwards."""
    started: list[StoragePeerServer] = []

    def start(n: int, recheck_interval: float = 0.3) -> list[StoragePeerServer]:
        socks = [bind() for _ in range(n)]
        urls = [url_of(s) for s in socks]
        peers = [StoragePeerServer(tmp_path / f"peer{i}", sock, urls, recheck_interval) for i, sock in enumerate(socks)]
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
