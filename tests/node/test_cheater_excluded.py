"""A cheating provider in a 3-provider network stops getting traffic once a verifier proves its fraud."""

from __future__ import annotations

import asyncio

import openai
import pytest

from agoranet.net.gossip import GossipConfig
from agoranet.node.node import ProviderOptions
from agoranet.node.verifier import VerifierConfig

from ..conftest import FAST_GOSSIP, wait_for


@pytest.mark.slow
def test_cheater_is_cut_off_after_its_fraud_proof(nodes):
    verifier_server, verifier = nodes.verifier(config=VerifierConfig(audit_fraction=1.0, seed=1))
    gw_server, gateway = nodes.gateway(verifiers=(verifier_server.url,), reputation_interval_s=0.3)
    network = dict(peers=[gw_server.url], gossip=GossipConfig(interval_s=FAST_GOSSIP))
    ids = {}
    for name, price, cheat in (("honest-a", 200_000, None), ("honest-b", 300_000, None), ("cheater", 50_000, "token")):
        _, prov = nodes.provider(name, ProviderOptions(threads=1, cheat=cheat, pricing={"output_per_mtok": price}),
                                 **network)
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
    # The cheapest honest provider takes over; once it is proven, honest-b (on probation) may lead a
    # tenth of the requests (GatewayConfig.probation_share), so it is not asserted to get none.
    names = [k for s in served for k, v in ids.items() if v == s]
    assert names[0] == "honest-a" and names.count("honest-a") > len(names) // 2, names
    assert not gateway.verifiers.excluded(ids["honest-a"])
