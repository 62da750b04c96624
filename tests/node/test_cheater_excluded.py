"""A cheating provider in a 3-provider network stops getting traffic once a verifier proves its fraud."""

from __future__ import annotations

import asyncio

import openai
import pytest

from agoranet.net.gossip import GossipConfig
from agoranet.node.node import ProviderOptions, build_verifier_node
from agoranet.node.server import BackgroundServer, bind
from agoranet.node.verifier import VerifierConfig

from ..conftest import FAST_GOSSIP, start_gateway, start_provider, wait_for


@pytest.mark.slow
def test_cheater_is_cut_off_after_its_fraud_proof(tmp_path):
    servers = []
    try:
        sock = bind()
        app, verifier = build_verifier_node(tmp_path / "verifier", VerifierConfig(audit_fraction=1.0, seed=1))
        servers.append(BackgroundServer(app, sock).start())
        verifier_url = servers[-1].url
        gw_server, gateway = start_gateway(tmp_path / "gateway", verifiers=(verifier_url,), reputation_interval_s=0.3)
        servers.append(gw_server)
        network = dict(peers=[gw_server.url], gossip=GossipConfig(interval_s=FAST_GOSSIP))
        ids = {}
        for name, price, cheat in (("honest-a", 200_000, None), ("honest-b", 300_000, None), ("cheater", 50_000, "token")):
            server, prov = start_provider(tmp_path / name, ProviderOptions(
                threads=1, cheat=cheat, pricing={"output_per_mtok": price}), **network)
            servers.append(server)
            ids[name] = str(prov.identity.peer_id)
        wait_for(lambda: len(asyncio.run(gateway.discovery.find_offers("agora-tiny"))) == 3, what="3 offers")

        client = openai.OpenAI(base_url=f"{gw_server.url}/v1", api_key="x", max_retries=0)

        def ask(i: int) -> str:
            r = client.chat.completions.create(
                model="agora-tiny", messages=[{"role": "user", "content": f"task {i}"}], max_tokens=16, seed=i,
                temperature=0.8, extra_body={"provider": {"sort": "price"}})
            return r.model_extra["agora"]["provider"]

        assert ask(0) == ids["cheater"]  # cheapest, so it gets the first request
        wait_for(lambda: gateway.verifiers.excluded(ids["cheater"]), timeout=60, what="the cheater's exclusion")
        assert verifier.reputation.providers[ids["cheater"]].fraud_proofs
        served = [ask(i) for i in range(1, 9)]
        assert ids["cheater"] not in served
        assert set(served) == {ids["honest-a"]}  # the cheapest honest provider takes over
        assert not gateway.verifiers.excluded(ids["honest-a"])
    finally:
        for s in reversed(servers):
            s.stop()
