"""Whole nodes on libp2p discovery: a gateway finds a provider through the Kademlia DHT alone and
routes the official openai SDK's request to it."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from agoranet.core.identity import Identity
from agoranet.net.gossip import GossipConfig
from agoranet.net.libp2p import P2PConfig
from agoranet.net.p2pd import DaemonOptions, P2PDaemonMissing, find_p2pd
from agoranet.node.node import ProviderOptions, build_gateway_node
from agoranet.node.server import BackgroundServer, bind, url_of

from ..conftest import start_provider

try:
    find_p2pd()
except P2PDaemonMissing as exc:
    pytest.skip(f"no go-libp2p daemon here ({exc}); install it with pip install 'agoranet[p2p]'",
                allow_module_level=True)

FAST = GossipConfig(interval_s=0.5)


def start_gateway(home, p2p: P2PConfig) -> BackgroundServer:
    Identity.generate().save(home / "identity.key")
    sock = bind()
    app, _ = build_gateway_node(home, url_of(sock), [], gossip=FAST, p2p=p2p)
    return BackgroundServer(app, sock).start()


def multiaddrs(url: str) -> tuple[str, ...]:
    return tuple(httpx.get(f"{url}/agora/v1/peers").json()["multiaddrs"])


def test_a_gateway_routes_to_a_provider_it_found_through_the_dht_alone(tmp_path):
    seed = start_gateway(tmp_path / "seed", P2PConfig())
    servers = [seed]
    try:
        joined = P2PConfig(daemon=DaemonOptions(bootstrap=multiaddrs(seed.url)))
        server, provider = start_provider(tmp_path / "provider", ProviderOptions(threads=1), p2p=joined, gossip=FAST)
        servers.append(server)
        # follows no topic: it hears of no provider until it looks one up
        gateway = start_gateway(tmp_path / "gateway", P2PConfig(daemon=joined.daemon, global_topic=False))
        servers.append(gateway)
        assert httpx.get(f"{gateway.url}/v1/models").json()["data"] == []
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 60
        while True:  # until the provider's DHT announcement has landed
            try:
                answer = client.chat.completions.create(model="agora-tiny", max_tokens=8, seed=1,
                                                        messages=[{"role": "user", "content": "hi"}])
                break
            except openai.NotFoundError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert answer.model_extra["agora"]["provider"] == str(provider.identity.peer_id)
        assert answer.choices[0].message.content is not None
        peers = httpx.get(f"{gateway.url}/agora/v1/peers").json()
        assert peers["topics"] == [f"agora/1/model/{provider.engine.model_cid}"]
        assert peers["dht_lookups"] >= 1 and peers["fetches"] >= 1
        assert peers["members"].get(str(provider.identity.peer_id)) == server.url
        # asked by CID now: it already follows the model, no other lookup needed
        again = client.completions.create(model=provider.engine.model_cid, prompt="def", max_tokens=4, seed=2)
        assert again.model_extra["agora"]["provider"] == str(provider.identity.peer_id)
    finally:
        for s in reversed(servers):
            s.stop()
