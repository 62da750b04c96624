import asyncio
import os
import socket

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import Response
from typer.testing import CliRunner

from agoranet.cli.store_cmd import store_app
from agoranet.core.cid import cid_of
from agoranet.net.storage_client import FetchFailed, FetchStats, fetch_dag
from agoranet.wire.storage import BLOCKS
from agoranet.node.app import create_app
from agoranet.node.server import BackgroundServer, bind
from agoranet.node.storage_role import StorageRole
from agoranet.store import Blockstore, KuboClient, add_path
from agoranet.store.errors import CorruptBlock

from .. import kubo_daemon
from ..conftest import operator

kubo = kubo_daemon.kubo  # the fixture: a real kubo daemon, or the test is skipped with the reason
KiB = 1 << 10


def seed(peers, tmp_path, size=900 * KiB):
    src = tmp_path / "blob.bin"
    src.write_bytes(bytes((i * 31) % 253 for i in range(size)))
    roots = {add_path(p.store, src, chunk_size=32 * KiB) for p in peers}
    assert len(roots) == 1
    return roots.pop(), src


def test_fetch_spreads_blocks_over_every_peer_and_verifies_them(storage_peers, tmp_path):
    peers = storage_peers(3, recheck_interval=3600)
    root, src = seed(peers, tmp_path)
    seen = []
    store = Blockstore(tmp_path / "client")
    stats = asyncio.run(fetch_dag(store, root, [p.url for p in peers], progress=lambda d, t: seen.append((d, t))))
    assert stats.blocks == 30  # 29 leaves of 32 KiB and the root
    assert set(stats.by_peer) == {p.url for p in peers} and min(stats.by_peer.values()) >= 3
    assert seen[-1][0] == seen[-1][1]  # progress ends at the total the root announced
    assert store.missing(root) == []


def test_cli_fetch_shows_progress_and_pins(storage_peers, tmp_path):
    peers = storage_peers(2, recheck_interval=3600)
    root, src = seed(peers, tmp_path)
    home = tmp_path / "home"
    r = CliRunner().invoke(store_app, ["fetch", str(root), "--peer", peers[0].url, "--peer", peers[1].url,
                                       "--home", str(home)])
    assert r.exit_code == 0, r.output
    assert f"fetched {root}" in r.output
    r = CliRunner().invoke(store_app, ["cat", str(root), "--home", str(home)])
    assert r.stdout_bytes == src.read_bytes()
    assert str(root) in CliRunner().invoke(store_app, ["pins", "--home", str(home)]).output


def test_cli_fetch_from_a_dead_peer_fails_in_one_line(tmp_path):
    r = CliRunner().invoke(store_app, ["fetch", "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4",
                                       "--peer", "http://127.0.0.1:9", "--home", str(tmp_path)])
    assert r.exit_code == 1 and "could supply" in r.output


@pytest.fixture
def lying_peer():
    """A storage peer that answers every block request with bytes that do not match the CID."""
    app = FastAPI()

    @app.get(BLOCKS + "/{cid}")
    async def block(cid: str) -> Response:
        return Response(b"not the block you asked for " + cid.encode(), media_type="application/octet-stream")

    with BackgroundServer(app, bind()) as server:
        yield server.url


def test_a_peer_serving_wrong_blocks_is_refused_counted_and_routed_around(storage_peers, lying_peer, tmp_path):
    [honest] = storage_peers(1, recheck_interval=3600)
    root, src = seed([honest], tmp_path)
    store = Blockstore(tmp_path / "client")
    stats = asyncio.run(fetch_dag(store, root, [lying_peer, honest.url], streams_per_peer=1))
    assert store.missing(root) == [] and store.verify_all() == []
    assert stats.forged[lying_peer] >= 1 and set(stats.by_peer) == {honest.url}

    only_liar = FetchStats()
    with pytest.raises(FetchFailed):
        asyncio.run(fetch_dag(Blockstore(tmp_path / "c2"), root, [lying_peer], stats=only_liar))
    assert only_liar.forged[lying_peer] == 1 and len(Blockstore(tmp_path / "c2").cids()) == 0


def test_storage_role_counts_forged_blocks_in_its_metrics(lying_peer, tmp_path):
    role = StorageRole(tmp_path / "peer", "http://127.0.0.1:9", [lying_peer])
    cid = role.store.put(b"a block that will rot on disk")
    role.store.path_of(cid).write_bytes(b"rotten")
    with pytest.raises(CorruptBlock):  # healing asks the liar, whose copy is refused
        role.store.get(cid)
    assert role.metrics()["store_forged_blocks_total"] == 1
    role.store.close()


def test_storage_peer_whose_kubo_dies_refuses_puts_and_keeps_nothing(tmp_path):
    with socket.socket() as closed:  # bound, not listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        role = StorageRole(tmp_path / "peer", "http://127.0.0.1:1", [])
        role.store.kubo = KuboClient(f"http://127.0.0.1:{closed.getsockname()[1]}")  # as if kubo died after start
        data = b"a block for kubo"
        with BackgroundServer(create_app([role], max_request_bytes=1 << 20)) as peer:
            r = httpx.put(f"{peer.url}{BLOCKS}/{cid_of(data)}", content=data, headers=operator(tmp_path / "peer"))
            assert r.status_code == 502 and r.json()["error"]["code"] == "kubo_failed"
            assert "ipfs daemon" in r.json()["error"]["message"]
            assert not role.store.has(cid_of(data))
            r = httpx.get(f"{peer.url}{BLOCKS}/{cid_of(b'not here')}")
            assert r.status_code == 502 and str(closed.getsockname()[1]) in r.json()["error"]["message"]
        role.store.close()


def test_storage_peer_mirrors_to_kubo_and_serves_what_kubo_holds(kubo, tmp_path):
    role = StorageRole(tmp_path / "peer", "http://127.0.0.1:1", [], kubo_rpc=kubo.rpc_url)
    pushed, pinned_in_kubo = os.urandom(1000), os.urandom(1000)
    kubo_cid = kubo.ipfs("block", "put", "--cid-codec=raw", input=pinned_in_kubo).decode().strip()
    with BackgroundServer(create_app([role], max_request_bytes=1 << 20)) as peer:
        assert httpx.put(f"{peer.url}{BLOCKS}/{cid_of(pushed)}", content=pushed,
                         headers=operator(tmp_path / "peer")).status_code == 201
        assert kubo.ipfs("block", "get", str(cid_of(pushed))) == pushed
        r = httpx.get(f"{peer.url}{BLOCKS}/{kubo_cid}")
        assert r.status_code == 200 and r.content == pinned_in_kubo
    role.store.close()
