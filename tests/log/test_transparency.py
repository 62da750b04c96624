from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from .conftest import make_records

from agoranet.core.cid import DAG_CBOR, cid_of
from agoranet.core.identity import Identity
from agoranet.core.records import verify_record
from agoranet.log.errors import CorruptLog, EntryNotFound, ProofRequestError
from agoranet.log.merkle import EMPTY_ROOT, leaf_hash, root_from_leaf_hashes, verify_consistency, verify_inclusion
from agoranet.log.records import check_heads, verify_tree_head
from agoranet.log.transparency import MAX_PAGE, TransparencyLog, cid_key


def test_leaves_are_the_binary_cids_of_the_records(tlog: TransparencyLog, identity: Identity) -> None:
    records = make_records(identity, 5)
    entries = tlog.append_many(records)
    for i, (entry, data) in enumerate(zip(entries, records)):
        assert entry.index == i
        assert entry.cid == cid_of(data, DAG_CBOR) and str(entry.cid).startswith("bafy")
        assert entry.key == cid_key(data) == bytes(cid_of(data, DAG_CBOR))
    assert tlog.root() == root_from_leaf_hashes([leaf_hash(bytes(cid_of(d, DAG_CBOR))) for d in records])


def test_empty_log_head_is_the_hash_of_nothing(tlog: TransparencyLog, identity: Identity) -> None:
    head = verify_tree_head(tlog.head().to_json())
    assert head.body.size == 0 and head.body.root_hash == EMPTY_ROOT
    assert head.signer == head.body.log_id == str(identity.peer_id)


def test_appending_the_same_record_twice_returns_the_first_entry(tlog: TransparencyLog, identity: Identity) -> None:
    [a, b] = make_records(identity, 2)
    first = tlog.append(a)
    tlog.append(b)
    again = tlog.append(a)
    assert again.index == first.index == 0 and tlog.size == 2


def test_inclusion_and_consistency_proofs_verify_against_signed_heads(
    tlog: TransparencyLog, identity: Identity,
) -> None:
    records = make_records(identity, 300)
    tlog.append_many(records[:100])
    old = verify_tree_head(tlog.head().encode())
    tlog.append_many(records[100:])
    new = verify_tree_head(tlog.head().encode())
    for i in (0, 1, 99, 100, 255, 299):
        cid = cid_of(records[i], DAG_CBOR)
        index, proof = tlog.inclusion_proof(str(cid))
        assert index == i
        verify_inclusion(leaf_hash(bytes(cid)), index, new.body.size, proof, new.body.root_hash)
        if i < 100:
            index, proof = tlog.inclusion_proof(cid, size=100)
            verify_inclusion(leaf_hash(bytes(cid)), index, 100, proof, old.body.root_hash)
    proof = tlog.consistency_proof(100, 300)
    verify_consistency(100, 300, old.body.root_hash, new.body.root_hash, proof)
    assert check_heads(old, new, proof) is None


def test_proofs_for_entries_not_yet_in_the_tree_are_refused(tlog: TransparencyLog, identity: Identity) -> None:
    records = make_records(identity, 10)
    tlog.append_many(records)
    with pytest.raises(ProofRequestError):
        tlog.inclusion_proof(cid_of(records[7], DAG_CBOR), size=5)
    with pytest.raises(EntryNotFound):
        tlog.inclusion_proof(cid_of(b"never logged", DAG_CBOR))
    with pytest.raises(ProofRequestError):
        tlog.consistency_proof(3, 11)


def test_entries_come_back_in_bounded_pages(tlog: TransparencyLog, identity: Identity) -> None:
    records = make_records(identity, MAX_PAGE + 5)
    tlog.append_many(records)
    page = tlog.entries(0, 10**9)
    assert len(page) == MAX_PAGE and [e.record for e in page] == records[:MAX_PAGE]
    assert [e.index for e in tlog.entries(MAX_PAGE, MAX_PAGE + 100)] == list(range(MAX_PAGE, MAX_PAGE + 5))
    assert tlog.entries(5, 5) == []
    with pytest.raises(ProofRequestError):
        tlog.entries(7, 3)


def test_a_failed_transaction_leaves_no_trace(tlog: TransparencyLog, identity: Identity) -> None:
    records = make_records(identity, 4)
    tlog.append(records[0])
    root = tlog.root()
    with pytest.raises(RuntimeError):
        with tlog.transaction() as tx:
            tx.append(records[1])
            tx.append(records[2])
            raise RuntimeError("caller failed mid-way")
    assert tlog.size == 1 and tlog.root() == root
    assert tlog.append(records[3]).index == 1


def test_reopening_recomputes_the_same_root(tmp_path: Path, identity: Identity) -> None:
    records = make_records(identity, 77)
    with TransparencyLog(tmp_path / "l.db", identity) as first:
        first.append_many(records)
        root = first.root()
    with TransparencyLog(tmp_path / "l.db", identity) as again:
        assert again.size == 77 and again.root() == root
        assert again.entry(76).record == records[76]


def test_a_second_writer_s_commits_are_picked_up_before_appending(tmp_path: Path, identity: Identity) -> None:
    records = make_records(identity, 3)
    with TransparencyLog(tmp_path / "l.db", identity) as a, TransparencyLog(tmp_path / "l.db", identity) as b:
        a.append(records[0])
        assert b.append(records[1]).index == 1
        assert a.append(records[2]).index == 2
        assert a.size == 3 and b.size == 2 and a.root(2) == b.root()


def test_edited_records_and_missing_entries_are_detected(tmp_path: Path, identity: Identity) -> None:
    records = make_records(identity, 6)
    with TransparencyLog(tmp_path / "l.db", identity) as tlog:
        tlog.append_many(records)
    db = sqlite3.connect(tmp_path / "l.db")
    db.execute("UPDATE entries SET record = ? WHERE idx = 4", (records[4] + b"x",))
    db.commit()
    with TransparencyLog(tmp_path / "l.db", identity) as tlog:
        assert tlog.tampered_entries() == [4]
    db.execute("DELETE FROM entries WHERE idx = 2")
    db.commit()
    db.close()
    with pytest.raises(CorruptLog, match="entry 2 is missing"):
        TransparencyLog(tmp_path / "l.db", identity)


def test_a_forked_history_under_the_same_key_is_a_split_view(tmp_path: Path, identity: Identity) -> None:
    honest = make_records(identity, 20, tag="a")
    with TransparencyLog(tmp_path / "a.db", identity) as a, TransparencyLog(tmp_path / "b.db", identity) as b:
        a.append_many(honest)
        b.append_many(honest[:10] + make_records(identity, 12, tag="b"))  # same key, rewritten tail
        assert a.check_head(a.head(15)) is None
        split = a.check_head(b.head(15))
        assert split is not None and split.conclusive
        assert "different roots" in split.reason
        beyond = a.check_head(b.head(22))
        assert beyond is not None and "22" in beyond.reason
        # heads of different sizes joined by the fork's own proof do not verify either
        split = check_heads(a.head(12), b.head(20), b.consistency_proof(12, 20))
        assert split is not None and not split.conclusive
        # the split-view evidence survives a round trip and is re-checked on the way in
        from agoranet.log.records import SplitViewProof

        again = SplitViewProof.from_json(split.to_json())
        assert again.first.body.root == split.first.body.root
        assert verify_record(again.second.encode()).signer == str(identity.peer_id)
