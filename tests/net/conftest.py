"""Linux network namespaces for the tests that split a network (need root and `ip netns`): a test
module lists its namespaces in NETS, (name, host veth, namespace veth, /24 prefix), and takes the
`namespaces` fixture."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager

import pytest


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"agora-probe-{uuid.uuid4().hex[:4]}"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "del", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` fails here: {exc.stderr.decode().strip()}"
    return None


@contextmanager
def veth_namespaces(nets):
    """One network namespace per entry, linked to the host by a veth pair; all removed afterwards."""
    if (reason := namespaces_unavailable()) is not None:
        pytest.skip(reason)
    try:
        for ns, host_if, ns_if, net in nets:
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            sh("ip", "link", "set", ns_if, "netns", ns)
            sh("ip", "addr", "add", f"{net}.1/24", "dev", host_if)
            sh("ip", "link", "set", host_if, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.2/24", "dev", ns_if)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield nets
    finally:
        for ns, host_if, _, _ in nets:
            subprocess.run(["ip", "link", "del", host_if], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def namespaces(request):
    """The namespaces of the test module's NETS (each module its own names and addresses)."""
    with veth_namespaces(request.module.NETS) as nets:
        yield nets
