"""The upstream engine against a real OpenAI-compatible server: a second Agora node in its own process."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from agoranet.core.errors import EngineError
from agoranet.core.records import ReceiptBody, verify_record
from agoranet.engine.upstream import UpstreamEngine
from agoranet.node.node import ProviderOptions

from ..conftest import NodeProcess, free_port, start_provider

MSG = [{"role": "user", "content": "parse a csv file"}]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    node = NodeProcess(["provide", "--threads", "1"], tmp_path_factory.mktemp("upstream"), free_port()).wait_ready()
    try:
        yield node.url
    finally:
        node.stop()


def test_wrapping_provider_resells_upstream_answers_with_its_own_receipts(upstream, tmp_path):
    server, wrapper = start_provider(tmp_path, ProviderOptions(upstream=upstream, upstream_model="agora-tiny"))
    try:
        direct = openai.OpenAI(base_url=f"{upstream}/v1", api_key="x", max_retries=0)
        via = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        args = dict(messages=MSG, max_tokens=20, temperature=0.7, seed=3)
        expected = direct.chat.completions.create(model="agora-tiny", **args).choices[0].message.content

        r = via.chat.completions.create(model="agora-tiny", **args)
        assert r.choices[0].message.content == expected
        receipt = verify_record(r.model_extra["agora"]["receipt"], ReceiptBody)
        assert receipt.signer == str(wrapper.identity.peer_id)
        assert receipt.body.precision == "upstream" and receipt.body.output_text == expected
        assert receipt.body.output_tokens == [] and r.usage.completion_tokens == 20

        chunks = list(via.chat.completions.create(model="agora-tiny", stream=True, **args))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert verify_record(chunks[-1].model_extra["agora"]["receipt"]).body.output_text == expected

        text = via.completions.create(model="agora-tiny", prompt="class Foo:\n", max_tokens=10, temperature=0)
        assert text.choices[0].text == direct.completions.create(
            model="agora-tiny", prompt="class Foo:\n", max_tokens=10, temperature=0).choices[0].text

        # The upstream's own refusals come back as the same 4xx, with its reason.
        bad = httpx.post(f"{server.url}/v1/chat/completions",
                         json={"model": "agora-tiny", "messages": [{"role": "user", "content": "x" * 1000}],
                               "max_tokens": 500})
        assert bad.status_code == 400 and "context" in bad.json()["error"]["message"]
    finally:
        server.stop()


def test_unreachable_or_wrong_upstream_is_reported_clearly(upstream):
    engine = UpstreamEngine(f"http://127.0.0.1:{free_port()}", model="m")
    with pytest.raises(EngineError, match="does not answer"):
        asyncio.run(engine.start())
    engine = UpstreamEngine(upstream, model="llama-70b")
    with pytest.raises(EngineError, match="--upstream-model"):
        asyncio.run(engine.start())
