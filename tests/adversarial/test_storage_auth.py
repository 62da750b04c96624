"""Storage writes and pin changes need the node's operator or a replication peer, within a quota."""

from __future__ import annotations

import httpx

from agoranet.core.cid import RAW, cid_of
from agoranet.core.identity import Identity
from agoranet.node.node import build_node
from agoranet.node.replication import StorageReplicator
from agoranet.node.server import BackgroundServer, bind, url_of
from agoranet.node.storage_api import storage_app
from agoranet.store import Blockstore

from ..conftest import operator

BLOCKS = "/agora/v1/blocks"


def signed(key: Identity, method: str, url: str, body: bytes = b"") -> dict[str, str]:
    from agoranet.net.signed_request import HEADER, sign_request

    return {HEADER: sign_request(key, method, httpx.URL(url).path, body)}


def test_strangers_cannot_upload_unpin_or_announce_and_peers_stay_within_their_quota(tmp_path):
    sock = bind()
    home = tmp_path / "store"
    node = build_node(home, url_of(sock), ["storage"])
    with BackgroundServer(node.app, sock) as server:
        url = server.url
        block = b"the operator's data"
        cid = cid_of(block, RAW)
        node.storage.store.put_block(cid, block)
        node.storage.store.pin(cid)

        stranger = Identity.generate()
        junk = b"x" * 1000
        attempts = [
            ("PUT", f"{url}{BLOCKS}/{cid_of(junk, RAW)}", junk),
            ("DELETE", f"{url}{BLOCKS}/{cid}/pin", b""),
            ("POST", f"{url}{BLOCKS}/{cid}/pin", b'{"replicas": 1}'),
            ("POST", f"{url}{BLOCKS}/{cid}/replicas", b'{"replicas": 1}'),
        ]
        for method, target, body in attempts:
            bare = httpx.request(method, target, content=body, headers={"content-type": "application/json"})
            assert bare.status_code == 401 and bare.json()["error"]["code"] == "unauthorized", bare.text
            forged = httpx.request(method, target, content=body, headers={"authorization": "Bearer guess",
                                   "content-type": "application/json", **signed(stranger, method, target, body)})
            assert forged.status_code == 403 and forged.json()["error"]["code"] == "not_a_peer", forged.text
        assert httpx.get(f"{url}{BLOCKS}/{cid}/pin").json()["pinned"]  # nothing a stranger did changed the pin
        assert not httpx.head(f"{url}{BLOCKS}/{cid_of(junk, RAW)}").status_code == 200
        # The operator's token (a file only the operator can read) does what strangers cannot.
        assert httpx.put(f"{url}{BLOCKS}/{cid_of(junk, RAW)}", content=junk, headers=operator(home)).status_code == 201
        assert httpx.delete(f"{url}{BLOCKS}/{cid}/pin", headers=operator(home)).status_code == 200
        assert not httpx.get(f"{url}{BLOCKS}/{cid}/pin").json()["pinned"]
        token = (home / "operator.token")
        assert token.stat().st_mode & 0o777 == 0o600


def test_a_replication_peer_writes_by_signature_until_its_quota_is_spent(tmp_path):
    """Two storage peers that replicate with each other: B's signed uploads to A count against B's quota."""
    from agoranet.node.storage_api import StorageAccess

    socks = [bind(), bind()]
    urls = [url_of(s) for s in socks]
    keys = [Identity.generate(), Identity.generate()]
    stores = [Blockstore(tmp_path / f"s{i}") for i in range(2)]
    replicators = [StorageReplicator(stores[i], urls[i], urls, identity=keys[i], recheck_interval=3600)
                   for i in range(2)]
    quota = StorageAccess(operator_token=None, peer_bytes_per_s=1.0, peer_burst_bytes=64 << 10)
    servers = [BackgroundServer(storage_app(stores[i], replicators[i], quota), socks[i]).start() for i in range(2)]
    try:
        statuses = []
        for i in range(6):
            block = bytes([i]) * (16 << 10)
            target = f"{urls[0]}{BLOCKS}/{cid_of(block, RAW)}"
            statuses.append(httpx.put(target, content=block, headers=signed(keys[1], "PUT", target, block)).status_code)
        assert statuses == [201, 201, 201, 201, 429, 429], statuses  # 64 KiB of burst, then the quota holds
    finally:
        for server in servers:
            server.stop()
        for store in stores:
            store.close()
