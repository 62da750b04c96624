"""The tree against a naive reference written straight from RFC 9162's recursive definitions."""

from __future__ import annotations

import hashlib

import pytest

from agoranet.log.errors import InvalidProof, ProofRequestError
from agoranet.log.merkle import (
    EMPTY_ROOT, MerkleTree, leaf_hash, root_from_leaf_hashes, verify_consistency, verify_inclusion,
)

MAX = 64
DATA = [f"leaf {i}".encode() * (i % 3 + 1) for i in range(MAX)]


# -- the reference: RFC 9162 §2.1.1, §2.1.3.1, §2.1.4.1, transcribed without cleverness ----------

def H(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def k_of(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def MTH(D: list[bytes]) -> bytes:
    n = len(D)
    if n == 0:
        return H(b"")
    if n == 1:
        return H(b"\x00" + D[0])
    k = k_of(n)
    return H(b"\x01" + MTH(D[0:k]) + MTH(D[k:n]))


def PATH(m: int, D: list[bytes]) -> list[bytes]:
    n = len(D)
    if n == 1:
        return []
    k = k_of(n)
    if m < k:
        return PATH(m, D[0:k]) + [MTH(D[k:n])]
    return PATH(m - k, D[k:n]) + [MTH(D[0:k])]


def SUBPROOF(m: int, D: list[bytes], b: bool) -> list[bytes]:
    n = len(D)
    if m == n:
        return [] if b else [MTH(D)]
    k = k_of(n)
    if m <= k:
        return SUBPROOF(m, D[0:k], b) + [MTH(D[k:n])]
    return SUBPROOF(m - k, D[k:n], False) + [MTH(D[0:k])]


def PROOF(m: int, D: list[bytes]) -> list[bytes]:
    return SUBPROOF(m, D, True)


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tree() -> MerkleTree:
    return MerkleTree([leaf_hash(d) for d in DATA])


@pytest.fixture(scope="module")
def roots() -> list[bytes]:
    return [MTH(DATA[:n]) for n in range(MAX + 1)]


def mutations(proof: list[bytes]):
    """Every way we alter a proof: flip a bit in each element, drop, add, swap, reverse."""
    for i in range(len(proof)):
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
        yield bad
    if proof:
        yield proof[:-1]
        yield proof[1:]
        if len(proof) > 1 and proof[0] != proof[-1]:
            yield list(reversed(proof))
    yield proof + [H(b"extra")]
    yield [H(b"extra")] + proof


# -- tests ----------------------------------------------------------------------------------------

def test_hash_constants_are_rfc9162s() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert leaf_hash(b"") == H(b"\x00")


def test_roots_match_reference_for_every_size(tree: MerkleTree, roots: list[bytes]) -> None:
    for n in range(MAX + 1):
        assert tree.root(n) == roots[n], n
        assert root_from_leaf_hashes([leaf_hash(d) for d in DATA[:n]]) == roots[n], n
        assert MerkleTree([leaf_hash(d) for d in DATA[:n]]).root() == roots[n], n


def test_inclusion_proofs_match_reference_and_verify(tree: MerkleTree, roots: list[bytes]) -> None:
    for n in range(1, MAX + 1):
        for m in range(n):
            proof = tree.inclusion_proof(m, n)
            assert proof == PATH(m, DATA[:n]), (m, n)
            verify_inclusion(leaf_hash(DATA[m]), m, n, proof, roots[n])


def test_altered_inclusion_proofs_are_rejected(tree: MerkleTree, roots: list[bytes]) -> None:
    for n in range(1, MAX + 1):
        for m in range(n):
            proof = tree.inclusion_proof(m, n)
            leaf = leaf_hash(DATA[m])
            for bad in mutations(proof):
                with pytest.raises(InvalidProof):
                    verify_inclusion(leaf, m, n, bad, roots[n])
            with pytest.raises(InvalidProof):
                verify_inclusion(leaf_hash(DATA[m] + b"!"), m, n, proof, roots[n])
            with pytest.raises(InvalidProof):
                verify_inclusion(leaf, m, n, proof, roots[n - 1])
            for other in (m - 1, m + 1, n):
                if 0 <= other and other != m and (other >= n or DATA[other] != DATA[m]):
                    with pytest.raises(InvalidProof):
                        verify_inclusion(leaf, other, n, proof, roots[n])


def test_consistency_proofs_match_reference_and_verify(tree: MerkleTree, roots: list[bytes]) -> None:
    for n in range(0, MAX + 1):
        for m in range(0, n + 1):
            proof = tree.consistency_proof(m, n)
            expected = PROOF(m, DATA[:n]) if 0 < m < n else []
            assert proof == expected, (m, n)
            verify_consistency(m, n, roots[m], roots[n], proof)


def test_altered_consistency_proofs_are_rejected(tree: MerkleTree, roots: list[bytes]) -> None:
    for n in range(1, MAX + 1):
        for m in range(1, n):
            proof = tree.consistency_proof(m, n)
            for bad in mutations(proof):
                with pytest.raises(InvalidProof):
                    verify_consistency(m, n, roots[m], roots[n], bad)
            with pytest.raises(InvalidProof):
                verify_consistency(m, n, roots[m - 1], roots[n], proof)
            with pytest.raises(InvalidProof):
                verify_consistency(m, n, roots[m], H(b"forged"), proof)
            with pytest.raises(InvalidProof):
                verify_consistency(n, m, roots[n], roots[m], proof)


def test_a_forked_tree_is_not_consistent_with_the_original(roots: list[bytes]) -> None:
    for n in range(2, MAX + 1):
        for m in range(1, n):
            forked = list(DATA[:n])
            forked[m - 1] = b"rewritten history"
            proof = MerkleTree([leaf_hash(d) for d in forked]).consistency_proof(m, n)
            with pytest.raises(InvalidProof):
                verify_consistency(m, n, roots[m], MTH(forked), proof)


def test_equal_and_empty_sizes_follow_the_obvious_rules(roots: list[bytes]) -> None:
    verify_consistency(5, 5, roots[5], roots[5], [])
    verify_consistency(0, 7, EMPTY_ROOT, roots[7], [])
    with pytest.raises(InvalidProof):
        verify_consistency(5, 5, roots[5], roots[6], [])
    with pytest.raises(InvalidProof):
        verify_consistency(5, 5, roots[5], roots[5], [roots[1]])
    with pytest.raises(InvalidProof):
        verify_consistency(0, 7, roots[1], roots[7], [])
    with pytest.raises(InvalidProof):
        verify_inclusion(leaf_hash(DATA[0]), 0, 0, [], EMPTY_ROOT)


def test_proofs_for_sizes_the_tree_has_not_reached_are_refused(tree: MerkleTree) -> None:
    with pytest.raises(ProofRequestError):
        tree.root(MAX + 1)
    with pytest.raises(ProofRequestError):
        tree.inclusion_proof(3, MAX + 1)
    with pytest.raises(ProofRequestError):
        tree.inclusion_proof(10, 10)
    with pytest.raises(ProofRequestError):
        tree.consistency_proof(9, 8)
