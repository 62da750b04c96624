"""The witness: keeps the latest consistent head per log, turns inconsistent pairs into kept split views."""

from __future__ import annotations

from pathlib import Path

import pytest

from agoranet.core.identity import Identity
from agoranet.log.errors import InvalidTreeHead
from agoranet.log.records import SplitViewProof
from agoranet.log.transparency import TransparencyLog
from agoranet.log.witness import Witness

from .conftest import make_records


def test_a_growing_log_is_followed_with_consistency_proofs(tmp_path: Path, tlog: TransparencyLog, identity: Identity):
    witness = Witness(tmp_path / "w.db")
    tlog.append_many(make_records(identity, 3))
    h3 = tlog.head()
    assert witness.observe(h3) is None and witness.latest(tlog.log_id) == h3
    tlog.append_many(make_records(identity, 4, tag="more"))
    h7 = tlog.head()
    assert witness.needs_proof(h7) == (3, 7)
    with pytest.raises(ValueError, match="need a consistency proof"):
        witness.observe(h7)
    assert witness.observe(h7, tlog.consistency_proof(3, 7)) is None
    assert witness.latest(tlog.log_id) == h7
    assert witness.observe(h3, tlog.consistency_proof(3, 7)) is None  # an older head: checked, not kept
    assert witness.latest(tlog.log_id) == h7 and not witness.untrusted(tlog.log_id) and witness.split_views() == []


def test_two_roots_for_one_size_are_a_kept_conclusive_split_view(tmp_path: Path, tlog: TransparencyLog,
                                                                  identity: Identity):
    witness = Witness(tmp_path / "w.db")
    tlog.append_many(make_records(identity, 5))
    with TransparencyLog(tmp_path / "twin.db", identity) as twin:  # same key, another history
        twin.append_many(make_records(identity, 5, tag="twin"))
        assert witness.observe(tlog.head()) is None
        split = witness.observe(twin.head())
    assert split is not None and split.conclusive and witness.untrusted(tlog.log_id)
    assert witness.record(split) is False  # kept once per pair of heads
    witness.close()

    reopened = Witness(tmp_path / "w.db")  # a restarted node still distrusts the log
    assert reopened.untrusted_logs() == [tlog.log_id]
    (kept,) = reopened.split_views()
    again = SplitViewProof.from_json(kept.to_json()["proof"])  # anyone can re-check the evidence
    assert again.conclusive and {again.first.body.root, again.second.body.root} == {
        split.first.body.root, split.second.body.root}


def test_a_consistency_proof_that_fails_is_a_split_view_and_a_good_one_is_not(tmp_path: Path, tlog: TransparencyLog,
                                                                              identity: Identity):
    witness = Witness(tmp_path / "w.db")
    tlog.append_many(make_records(identity, 4))
    witness.observe(tlog.head())
    with TransparencyLog(tmp_path / "twin.db", identity) as twin:
        twin.append_many(make_records(identity, 6, tag="twin"))
        forked = twin.head()
        split = witness.observe(forked, twin.consistency_proof(4, 6))  # the twin's proof is for its own history
    assert split is not None and not split.conclusive and witness.untrusted(tlog.log_id)
    assert witness.latest(tlog.log_id).body.size == 4  # an inconsistent head is never kept as the latest


def test_consistent_heads_are_no_split_view_evidence(tlog: TransparencyLog, identity: Identity):
    tlog.append_many(make_records(identity, 2))
    a, b = tlog.head(), tlog.head()
    with pytest.raises(InvalidTreeHead, match="consistent"):
        SplitViewProof.from_json(SplitViewProof(a, b, (), "made up").to_json())
