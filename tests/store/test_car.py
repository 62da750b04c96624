import io

import libipld
import pytest

from agoranet.store import Blockstore, MalformedCar, add_path, export, export_car, import_car
from agoranet.store.car import car_header
from agoranet.store.dagpb import decode_varint

MiB = 1 << 20


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "big.bin").write_bytes(bytes(range(256)) * (12 * 1024 + 1))  # 3 MiB + 256: 4 leaves
    (src / "d" / "small.txt").write_bytes(b"hello world\n")
    return src


def test_car_round_trip_preserves_every_block(tmp_path, tree):
    a = Blockstore(tmp_path / "a")
    root = add_path(a, tree)
    buf = io.BytesIO()
    count = export_car(a, root, buf)
    assert count == len(a.cids())
    b = Blockstore(tmp_path / "b")
    assert import_car(b, io.BytesIO(buf.getvalue())) == [root]
    assert b.is_pinned(root)
    assert sorted(map(str, b.cids())) == sorted(map(str, a.cids()))
    export(b, root, tmp_path / "out")
    assert (tmp_path / "out" / "big.bin").read_bytes() == (tree / "big.bin").read_bytes()


def test_car_layout_follows_the_spec_root_block_first(tmp_path, tree):
    a = Blockstore(tmp_path / "a")
    root = add_path(a, tree)
    buf = io.BytesIO()
    export_car(a, root, buf)
    raw = buf.getvalue()
    length, pos = decode_varint(raw, 0)
    header = libipld.decode_dag_cbor(raw[pos:pos + length])
    assert header == {"roots": [bytes(root)], "version": 1}
    pos += length
    sections = []
    while pos < len(raw):
        length, pos = decode_varint(raw, pos)
        sections.append(raw[pos:pos + length])
        pos += length
    assert len(sections) == len(a.cids())
    assert sections[0].startswith(bytes(root))
    assert sections[0][len(bytes(root)):] == a.get(root)


def test_car_header_is_canonical_dag_cbor(tmp_path):
    from agoranet.core.cid import cid_of
    root = cid_of(b"x")
    header = car_header([root])
    body = header[1:]
    assert header[0] == len(body)
    assert libipld.encode_dag_cbor(libipld.decode_dag_cbor(body)) == body


def test_import_rejects_a_tampered_block_and_keeps_nothing_after_it(tmp_path, tree):
    a = Blockstore(tmp_path / "a")
    root = add_path(a, tree)
    buf = io.BytesIO()
    export_car(a, root, buf)
    raw = bytearray(buf.getvalue())
    raw[-5] ^= 0xFF  # inside the last block's data
    b = Blockstore(tmp_path / "b")
    with pytest.raises(MalformedCar, match="does not match"):
        import_car(b, io.BytesIO(bytes(raw)))
    assert not b.is_pinned(root)


@pytest.mark.parametrize("blob", [b"", b"\x05abc", b"\x0a" + b"\xa1\x61a\x01" + b"\x00" * 6])
def test_import_rejects_files_that_are_not_car(tmp_path, blob):
    with pytest.raises(MalformedCar):
        import_car(Blockstore(tmp_path), io.BytesIO(blob))


def test_truncated_car_is_reported(tmp_path, tree):
    a = Blockstore(tmp_path / "a")
    root = add_path(a, tree)
    buf = io.BytesIO()
    export_car(a, root, buf)
    with pytest.raises(MalformedCar, match="truncated"):
        import_car(Blockstore(tmp_path / "b"), io.BytesIO(buf.getvalue()[:-10]))
