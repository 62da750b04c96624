"""Root CIDs match what kubo computes (CIDv1, raw leaves, 1 MiB chunks, 1024 links, balanced)."""

import base64
import hashlib
import os

import pytest

from agoranet.store import Blockstore, MAX_LINKS, NotAFile, add_bytes, add_path, cat, export, import_path, model_cid

MiB = 1 << 20


# --- an independent derivation from the specs (multiformats, dag-pb, UnixFS), by hand ---------

def varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def cid_bin(data: bytes, codec: int) -> bytes:
    return bytes([0x01, codec, 0x12, 0x20]) + hashlib.sha256(data).digest()


def cid_text(binary: bytes) -> str:
    return "b" + base64.b32encode(binary).decode().lower().rstrip("=")


def pb_bytes(field: int, value: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(value)) + value


def pb_int(field: int, value: int) -> bytes:
    return varint(field << 3) + varint(value)


def spec_file(data: bytes, chunk: int = MiB, width: int = MAX_LINKS) -> tuple[bytes, int, int]:
    """(binary CID, Tsize, file size) of `data` per go-unixfs's balanced layout, written recursively."""
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
    nodes = [(cid_bin(c, 0x55), len(c), len(c)) for c in chunks]
    if len(nodes) == 1:
        return nodes[0]
    # depth d holds up to width**d leaves; fill left to right, as fillNodeRec does
    depth = 1
    while width ** depth < len(nodes):
        depth += 1

    def build(items, d):
        if d == 0:
            return items[0], items[1:]
        children = []
        while items and len(children) < width:
            child, items = build(items, d - 1)
            children.append(child)
        unixfs = pb_int(1, 2) + pb_int(3, sum(c[2] for c in children)) + b"".join(pb_int(4, c[2]) for c in children)
        links = b"".join(pb_bytes(2, pb_bytes(1, c[0]) + pb_bytes(2, b"") + pb_int(3, c[1])) for c in children)
        block = links + pb_bytes(1, unixfs)
        return (cid_bin(block, 0x70), len(block) + sum(c[1] for c in children), sum(c[2] for c in children)), items

    root, rest = build(nodes, depth)
    assert not rest
    return root


def pseudo_random(n: int, seed: int = 7) -> bytes:
    out, block = bytearray(), hashlib.sha256(bytes([seed])).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 32
    return bytes(out[:n])


# --- vectors ----------------------------------------------------------------------------------

def test_hello_world_is_the_kubo_raw_leaf(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello world\n")
    assert str(model_cid(path)) == "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"


def test_unixfs_encoding_gives_kubo_cidv0_of_hello_world():
    # `ipfs add` (CIDv0, no raw leaves) wraps the bytes in a UnixFS File node: QmT78z…
    from multiformats import multibase
    from agoranet.store.dagpb import UnixFSData, UnixFSType, encode_node, encode_unixfs

    block = encode_node([], encode_unixfs(UnixFSData(UnixFSType.FILE, data=b"hello world\n", filesize=12)))
    multihash = b"\x12\x20" + hashlib.sha256(block).digest()
    assert multibase.encode(multihash, "base58btc")[1:] == "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"


def test_empty_directory_matches_kubo(tmp_path):
    (tmp_path / "empty").mkdir()
    assert str(model_cid(tmp_path / "empty")) == "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"


@pytest.mark.parametrize("size", [0, 1, MiB, MiB + 1, 10 * MiB + 12345])
def test_file_root_cid_matches_spec_derivation(tmp_path, size):
    data = pseudo_random(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = cid_text(spec_file(data)[0])
    assert str(model_cid(path)) == expected
    if size <= MiB:
        assert expected.startswith("bafkrei")  # one chunk is a bare raw leaf
    else:
        assert expected.startswith("bafybei")


def test_deep_balanced_tree_matches_spec_derivation(tmp_path):
    # small chunks and width 3 give a 4-level tree, exercising the layout's partial subtrees
    data = pseudo_random(4 * 40 + 3)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = cid_text(spec_file(data, chunk=4, width=3)[0])
    assert str(import_path(path, chunk_size=4, max_links=3)) == expected


def test_directory_links_are_sorted_named_and_sized(tmp_path):
    root = tmp_path / "model"
    root.mkdir()
    files = {"tokenizer.json": b'{"v": 1}', "config.json": b"{}", "model.safetensors": pseudo_random(MiB + 100)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / ".hidden").write_bytes(b"skipped like ipfs add -r")
    links = b""
    for name in sorted(files):
        cid, tsize, _ = spec_file(files[name])
        links += pb_bytes(2, pb_bytes(1, cid) + pb_bytes(2, name.encode()) + pb_int(3, tsize))
    block = links + pb_bytes(1, pb_int(1, 1))
    assert str(model_cid(root)) == cid_text(cid_bin(block, 0x70))


def test_add_then_cat_and_export_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(pseudo_random(3 * MiB + 7))
    (src / "sub" / "b.txt").write_bytes(b"b")
    (src / "empty").write_bytes(b"")
    os.symlink("a.bin", src / "link")
    store = Blockstore(tmp_path / "blocks")
    root = add_path(store, src)
    assert root == model_cid(src)
    assert store.is_pinned(root)
    export(store, root, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (out / "sub" / "b.txt").read_bytes() == b"b"
    assert (out / "empty").read_bytes() == b""
    assert os.readlink(out / "link") == "a.bin"
    assert model_cid(out) == root
    file_cid = add_path(store, src / "a.bin")
    assert b"".join(cat(store, file_cid)) == (src / "a.bin").read_bytes()
    with pytest.raises(NotAFile):
        list(cat(store, root))


def test_add_bytes_equals_adding_the_same_file(tmp_path):
    data = pseudo_random(2 * MiB + 3)
    (tmp_path / "f").write_bytes(data)
    store = Blockstore(tmp_path / "blocks")
    assert add_bytes(store, data) == model_cid(tmp_path / "f")
    assert add_bytes(store, b"") == model_cid(tmp_path / "f").__class__.decode(
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")
