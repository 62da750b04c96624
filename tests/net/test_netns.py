"""Nodes in their own Linux network namespaces (own addresses, veth links); one is cut off and the
gateway routes around it, then evicts it once its heartbeats stop. Needs root and `ip netns`."""

from __future__ import annotations

import uuid

import httpx
import openai
import pytest
from ..conftest import provider_process, start_gateway, wait_for
from .conftest import sh


TAG = uuid.uuid4().hex[:4]
NETS = [(f"agora-{TAG}-{i}", f"ag{TAG}h{i}", f"ag{TAG}n{i}", f"10.213.{i}") for i in range(2)]


@pytest.mark.slow
def test_gateway_routes_around_a_provider_cut_off_from_the_network(namespaces, tmp_path):
    server, gateway = start_gateway(tmp_path / "gw", host="0.0.0.0", public_host=f"{NETS[0][3]}.1",
                                    connect_timeout_s=1.0, stall_timeout_s=3.0)
    port = server.sock.getsockname()[1]
    procs = [provider_process(tmp_path / f"p{i}", f"http://{net}.1:{port}", price_out=price, host=f"{net}.2",
                              prefix=["ip", "netns", "exec", ns])
             for i, ((ns, _, _, net), price) in enumerate(zip(namespaces, (100_000, 400_000)))]
    try:
        for p in procs:
            p.wait_ready()
        cheap, dear = (httpx.get(f"{p.url}/agora/v1/offer").json()["record"]["signer"] for p in procs)
        wait_for(lambda: {cheap, dear} <= set(gateway.discovery.members()), what="both providers to be discovered")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)

        def served_by() -> str:
            r = client.chat.completions.create(model="agora-tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8, extra_body={"provider": {"sort": "price"}})
            return r.model_extra["agora"]["provider"]

        assert served_by() == cheap
        sh("ip", "link", "set", namespaces[0][1], "down")  # the cheap provider is cut off
        assert [served_by() for _ in range(3)] == [dear] * 3
        wait_for(lambda: cheap not in gateway.discovery.members(), timeout=15, what="the cut-off peer's eviction")
        assert dear in gateway.discovery.members()
    finally:
        for p in procs:
            p.stop()
        server.stop()
