"""Property tests for log proofs: honest proofs always verify; any tampering with the proof, the leaf,
the index, the first size or the roots is always rejected with `InvalidProof`.

Not the tree size: the same audit path can also fit a larger tree of the same shape (RFC 9162 paths
do not encode it), which is why a size is only trusted together with its root in a signed tree head.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agoranet.log.errors import InvalidProof
from agoranet.log.merkle import MerkleTree, leaf_hash, verify_consistency, verify_inclusion

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
TREE = MerkleTree([leaf_hash(hashlib.sha256(str(i).encode()).digest()) for i in range(300)])


def flip(b: bytes, pos: int, xor: int) -> bytes:
    out = bytearray(b)
    out[pos % len(out)] ^= xor
    return bytes(out)


@st.composite
def inclusion_cases(draw):
    size = draw(st.integers(1, TREE.size))
    index = draw(st.integers(0, size - 1))
    return index, size, TREE.inclusion_proof(index, size), TREE.root(size)


tampering = st.tuples(st.sampled_from(["proof", "drop", "extra", "leaf", "index", "root"]),
                      st.integers(0, 10_000), st.integers(1, 255))


@given(inclusion_cases(), tampering)
@SETTINGS
def test_a_tampered_inclusion_proof_is_always_rejected(case, change):
    index, size, proof, root = case
    leaf = TREE.leaf(index)
    verify_inclusion(leaf, index, size, proof, root)  # the honest one holds
    what, n, xor = change
    if what == "proof" and proof:
        proof = [flip(p, n, xor) if i == n % len(proof) else p for i, p in enumerate(proof)]
    elif what == "drop" and proof:
        proof = proof[:-1]
    elif what in ("extra", "proof", "drop"):
        proof = [*proof, hashlib.sha256(n.to_bytes(4, "big")).digest()]
    elif what == "leaf":
        leaf = flip(leaf, n, xor)
    elif what == "index":
        index = (index + 1 + n % (size - 1)) % size if size > 1 else index + 1  # always another index
    else:
        root = flip(root, n, xor)
    with pytest.raises(InvalidProof):
        verify_inclusion(leaf, index, size, proof, root)


@st.composite
def consistency_cases(draw):
    second = draw(st.integers(2, TREE.size))
    first = draw(st.integers(1, second - 1))
    return first, second, TREE.consistency_proof(first, second), TREE.root(first), TREE.root(second)


@given(consistency_cases(), st.sampled_from(["proof", "drop", "extra", "first_root", "second_root", "first"]), st.integers(0, 10_000), st.integers(1, 255))
@SETTINGS
def test_a_tampered_consistency_proof_is_always_rejected(case, what, n, xor):
    first, second, proof, r1, r2 = case
    verify_consistency(first, second, r1, r2, proof)
    if what == "proof":
        proof = [flip(p, n, xor) if i == n % len(proof) else p for i, p in enumerate(proof)]
    elif what == "drop":
        proof = proof[:-1]
    elif what == "extra":
        proof = [*proof, hashlib.sha256(n.to_bytes(4, "big")).digest()]
    elif what == "first_root":
        r1 = flip(r1, n, xor)
    elif what == "second_root":
        r2 = flip(r2, n, xor)
    elif what == "first":
        first = 1 + (first + n) % (second - 1) if second > 2 else first
        if first == case[0]:
            first = second  # then equal sizes with a non-empty proof
    with pytest.raises(InvalidProof):
        verify_consistency(first, second, r1, r2, proof)
