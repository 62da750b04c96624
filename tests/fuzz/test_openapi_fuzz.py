"""Schemathesis against a real node's own OpenAPI schema: whatever it is sent, never a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from agoranet.core.identity import Identity
from agoranet.node.node import ProviderOptions

from ..conftest import start_provider


@pytest.fixture(scope="module")
def provider_url(tmp_path_factory):
    # Small limits so fuzzed requests that are valid finish fast; invalid ones must still get a 4xx.
    server, _ = start_provider(tmp_path_factory.mktemp("fuzz"), ProviderOptions(
        threads=1, pricing={"max_tokens": 4, "default_max_tokens": 2}))
    try:
        yield server.url
    finally:
        server.stop()


def fuzz_node(url: str, examples: int) -> list[str]:
    """Run every operation of the node's schema through hypothesis; return what each was called."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    called = []
    for result in schema.get_all_operations():
        operation = result.ok()
        called.append(f"{operation.method.upper()} {operation.path}")

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            response = case.call(timeout=30)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")
            if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
                body = response.json()
                assert isinstance(body.get("error"), dict) and body["error"].get("message"), body

        check()
    return called


@pytest.mark.slow
def test_provider_never_answers_5xx(provider_url):
    called = fuzz_node(provider_url, examples=40)
    assert "POST /v1/chat/completions" in called and "GET /agora/v1/log/entries" in called


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory):
    """A gateway with one stub-engine provider it found by gossip (so routed requests really go through)."""
    from agoranet.engine.stub import StubEngine
    from agoranet.net.gossip import GossipConfig
    from agoranet.node.node import build_provider_node
    from agoranet.node.server import BackgroundServer, bind, url_of

    from ..conftest import FAST_GOSSIP, start_gateway, wait_for

    root = tmp_path_factory.mktemp("fuzz-gw")
    gw, gateway = start_gateway(root / "gw")
    Identity.generate().save(root / "p" / "identity.key")
    sock = bind()
    app, provider = build_provider_node(root / "p", url_of(sock), ProviderOptions(pricing={"max_tokens": 4}),
                                        peers=[gw.url], gossip=GossipConfig(interval_s=FAST_GOSSIP),
                                        engine=StubEngine(model_name="stub"))
    prov = BackgroundServer(app, sock).start()
    try:
        wait_for(lambda: str(provider.identity.peer_id) in gateway.discovery.members(), what="the provider")
        yield gw.url
    finally:
        prov.stop()
        gw.stop()


@pytest.fixture(scope="module")
def verifier_url(tmp_path_factory):
    from agoranet.node.node import build_verifier_node
    from agoranet.node.server import BackgroundServer, bind
    from agoranet.node.verifier import VerifierConfig

    app, _ = build_verifier_node(tmp_path_factory.mktemp("fuzz-verifier"), VerifierConfig(audit_fraction=1.0, seed=1))
    with BackgroundServer(app, bind()) as server:
        yield server.url


@pytest.mark.slow
def test_gateway_never_answers_5xx(gateway_url):
    called = fuzz_node(gateway_url, examples=25)
    assert {"POST /v1/chat/completions", "POST /agora/v1/gossip", "GET /agora/v1/providers"} <= set(called)


@pytest.mark.slow
def test_verifier_never_answers_5xx(verifier_url):
    called = fuzz_node(verifier_url, examples=25)
    assert {"POST /agora/v1/verify", "POST /agora/v1/fraud-proofs", "GET /agora/v1/reputation"} <= set(called)


@pytest.mark.parametrize("node", ["", "x", "ftp://a", "http://[::1", "http://127.0.0.1:9"])
def test_verifier_refuses_an_unusable_node_url_with_a_4xx(verifier_url, node):
    """Found by the fuzzer: an unparsable or unreachable `node` used to escape as a 500."""
    import httpx

    r = httpx.post(f"{verifier_url}/agora/v1/verify", json={"receipt_cid": "bafyx", "node": node}, timeout=30)
    assert 400 <= r.status_code < 500 and r.json()["error"]["message"], r.text


@pytest.mark.parametrize("path", ["/agora/v1/fraud-proofs", "/agora/v1/verdicts"])
def test_a_cursor_beyond_sqlite_integers_is_a_clear_400(verifier_url, path):
    """Found by the fuzzer: `?after=` over 2**63 used to raise OverflowError (500) in NodeState.since."""
    import httpx

    for after in (10**30, -(10**30)):
        r = httpx.get(f"{verifier_url}{path}", params={"after": after})
        assert r.status_code == 400 and r.json()["error"]["param"] == "query.after", r.text
    assert httpx.get(f"{verifier_url}{path}", params={"after": 2**62}).json()["next"] == 2**62  # past the end
