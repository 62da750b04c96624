"""A non-streamed answer that takes longer than the gateway's stall timeout still arrives: the provider
keeps the connection alive while the model works, and the gateway times out on silence only."""

from __future__ import annotations

import time

import openai

from agoranet.net.gossip import GossipConfig
from agoranet.node.node import ProviderOptions

from ..conftest import FAST_GOSSIP, fetch_receipt, start_gateway, start_provider, wait_for

STALL_S = 1.0


def test_plain_answer_slower_than_the_stall_timeout_arrives_whole(tmp_path):
    gw_server, gateway = start_gateway(tmp_path / "gw", stall_timeout_s=STALL_S)
    # 24 tokens 150 ms apart: ~3.6 s of generation, over three times the gateway's stall timeout
    server, prov = start_provider(tmp_path / "p", ProviderOptions(threads=1, token_delay_ms=150,
                                                                  pricing={"keepalive_s": 0.25}),
                                  peers=[gw_server.url], gossip=GossipConfig(interval_s=FAST_GOSSIP))
    try:
        wait_for(lambda: str(prov.identity.peer_id) in gateway.discovery.members(), what="the provider")
        args = dict(model="agora-tiny", messages=[{"role": "user", "content": "a long one"}], max_tokens=24,
                    temperature=0.8, seed=5, logprobs=True, top_logprobs=2)
        started = time.monotonic()
        r = openai.OpenAI(base_url=f"{gw_server.url}/v1", api_key="x", max_retries=0).chat.completions.create(**args)
        took = time.monotonic() - started
        receipt = fetch_receipt(r.model_extra["agora"])
        assert took > 3 * STALL_S and r.usage.completion_tokens == 24 == len(r.choices[0].logprobs.content)
        assert receipt.body.output_text == r.choices[0].message.content and r.choices[0].finish_reason == "length"
        assert len(r.model_extra["agora"]["receipts"]) == 1  # one provider did it all: no failover, no retry
        # the provider's kept-alive answer read directly by the SDK (whitespace first is still JSON)
        direct = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0).chat.completions.create(**args)
        assert direct.usage.completion_tokens == 24
        assert fetch_receipt(direct.model_extra["agora"]).body.output_text == direct.choices[0].message.content
    finally:
        server.stop()
        gw_server.stop()
