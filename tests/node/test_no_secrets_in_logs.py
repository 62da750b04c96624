"""Prompts and API keys never reach a node's logs: a gateway run as users run it (`--log-json`), and
the provider behind it, are sent a secret-looking prompt and key; neither appears in any log line."""

from __future__ import annotations

import json
import logging
import secrets

import httpx
import openai
import pytest

from agoranet.core.identity import Identity
from agoranet.engine.stub import StubEngine
from agoranet.net.gossip import GossipConfig
from agoranet.node.keys import KEYS_FILE, KeyStore

from ..conftest import FAST_GOSSIP, NodeProcess, free_port, start_provider, wait_for


def test_prompts_and_api_keys_never_appear_in_logs(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # the in-process provider, at its most talkative
    home = tmp_path / "gw"
    Identity.generate().save(home / "identity.key")
    keys = KeyStore(home / KEYS_FILE)
    _, api_key = keys.create("alice")
    keys.close()
    prompt = f"my password is hunter2-{secrets.token_hex(8)}"
    wrong_key = f"agk_nosuchid_{secrets.token_hex(16)}"

    gw = NodeProcess(["gateway", "--log-json", "--require-keys", "--gossip-interval", str(FAST_GOSSIP)],
                     home, free_port())
    prov = None
    try:
        gw.wait_ready()
        prov, provider = start_provider(tmp_path / "p", engine=StubEngine(model_name="agora-tiny"), peers=[gw.url],
                                        gossip=GossipConfig(interval_s=FAST_GOSSIP))
        wait_for(lambda: httpx.get(f"{gw.url}/v1/models").json()["data"], what="the gateway to find the provider")
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0)
        messages = [{"role": "user", "content": prompt}]
        assert client.chat.completions.create(model="agora-tiny", messages=messages, max_tokens=4).choices
        assert list(client.chat.completions.create(model="agora-tiny", messages=messages, max_tokens=4, stream=True))
        assert client.completions.create(model="agora-tiny", prompt=prompt, max_tokens=4).choices
        with pytest.raises(openai.BadRequestError):  # an invalid request that carries the prompt
            client.chat.completions.create(model="agora-tiny", messages=messages, max_tokens=4, temperature=50)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{gw.url}/v1", api_key=wrong_key, max_retries=0).chat.completions.create(
                model="agora-tiny", messages=messages, max_tokens=4)
    finally:
        if prov is not None:
            prov.stop()
        gw.stop()

    logged = [json.loads(line) for line in gw.log.read_text().splitlines() if line.startswith("{")]
    assert any(rec["msg"] == "Application startup complete." for rec in logged), "the gateway's log was not captured"
    # The nodes' own loggers only: the test's openai client logs its requests at DEBUG, as a client may.
    node_lines = [r.getMessage() + repr(r.__dict__) for r in caplog.records if r.name.startswith(("agoranet", "uvicorn"))]
    everything = gw.log.read_text() + "\n".join(node_lines)
    for secret in (prompt, "hunter2", api_key, api_key.split("_")[-1], wrong_key):
        assert secret not in everything, f"{secret!r} was logged"
