import asyncio
import itertools
import shutil

import httpx
import pytest

from agoranet.core.cid import cid_of
from agoranet.net.storage_client import FetchFailed, fetch_dag
from agoranet.node.replication import rendezvous_rank
from agoranet.store import Blockstore, add_path, export

from ..conftest import wait_for
from .storage_peers import OPERATOR, pinned_at

KiB = 1 << 10


@pytest.fixture
def model_dir(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(bytes((i * 7919) % 251 for i in range(700 * KiB)))
    (src / "config.json").write_bytes(b'{"hidden": 256}')
    return src


def dag_cids(store, root):
    return [str(cid) for cid, _ in store.walk(root)]


def test_rendezvous_rank_only_moves_what_a_lost_peer_held():
    peers = [f"http://10.0.0.{i}:80" for i in range(6)]
    for n in range(50):
        cid = cid_of(bytes([n]))
        full = rendezvous_rank(cid, peers)
        assert rendezvous_rank(cid, reversed(peers)) == full
        for gone in peers:
            assert rendezvous_rank(cid, [p for p in peers if p != gone]) == [p for p in full if p != gone]


@pytest.mark.slow
def test_k3_of_5_survives_any_two_losses_and_repairs_to_k_copies(storage_peers, model_dir, tmp_path):
    peers = storage_peers(5, recheck_interval=0.3)
    entry = peers[0]
    root = add_path(entry.store, model_dir, chunk_size=64 * KiB)  # 12 blocks
    blocks = dag_cids(entry.store, root)
    assert len(blocks) == 14

    r = httpx.post(f"{entry.url}/agora/v1/blocks/{root}/pin", json={"replicas": 3}, headers=OPERATOR, timeout=60)
    assert r.status_code == 200, r.text
    ranked = rendezvous_rank(root, [p.url for p in peers])
    assert sorted(r.json()["holders"]) == sorted(ranked[:3])
    by_url = {p.url: p for p in peers}
    wait_for(lambda: [p.url for p in peers if pinned_at(p, root)] == [u for u in by_url if u in ranked[:3]],
             timeout=15, what="the replicas")
    for url in ranked[:3]:
        assert all(by_url[url].store.has(c) for c in blocks)

    # Any 3 survivors can serve every block (real HTTP, only those three peers asked).
    for survivors in itertools.combinations(peers, 3):
        fresh = Blockstore(tmp_path / "fresh")
        stats = asyncio.run(fetch_dag(fresh, root, [p.url for p in survivors]))
        assert stats.blocks == len(blocks) and sorted(map(str, fresh.cids())) == sorted(blocks)
        fresh.close()
        shutil.rmtree(tmp_path / "fresh")

    # Kill the two highest-ranked holders: the worst case.
    for url in ranked[:2]:
        by_url[url].stop()
    alive = [p for p in peers if p.running]
    fresh = Blockstore(tmp_path / "after-loss")
    asyncio.run(fetch_dag(fresh, root, [p.url for p in alive]))
    export(fresh, root, tmp_path / "out")
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (model_dir / "weights.bin").read_bytes()

    # Repair: the survivors' periodic re-check restores 3 pinned, complete copies.
    wait_for(lambda: sum(pinned_at(p, root) for p in alive) == 3,
             timeout=15, what="the replicas")
    for p in alive:
        assert all(p.store.has(c) for c in blocks)


@pytest.mark.slow
def test_one_loss_moves_the_copy_to_the_next_ranked_peer(storage_peers, model_dir):
    peers = storage_peers(5, recheck_interval=0.3)
    root = add_path(peers[0].store, model_dir, chunk_size=64 * KiB)
    httpx.post(f"{peers[0].url}/agora/v1/blocks/{root}/pin", json={"replicas": 3}, headers=OPERATOR,
               timeout=60).raise_for_status()
    ranked = rendezvous_rank(root, [p.url for p in peers])
    by_url = {p.url: p for p in peers}
    wait_for(lambda: {p.url for p in peers if pinned_at(p, root)} == set(ranked[:3]),
             timeout=15, what="the replicas")
    by_url[ranked[1]].stop()
    expected = {ranked[0], ranked[2], ranked[3]}
    wait_for(lambda: {p.url for p in peers if p.running and pinned_at(p, root)} == expected,
             timeout=15, what="the replicas")


def test_flipped_byte_on_disk_is_detected_on_read_and_healed_from_a_peer(storage_peers, tmp_path):
    peers = storage_peers(3, recheck_interval=3600)
    data = bytes(range(256)) * 4096  # 1 MiB: one raw block
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    root = add_path(peers[0].store, src)
    httpx.post(f"{peers[0].url}/agora/v1/blocks/{root}/pin", json={"replicas": 3}, headers=OPERATOR,
               timeout=60).raise_for_status()
    victim = peers[1]
    block_file = victim.store.path_of(root)
    raw = bytearray(block_file.read_bytes())
    raw[12345] ^= 0x40
    block_file.write_bytes(bytes(raw))

    r = httpx.get(f"{victim.url}/agora/v1/blocks/{root}")
    assert r.status_code == 200 and r.content == data
    assert block_file.read_bytes() == data
    quarantined = list(victim.store.quarantine_dir.iterdir())
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == bytes(raw)


def test_periodic_recheck_heals_corruption_nobody_read(storage_peers, tmp_path):
    peers = storage_peers(2, recheck_interval=0.2)
    src = tmp_path / "f.bin"
    src.write_bytes(b"keep me safe" * 1000)
    root = add_path(peers[0].store, src)
    httpx.post(f"{peers[0].url}/agora/v1/blocks/{root}/pin", json={"replicas": 2}, headers=OPERATOR,
               timeout=60).raise_for_status()
    block_file = peers[1].store.path_of(root)
    block_file.write_bytes(b"X" + block_file.read_bytes()[1:])
    wait_for(lambda: block_file.exists() and block_file.read_bytes() == src.read_bytes(),
             timeout=15, what="the replicas")
    assert len(list(peers[1].store.quarantine_dir.iterdir())) == 1


def test_block_api_rejects_forgeries_and_bad_cids(storage_peers):
    (peer,) = storage_peers(1, recheck_interval=3600)
    cid = cid_of(b"real")
    assert httpx.put(f"{peer.url}/agora/v1/blocks/{cid}", content=b"fake", headers=OPERATOR).status_code == 400
    assert httpx.head(f"{peer.url}/agora/v1/blocks/{cid}").status_code == 404
    assert httpx.put(f"{peer.url}/agora/v1/blocks/{cid}", content=b"real", headers=OPERATOR).status_code == 201
    assert httpx.head(f"{peer.url}/agora/v1/blocks/{cid}").status_code == 200
    assert httpx.get(f"{peer.url}/agora/v1/blocks/{cid}").content == b"real"
    assert httpx.post(f"{peer.url}/agora/v1/blocks/has", json={"cids": [str(cid), str(cid_of(b"x"))]}).json() == \
        {"has": [True, False]}
    r = httpx.get(f"{peer.url}/agora/v1/blocks/not-a-cid")
    assert r.status_code == 400 and r.json()["detail"]["error"]["code"] == "invalid_cid"


def test_fetch_from_peers_without_the_block_fails_clearly(storage_peers, tmp_path):
    (peer,) = storage_peers(1, recheck_interval=3600)
    with pytest.raises(FetchFailed, match="could supply"):
        asyncio.run(fetch_dag(Blockstore(tmp_path / "s"), cid_of(b"nobody has this"), [peer.url]))
