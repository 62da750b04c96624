"""API keys on a gateway that requires them: hashes only, rate limits, quotas, metering."""

from __future__ import annotations

import openai
import pytest
from ..conftest import FAST_GOSSIP, start_gateway, start_provider, wait_for

from agoranet.engine.stub import StubEngine
from agoranet.net.gossip import GossipConfig


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    gw, gateway = start_gateway(root / "gw", require_keys=True)
    prov, provider = start_provider(root / "p", engine=StubEngine(model_name="agora-tiny"), peers=[gw.url],
                                    gossip=GossipConfig(interval_s=FAST_GOSSIP))
    wait_for(lambda: str(provider.identity.peer_id) in gateway.discovery.members(), what="the provider")
    try:
        yield gw.url, gateway
    finally:
        prov.stop()
        gw.stop()


def ask(url: str, key: str, **kw):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    return client.chat.completions.create(model="agora-tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, **kw)


def test_requests_need_a_valid_unrevoked_key(keyed):
    url, gateway = keyed
    key, secret = gateway.keys.create("alice")
    with pytest.raises(openai.AuthenticationError):
        ask(url, "unused")
    with pytest.raises(openai.AuthenticationError):
        ask(url, secret[:-2] + "xx")
    assert ask(url, secret).choices[0].message.content
    assert secret not in (gateway.keys._db.execute("SELECT group_concat(hash) FROM keys").fetchone()[0])
    gateway.keys.revoke(key.id)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        ask(url, secret)


def test_rate_limit_quota_and_metering(keyed):
    url, gateway = keyed
    limited, secret = gateway.keys.create("bob", rate_per_min=2)
    ask(url, secret)
    list(ask(url, secret, stream=True))
    with pytest.raises(openai.RateLimitError, match="rate limit"):
        ask(url, secret)
    used = gateway.keys.get(limited.id)
    assert used.requests == 2 and used.used_tokens == 2 * (8 + 3) and used.charged > 0
    # Admission reserves the most a request can use (its prompt bound, 3 tokens a byte + overheads, and
    # max_tokens: 77 here); what it really used (11) is counted when it ends and the rest released.
    quota, qsecret = gateway.keys.create("carol", quota_tokens=80)
    ask(url, qsecret)
    assert gateway.keys.get(quota.id).used_tokens == 8 + 3
    with pytest.raises(openai.RateLimitError, match="quota"):  # 11 used + 77 more could exceed 80
        ask(url, qsecret)
