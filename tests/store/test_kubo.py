"""The optional kubo (IPFS) backend: blocks also put to and read from a kubo daemon's RPC API.

The first tests need no kubo: the requests Agora builds, and what happens when nothing (or something
that is not kubo) answers at the RPC address. The rest run against a real kubo daemon when `ipfs` is
on PATH and are skipped otherwise (see tests/kubo_daemon.py).
"""

from __future__ import annotations

import os
import socket
from email.parser import BytesParser
from email.policy import HTTP

import pytest
from typer.testing import CliRunner

from agoranet.cli.store_cmd import store_app
from agoranet.core.cid import DAG_CBOR, DAG_PB, RAW, cid_of
from agoranet.core.settings import Settings
from agoranet.node.app import create_app
from agoranet.node.server import BackgroundServer
from agoranet.node.storage_role import StorageRole
from agoranet.store import (
    Blockstore,
    KuboClient,
    KuboMismatch,
    KuboUnavailable,
    add_bytes,
    add_path,
    cat,
    connect_kubo,
    model_cid,
)
from agoranet.store.kubo import (
    SOFT_BLOCK_LIMIT,
    block_get_request,
    block_put_request,
    pin_add_request,
)

from .. import kubo_daemon
from ..kubo_daemon import IPFS_ADD

kubo = kubo_daemon.kubo  # the fixture, for the tests below that take `kubo`

MiB = 1 << 20
runner = CliRunner(mix_stderr=False) if "mix_stderr" in CliRunner.__init__.__code__.co_varnames else CliRunner()


def multipart_parts(request) -> list:
    """The parts of a multipart/form-data request body, parsed by the standard library's MIME parser."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + request.read())
    assert message.is_multipart()
    return list(message.iter_parts())


@pytest.fixture
def closed_rpc():
    """An RPC address on 127.0.0.1 where nothing listens: the port is bound (so no one else takes it), not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"vocab": 260}')
    (src / "weights.bin").write_bytes(os.urandom(2 * MiB + 12345))  # 3 raw leaves under a dag-pb File node
    return src


# -- without kubo --------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", [RAW, DAG_PB, DAG_CBOR])
def test_block_put_sends_the_block_as_one_file_under_its_own_codec(codec):
    data = b"\xa1\x61a\x01" if codec == DAG_CBOR else b"\x0a\x02\x08\x01" if codec == DAG_PB else b"leaf bytes"
    cid = cid_of(data, codec)
    request = block_put_request("http://127.0.0.1:5001/", cid, data)
    assert request.method == "POST" and request.url.path == "/api/v0/block/put"
    assert dict(request.url.params) == {"cid-codec": codec, "mhtype": "sha2-256", "pin": "false"}
    [part] = multipart_parts(request)
    assert part.get_content_disposition() == "form-data" and part.get_param("name", header="content-disposition") == "file"
    assert part.get_content_type() == "application/octet-stream"
    assert part.get_payload(decode=True) == data


def test_only_blocks_over_a_mebibyte_ask_kubo_to_allow_big_blocks():
    leaf = bytes(SOFT_BLOCK_LIMIT)  # Agora's own chunks are exactly 1 MiB: kubo takes them as they are
    assert "allow-big-block" not in block_put_request("http://k", cid_of(leaf), leaf).url.params
    big = bytes(SOFT_BLOCK_LIMIT + 1)  # only CAR imports and peers bring these
    request = block_put_request("http://k", cid_of(big), big)
    assert request.url.params["allow-big-block"] == "true"
    assert multipart_parts(request)[0].get_payload(decode=True) == big


def test_reads_and_pins_never_send_kubo_searching_the_network():
    cid = cid_of(b"x")
    get = block_get_request("http://127.0.0.1:5001", cid)
    assert get.url.path == "/api/v0/block/get" and dict(get.url.params) == {"arg": str(cid), "offline": "true"}
    pin = pin_add_request("http://127.0.0.1:5001", cid)
    assert pin.url.path == "/api/v0/pin/add"
    assert dict(pin.url.params) == {"arg": str(cid), "recursive": "true", "offline": "true"}


def test_add_with_kubo_unreachable_fails_naming_the_address_and_keeps_nothing(tmp_path, tree, closed_rpc):
    store = Blockstore(tmp_path / "blocks", kubo=KuboClient(closed_rpc, connect_timeout=2))
    with pytest.raises(KuboUnavailable, match=closed_rpc) as caught:
        add_path(store, tree)
    assert "ipfs daemon" in str(caught.value)
    assert store.cids() == [] and store.pins() == []
    assert [p for p in (tmp_path / "blocks" / "data").rglob("*") if p.is_file()] == []
    with pytest.raises(KuboUnavailable, match=closed_rpc):
        store.put(b"one block")
    assert store.cids() == []
    store.close()


def test_reading_a_missing_block_while_kubo_is_down_names_the_address(tmp_path, closed_rpc):
    with Blockstore(tmp_path, kubo=KuboClient(closed_rpc)) as store, pytest.raises(KuboUnavailable, match=closed_rpc):
        store.get(cid_of(b"never stored"))


def test_corrupt_block_still_heals_from_peers_while_kubo_is_down(tmp_path, closed_rpc):
    good = b"precious bytes"
    with Blockstore(tmp_path) as store:  # written before kubo was named
        cid = store.put(good)
    path = store.path_of(cid)
    path.write_bytes(b"Precious bytes")
    with Blockstore(tmp_path, kubo=KuboClient(closed_rpc), fetcher=lambda c: good) as store:
        assert store.get(cid) == good
        assert store.has(cid) and path.read_bytes() == good


