"""RFC 9162 Merkle trees: leaf/node hashing, inclusion and consistency proofs, and their checks.

Hashing is exactly Certificate Transparency v2's: leaf = SHA-256(0x00 || data),
node = SHA-256(0x01 || left || right), and the empty tree's root is SHA-256(""). Proofs are
generated from cached complete subtrees, so any proof against any past size of the tree costs
O(log² n) hashes at worst; verification follows RFC 9162 §2.1.3.2 and §2.1.4.2 step by step.
"""

from __future__ import annotations

from hashlib import sha256

from agoranet.log.errors import InvalidProof, ProofRequestError

__all__ = [
    "EMPTY_ROOT", "MerkleTree", "leaf_hash", "node_hash", "root_from_leaf_hashes",
    "verify_inclusion", "verify_consistency",
]

EMPTY_ROOT = sha256(b"").digest()
HASH_SIZE = 32


def leaf_hash(data: bytes) -> bytes:
    return sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2): RFC 9162's k."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only tree that keeps every complete subtree's hash, level by level.

    `levels[h][j]` is the root of the 2**h leaves starting at j * 2**h; level 0 holds leaf hashes.
    Storage is about two hashes per leaf; appends cost one hash per completed subtree (amortised 2).
    """

    def __init__(self, leaf_hashes: list[bytes] | None = None) -> None:
        self.levels: list[list[bytes]] = [[]]
        for h in leaf_hashes or ():
            self.append(h)

    @property
    def size(self) -> int:
        return len(self.levels[0])

    def append(self, leaf: bytes) -> int:
        """Add a leaf hash; return its index."""
        levels = self.levels
        index = len(levels[0])
        levels[0].append(leaf)
        node, height, i = leaf, 0, index
        while i & 1:  # this node completes a pair: its parent is now a complete subtree
            node = node_hash(levels[height][i - 1], node)
            height += 1
            i >>= 1
            if height == len(levels):
                levels.append([])
            levels[height].append(node)
        return index

    def leaf(self, index: int) -> bytes:
        return self.levels[0][index]

    def _subtree(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for the subtrees RFC 9162's recursion visits (start aligned to its split)."""
        n = end - start
        if n & (n - 1) == 0:  # a complete subtree: cached (RFC's recursion keeps start aligned)
            height = n.bit_length() - 1
            return self.levels[height][start >> height]
        k = _split(n)
        return node_hash(self._subtree(start, start + k), self._subtree(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        """The root hash of the tree's first `size` leaves (default: all of them)."""
        size = self.size if size is None else size
        self._check_size(size, "size")
        return EMPTY_ROOT if size == 0 else self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """PATH(index, D[0:size]) from RFC 9162 §2.1.3.1, leaf-side first."""
        size = self.size if size is None else size
        self._check_size(size, "size")
        if not 0 <= index < size:
            raise ProofRequestError(f"leaf {index} is not in a tree of {size} leaves", param="index")
        path: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            k = _split(end - start)
            if index - start < k:
                path.append(self._subtree(start + k, end))
                end = start + k
            else:
                path.append(self._subtree(start, start + k))
                start += k
        path.reverse()
        return path

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """PROOF(first, D[0:second]) from RFC 9162 §2.1.4.1; empty when first is 0 or equals second."""
        second = self.size if second is None else second
        self._check_size(second, "second")
        if not 0 <= first <= second:
            raise ProofRequestError(f"first size {first} must be between 0 and second size {second}", param="first")
        if first == 0 or first == second:
            return []
        proof: list[bytes] = []
        start, end, m, complete = 0, second, first, True
        while True:
            n = end - start
            if m == n:  # SUBPROOF(m, D[m], b): nothing if this is the first tree itself, else its root
                if not complete:
                    proof.append(self._subtree(start, end))
                break
            k = _split(n)
            if m <= k:
                proof.append(self._subtree(start + k, end))
                end = start + k
            else:
                proof.append(self._subtree(start, start + k))
                start, m, complete = start + k, m - k, False
        proof.reverse()
        return proof

    def _check_size(self, size: int, param: str) -> None:
        if not 0 <= size <= self.size:
            raise ProofRequestError(f"{param} {size} is beyond the tree's {self.size} leaves", param=param)


def root_from_leaf_hashes(leaves: list[bytes]) -> bytes:
    """MTH of a list of leaf hashes, computed bottom-up without keeping the tree."""
    if not leaves:
        return EMPTY_ROOT
    level = leaves
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) & 1:
            nxt.append(level[-1])  # RFC 9162's split puts a lone right node one level up unchanged
        level = nxt
    return level[0]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: list[bytes], root: bytes) -> None:
    """RFC 9162 §2.1.3.2: raise InvalidProof unless `leaf` (a leaf hash) is at `index` under `root`."""
    if not 0 <= index < size:
        raise InvalidProof(f"leaf index {index} is outside a tree of {size} leaves")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise InvalidProof("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = sha256(b"\x01" + p + r).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("inclusion proof is shorter than the tree is deep")
    if r != root:
        raise InvalidProof(f"inclusion proof for leaf {index} does not lead to the root of size {size}")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes, proof: list[bytes]) -> None:
    """RFC 9162 §2.1.4.2: raise InvalidProof unless the tree of size `second` extends that of `first`."""
    if not 0 <= first <= second:
        raise InvalidProof(f"first size {first} must be between 0 and second size {second}")
    if first == second:
        if proof:
            raise InvalidProof("trees of equal size need an empty consistency proof")
        if first_root != second_root:
            raise InvalidProof(f"two different roots for the same size {first}")
        return
    if first == 0:
        if proof:
            raise InvalidProof("consistency with the empty tree needs an empty proof")
        if first_root != EMPTY_ROOT:
            raise InvalidProof("the root of the empty tree must be SHA-256 of nothing")
        return
    if not proof:
        raise InvalidProof(f"empty consistency proof between sizes {first} and {second}")
    path = [first_root, *proof] if first & (first - 1) == 0 else proof
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise InvalidProof("consistency proof is longer than the trees need")
        if fn & 1 or fn == sn:
            fr = sha256(b"\x01" + c + fr).digest()
            sr = sha256(b"\x01" + c + sr).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = sha256(b"\x01" + sr + c).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof("consistency proof is shorter than the trees need")
    if fr != first_root:
        raise InvalidProof(f"consistency proof does not reproduce the root of size {first}")
    if sr != second_root:
        raise InvalidProof(f"consistency proof does not reproduce the root of size {second}")
