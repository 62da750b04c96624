import pytest

from agoranet.core.cid import DAG_CBOR, cid_of
from agoranet.store import (
    BlockMismatch, BlockNotFound, Blockstore, CorruptBlock, PinError, add_bytes, add_path, cat,
)

MiB = 1 << 20


def flip_byte(path, offset=0):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_blocks_round_trip_and_survive_reopening(tmp_path):
    with Blockstore(tmp_path) as store:
        cid = store.put(b"abc")
        assert store.get(cid) == b"abc" and store.has(cid) and store.size(cid) == 3
        assert store.path_of(cid).parent.parent == tmp_path / "data"
    with Blockstore(tmp_path) as store:
        assert store.get(str(cid)) == b"abc"


def test_put_block_rejects_bytes_that_do_not_hash_to_the_cid(tmp_path):
    store = Blockstore(tmp_path)
    with pytest.raises(BlockMismatch):
        store.put_block(cid_of(b"right"), b"wrong")
    assert not store.has(cid_of(b"right"))


def test_flipped_byte_is_detected_and_quarantined(tmp_path):
    store = Blockstore(tmp_path)
    cid = store.put(b"precious bytes")
    flip_byte(store.path_of(cid), 3)
    with pytest.raises(CorruptBlock):
        store.get(cid)
    assert not store.has(cid)
    quarantined = list((tmp_path / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(str(cid))
    with pytest.raises(BlockNotFound):
        store.get(cid)


def test_corrupt_block_is_healed_through_the_fetcher(tmp_path):
    good = {}
    store = Blockstore(tmp_path, fetcher=lambda cid: good[str(cid)])
    cid = store.put(b"precious bytes")
    good[str(cid)] = b"precious bytes"
    flip_byte(store.path_of(cid))
    assert store.get(cid) == b"precious bytes"
    assert store.path_of(cid).read_bytes() == b"precious bytes"
    assert len(list((tmp_path / "quarantine").iterdir())) == 1


def test_fetcher_returning_wrong_bytes_does_not_heal(tmp_path):
    store = Blockstore(tmp_path, fetcher=lambda cid: b"forged")
    cid = store.put(b"precious bytes")
    flip_byte(store.path_of(cid))
    with pytest.raises(CorruptBlock):
        store.get(cid)
    assert not store.has(cid)


def test_verify_all_finds_every_corrupt_block(tmp_path):
    store = Blockstore(tmp_path)
    cids = [store.put(bytes([i]) * 100) for i in range(5)]
    flip_byte(store.path_of(cids[1]))
    flip_byte(store.path_of(cids[4]), 50)
    assert set(store.verify_all()) == {cids[1], cids[4]}
    assert sorted(map(str, store.cids())) == sorted(str(c) for c in (cids[0], cids[2], cids[3]))


def test_gc_keeps_pinned_dags_and_removes_the_rest(tmp_path):
    store = Blockstore(tmp_path)
    kept = add_bytes(store, bytes(3 * MiB) + b"x")  # root + 2 distinct leaves (two zero chunks dedupe)
    dropped = add_bytes(store, b"y" * (2 * MiB + 1), pin=False)
    loose = store.put(b"loose")
    result = store.gc()
    assert result.removed == 4  # the root and 2 distinct leaves of "y", and the loose block
    assert MiB < result.freed_bytes < MiB + 1000
    assert not store.has(dropped) and not store.has(loose)
    assert b"".join(cat(store, kept)) == bytes(3 * MiB) + b"x"
    assert store.unpin(kept)
    store.gc()
    assert store.cids() == []


def test_gc_follows_links_inside_dag_cbor(tmp_path):
    store = Blockstore(tmp_path)
    leaf = store.put(b"payload")
    # a DAG-CBOR map {"data": link} with a real link (tag 42) to the leaf
    link = b"\xd8\x2a\x58\x25\x00" + bytes(leaf)
    record = b"\xa1\x64data" + link
    root = store.put(record, DAG_CBOR)
    assert store.links(root) == [leaf]
    store.pin(root)
    store.gc()
    assert store.has(leaf)


def test_pin_refuses_incomplete_dags(tmp_path):
    store = Blockstore(tmp_path)
    root = add_bytes(store, b"z" * (2 * MiB + 5), pin=False)
    leaf = store.links(root)[0]
    store.delete(leaf)
    with pytest.raises(PinError, match="1 block"):
        store.pin(root)
    assert store.missing(root) == [leaf]


def test_add_path_of_a_missing_path_says_so(tmp_path):
    from agoranet.store import StoreError
    with pytest.raises(StoreError, match="does not exist"):
        add_path(Blockstore(tmp_path / "b"), tmp_path / "nope")


def test_a_reader_that_missed_a_block_never_unlists_the_copy_just_written(tmp_path):
    # A storage peer serves GET /blocks/{cid} while its own fetch writes that block: the reader finds no
    # file, the writer writes file and index row, then the reader must not unlist what is now there.
    import threading

    store = Blockstore(tmp_path / "s")
    blocks = [bytes([i % 256]) * (1000 + i) for i in range(300)]
    cids = [cid_of(b) for b in blocks]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            for cid in cids:
                try:
                    store.get(cid)
                except BlockNotFound:
                    pass

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for cid, data in zip(cids, blocks):
            store.put_block(cid, data)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert [cid for cid in cids if not store.has(cid)] == []
