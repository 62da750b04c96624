"""`build_node`: several roles in one app, sharing one identity, one log, one discovery and one port."""

from __future__ import annotations

import httpx
import pytest

from agoranet.core.cid import RAW, cid_of
from agoranet.core.records import ReceiptBody, verify_record
from agoranet.engine.stub import StubEngine
from agoranet.net.gossip import GossipConfig
from agoranet.node.node import PROVIDER_PATH, StorageOptions, UnknownRole, build_node, parse_roles
from agoranet.node.server import BackgroundServer, bind, url_of

from ..conftest import FAST_GOSSIP, FULL, operator


def test_roles_are_validated_deduplicated_and_ordered():
    assert parse_roles("provider, Gateway,provider") == ("gateway", "provider")
    with pytest.raises(UnknownRole, match="unknown role 'gatway'.*gateway, provider, verifier, storage"):
        parse_roles("gatway,provider")
    with pytest.raises(UnknownRole, match="no role"):
        parse_roles(" , ")


@pytest.fixture
def node(tmp_path):
    sock = bind()
    url = url_of(sock)
    built = build_node(tmp_path, url, ["storage", "provider", "gateway"], engine=StubEngine(),
                       gossip=GossipConfig(interval_s=FAST_GOSSIP), storage=StorageOptions(recheck_interval_s=3600))
    with BackgroundServer(built.app, sock):
        yield url, built, tmp_path


def test_gateway_provider_and_storage_share_one_identity_log_and_port(node):
    url, built, home = node
    assert [type(r).__name__ for r in built.app.state.roles] == [
        "LogRole", "CreditsRole", "StorageRole", "Provider", "WitnessRole", "NetworkRole", "Gateway"]
    assert built.provider.identity is built.gateway.identity is built.identity
    assert built.provider.log is next(r for r in built.app.state.roles if type(r).__name__ == "LogRole")
    assert built.discovery.roles == ["gateway", "provider", "storage"]
    assert built.provider.offer().body.url == url + PROVIDER_PATH
    # The gateway owns /v1 and routes to the node's own provider over HTTP, under /provider.
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["owned_by"] == "agora"
    assert httpx.get(f"{url}{PROVIDER_PATH}/v1/models").json()["data"][0]["owned_by"] == str(built.identity.peer_id)
    answer = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **FULL}).json()
    receipt = verify_record(answer["agora"]["receipt"], ReceiptBody)
    assert receipt.signer == str(built.identity.peer_id) and built.gateway.routing.of(receipt.signer).served == 1
    for base in (url, url + PROVIDER_PATH):  # the node's records, and its provider's where its offer points
        assert httpx.get(f"{base}/agora/v1/records/{receipt.cid}").json()["record"] == answer["agora"]["receipt"]
    assert httpx.get(f"{url}/agora/v1/log/proof/inclusion", params={"cid": str(receipt.cid)}).status_code == 200
    # The storage peer takes blocks far over the provider's and gateway's 1 MiB request limit.
    block = b"x" * (3 << 20)
    cid = cid_of(block, RAW)
    assert httpx.put(f"{url}/agora/v1/blocks/{cid}", content=block, headers=operator(home)).status_code == 201
    assert httpx.get(f"{url}/agora/v1/blocks/{cid}").content == block


def test_a_node_without_a_gateway_serves_its_provider_at_the_root(tmp_path):
    sock = bind()
    url = url_of(sock)
    built = build_node(tmp_path, url, ["provider", "storage"], engine=StubEngine())
    assert built.discovery is None and built.gateway is None  # no gateway and no peers: nobody to gossip with
    assert built.provider.offer().body.url == url
    with BackgroundServer(built.app, sock):
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["owned_by"] == str(built.identity.peer_id)
        assert httpx.get(f"{url}/agora/v1/offer").json()["record"]["body"]["url"] == url
        assert httpx.get(f"{url}/agora/v1/blocks").json()["url"] == url


def test_body_limits_follow_the_route_not_the_largest_role(node):
    # The storage role takes blocks of up to 4 MiB; the gateway's and provider's routes keep 1 MiB.
    url, _, _ = node
    for path in ("/v1/chat/completions", f"{PROVIDER_PATH}/v1/chat/completions", "/agora/v1/gossip"):
        r = httpx.post(url + path, content=b"x" * (2 << 20))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", path