def test_connecting_to_something_that_is_not_kubo_says_so(tmp_path):
    # A common slip: --kubo-rpc pointing at an Agora storage peer (or kubo's gateway port) instead of kubo's RPC.
    role = StorageRole(tmp_path / "peer", "http://127.0.0.1:1", [])
    with BackgroundServer(create_app([role], max_request_bytes=1 << 20)) as peer, \
            pytest.raises(KuboUnavailable, match="not kubo's RPC API"):
        connect_kubo(peer.url)
    role.store.close()


def test_cli_with_kubo_unreachable_is_one_line_naming_the_address(tmp_path, tree, closed_rpc, monkeypatch):
    r = runner.invoke(store_app, ["add", str(tree), "--home", str(tmp_path / "home"), "--kubo-rpc", closed_rpc])
    text = r.stderr if hasattr(r, "stderr") else r.output
    assert r.exit_code == 1 and closed_rpc in text and "ipfs daemon" in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
    monkeypatch.setenv("AGORA_KUBO_RPC", closed_rpc)
    assert Settings().kubo_rpc == closed_rpc
    r = runner.invoke(store_app, ["cat", str(cid_of(b"x")), "--home", str(tmp_path / "home")])
    assert r.exit_code == 1 and closed_rpc in (r.stderr if hasattr(r, "stderr") else r.output)
    # commands that never touch kubo do not need it, and `--kubo-rpc ''` turns the setting off
    assert runner.invoke(store_app, ["pins", "--home", str(tmp_path / "home")]).exit_code == 0
    r = runner.invoke(store_app, ["add", str(tree), "--home", str(tmp_path / "home"), "--kubo-rpc", ""])
    assert r.exit_code == 0 and r.stdout.strip() == str(model_cid(tree))


# -- against a real kubo daemon ------------------------------------------------------------------


def test_added_tree_lands_in_kubo_under_the_same_cids_and_pinned(kubo, tmp_path, tree):
    with Blockstore(tmp_path / "blocks", kubo=connect_kubo(kubo.rpc_url)) as store:
        root = add_path(store, tree)
        blocks = list(store.walk(root))
    assert {cid.codec.name for cid, _ in blocks} == {RAW, DAG_PB}
    for cid, data in blocks:
        assert kubo.ipfs("block", "get", str(cid)) == data
    assert str(root) in kubo.ipfs("pin", "ls", "--type=recursive", "-q").decode().split()
    # kubo's own importer, given the same layout, computes the same root
    assert kubo.ipfs(*IPFS_ADD, "-r", "--only-hash", str(tree)).decode().strip() == str(root)
    assert kubo.ipfs("cat", f"{root}/weights.bin") == (tree / "weights.bin").read_bytes()


def test_every_codec_is_stored_in_kubo_under_exactly_our_cid(kubo, tmp_path):
    with Blockstore(tmp_path, kubo=connect_kubo(kubo.rpc_url)) as store:
        leaf = store.put(os.urandom(100))
        record = store.put(b"\xa1\x64data\xd8\x2a\x58\x25\x00" + bytes(leaf), DAG_CBOR)  # {"data": link to leaf}
        node = add_bytes(store, os.urandom(MiB + 1))  # a dag-pb File node over two raw leaves
        store.pin(record)
    for cid in (leaf, record, node):
        assert kubo.ipfs("block", "stat", str(cid)).split()[1].decode() == str(cid)


def test_blocks_only_kubo_holds_are_read_through_and_verified(kubo, tmp_path):
    payload = os.urandom(2 * MiB + 7)
    (tmp_path / "payload.bin").write_bytes(payload)
    root = kubo.ipfs(*IPFS_ADD, str(tmp_path / "payload.bin")).decode().strip()
    with Blockstore(tmp_path / "blocks", kubo=connect_kubo(kubo.rpc_url)) as store:
        assert not store.has(root)
        assert b"".join(cat(store, root)) == payload
        assert store.missing(root) == [] and store.has(root)  # now held here too
        store.kubo.close()
        store.kubo = None
        assert b"".join(cat(store, root)) == payload


def test_a_block_kubo_returns_corrupt_is_refused_and_not_stored(kubo, tmp_path):
    data = os.urandom(4096)
    cid = kubo.ipfs("block", "put", "--cid-codec=raw", input=data).decode().strip()
    assert cid == str(cid_of(data))
    # Damage kubo's own copy on disk (its flatfs); kubo does not re-hash on read by default.
    [stored] = [p for p in (kubo.repo / "blocks").rglob("*.data") if p.read_bytes() == data]
    stored.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with Blockstore(tmp_path, kubo=connect_kubo(kubo.rpc_url)) as store:
        with pytest.raises(KuboMismatch, match="hash to something else"):
            store.get(cid)
        assert not store.has(cid) and not store.path_of(cid).exists()


def test_cli_add_and_cat_through_kubo(kubo, tmp_path, tree, monkeypatch):
    r = runner.invoke(store_app, ["add", str(tree), "--home", str(tmp_path / "a"), "--kubo-rpc", kubo.rpc_url])
    assert r.exit_code == 0, r.output
    root = r.stdout.strip()
    assert root == str(model_cid(tree))
    assert root in kubo.ipfs("pin", "ls", "--type=recursive", "-q").decode().split()
    # another home, knowing nothing, reads the file through kubo (AGORA_KUBO_RPC)
    monkeypatch.setenv("AGORA_KUBO_RPC", kubo.rpc_url)
    file_cid = model_cid(tree / "config.json")
    r = runner.invoke(store_app, ["cat", str(file_cid), "--home", str(tmp_path / "b")])
    assert r.exit_code == 0 and r.stdout == '{"vocab": 260}'
