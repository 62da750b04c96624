"""A network split in two and healed: gossip membership converges again within a bounded time.

Three gateways (gossip without a model, so the test is cheap): one on the host, one in each of two
network namespaces linked to the host by veth pairs. Taking one link down splits the network into
{host, ns0} and {ns1}; each side evicts the other within a few heartbeats, and once the link is up
again all three see all three. Needs root and `ip netns` (skipped otherwise, with the reason).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from agoranet.core.identity import Identity

from ..conftest import FAST_GOSSIP, NodeProcess, free_port, start_gateway, wait_for
from .conftest import sh

TAG = uuid.uuid4().hex[:4]
NETS = [(f"agora-{TAG}-p{i}", f"ag{TAG}q{i}", f"ag{TAG}r{i}", f"10.214.{i}") for i in range(2)]
CONVERGE_S = 20.0  # the bound: a few gossip rounds plus heartbeat expiry, with room for a loaded CI box


@pytest.mark.slow
def test_split_network_heals_and_gossip_membership_converges(namespaces, tmp_path):
    server, host_gw = start_gateway(tmp_path / "host", host="0.0.0.0", public_host=f"{NETS[0][3]}.1")
    port = server.sock.getsockname()[1]
    procs = [NodeProcess(["gateway", "--host", f"{net}.2", "--peer", f"http://{net}.1:{port}",
                          "--gossip-interval", str(FAST_GOSSIP)], tmp_path / f"g{i}", free_port(), host=f"{net}.2",
                         prefix=["ip", "netns", "exec", ns])
             for i, (ns, _, _, net) in enumerate(namespaces)]
    try:
        for p in procs:
            p.wait_ready()
        ids = [str(Identity.load(tmp_path / f"g{i}" / "identity.key").peer_id) for i in range(2)]
        everyone = {str(host_gw.identity.peer_id), *ids}

        def members_of(i: int) -> set[str]:
            """What the gateway in namespace i sees, asked from inside that namespace."""
            fetch = f"import urllib.request; print(urllib.request.urlopen('{procs[i].url}/agora/v1/peers', timeout=1).read().decode())"
            out = subprocess.run(["ip", "netns", "exec", NETS[i][0], sys.executable, "-c", fetch],
                                 capture_output=True, text=True)
            try:
                return set(json.loads(out.stdout)["members"])
            except ValueError:
                return set()

        wait_for(lambda: all(members_of(i) == everyone for i in range(2))
                 and set(host_gw.discovery.members()) == everyone, timeout=CONVERGE_S, what="first convergence")

        sh("ip", "link", "set", NETS[1][1], "down")  # split: {host, ns0} | {ns1}
        wait_for(lambda: set(host_gw.discovery.members()) == everyone - {ids[1]}
                 and members_of(0) == everyone - {ids[1]} and members_of(1) == {ids[1]},
                 timeout=CONVERGE_S, what="each side to evict the other")

        sh("ip", "link", "set", NETS[1][1], "up")  # heal
        healed_at = time.monotonic()
        wait_for(lambda: all(members_of(i) == everyone for i in range(2))
                 and set(host_gw.discovery.members()) == everyone, timeout=CONVERGE_S, what="convergence after heal")
        print(f"membership converged {time.monotonic() - healed_at:.1f}s after the partition healed")
    finally:
        for p in procs:
            p.stop()
        server.stop()
