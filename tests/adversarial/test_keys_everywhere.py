"""Keys everywhere: a gateway+provider node with --require-keys serves inference only with a key."""

from __future__ import annotations

import json

import httpx

from agoranet.core.identity import Identity
from agoranet.engine.stub import StubEngine
from agoranet.net.gossip import GossipConfig
from agoranet.node.gateway import GatewayConfig
from agoranet.node.node import PROVIDER_PATH, build_node
from agoranet.node.server import BackgroundServer, bind, url_of

from ..conftest import FAST_GOSSIP, wait_for

CHAT = {"model": "agora-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def test_the_provider_beside_a_keyed_gateway_serves_only_that_gateway(tmp_path):
    sock = bind()
    url = url_of(sock)
    node = build_node(tmp_path, url, ["gateway", "provider"], engine=StubEngine(model_name="agora-tiny"),
                      gateway=GatewayConfig(require_keys=True), gossip=GossipConfig(interval_s=FAST_GOSSIP))
    with BackgroundServer(node.app, sock):
        wait_for(lambda: node.gateway.discovery.members(), what="the node's own provider in its gossip")
        _, secret = node.gateway.keys.create("alice")
        # Around the gateway, straight to the provider's API: no key, no answer, on every inference path.
        for path in ("/v1/chat/completions", "/v1/completions"):
            body = CHAT if "chat" in path else {"model": "agora-tiny", "prompt": "hi", "max_tokens": 4}
            r = httpx.post(f"{url}{PROVIDER_PATH}{path}", json=body)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", r.text
            r = httpx.post(f"{url}{PROVIDER_PATH}{path}", json=body, headers={"authorization": f"Bearer {secret}"})
            assert r.status_code == 401, r.text  # a user's key is for the gateway, which meters it
        # A stranger's signature is not the node's.
        from agoranet.net.signed_request import HEADER, sign_request

        raw = json.dumps(CHAT).encode()
        target = f"{url}{PROVIDER_PATH}/v1/chat/completions"
        stranger = {HEADER: sign_request(Identity.generate(), "POST", httpx.URL(target).path, raw),
                    "content-type": "application/json"}
        assert httpx.post(target, content=raw, headers=stranger).status_code == 403
        # Through the gateway: no key is refused, a key is served, by the node's own provider.
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT).status_code == 401
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {secret}"})
        assert r.status_code == 200 and r.json()["agora"]["provider"] == str(node.identity.peer_id), r.text
