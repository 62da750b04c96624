"""Bytes a client receives for one 32-token chat answer: with the full receipt, and with the compact one.

Starts a provider (agora-tiny, built-in engine) and a gateway that discovers it, in this process on
127.0.0.1, and asks the same 32-token chat request (temperature 0.8, seed 1, no logprobs asked) through
the gateway and straight to the provider, streamed and not, with `agora.receipt` = full, compact, and
unset (the server's default). Counts the response body bytes as they come off the wire (SSE framing
included, headers not).

    python benchmarks/receipt_sizes.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import httpx

from agoranet.core.identity import Identity
from agoranet.net.gossip import GossipConfig
from agoranet.node.node import ProviderOptions, build_gateway_node, build_provider_node
from agoranet.node.server import BackgroundServer, bind, url_of

ASK = {"model": "agora-tiny", "messages": [{"role": "user", "content": "write a function that adds two numbers"}],
       "max_tokens": 32, "temperature": 0.8, "seed": 1}


def size(url: str, stream: bool, mode: str | None) -> tuple[int, int]:
    """(response body bytes, completion tokens) of one answer."""
    body = ASK | ({"stream": True, "stream_options": {"include_usage": True}} if stream else {})
    body |= {"agora": {"receipt": mode}} if mode else {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        r.raise_for_status()
        data = b"".join(r.iter_raw())
    if stream:
        usage = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")][-1]["usage"]
    else:
        usage = json.loads(data)["usage"]
    return len(data), usage["completion_tokens"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in ("gw", "p"):
            (root / name).mkdir()
            Identity.generate().save(root / name / "identity.key")
        gw_sock = bind()
        gw_app, gateway = build_gateway_node(root / "gw", url_of(gw_sock), [], gossip=GossipConfig(interval_s=0.3))
        gw = BackgroundServer(gw_app, gw_sock).start()
        p_sock = bind()
        p_app, _ = build_provider_node(root / "p", url_of(p_sock), ProviderOptions(threads=1), peers=[gw.url],
                                       gossip=GossipConfig(interval_s=0.3))
        prov = BackgroundServer(p_app, p_sock).start()
        try:
            deadline = time.monotonic() + 60
            while not httpx.get(f"{gw.url}/v1/models").json()["data"] and time.monotonic() < deadline:
                time.sleep(0.2)
            rows = []
            for where, url in (("gateway", gw.url), ("provider", prov.url)):
                for stream in (False, True):
                    for mode in (None, "full", "compact"):
                        n, tokens = size(url, stream, mode)
                        rows.append({"via": where, "stream": stream, "agora.receipt": mode or "(default)",
                                     "bytes": n, "completion_tokens": tokens})
            for row in rows:
                print(json.dumps(row))
        finally:
            prov.stop()
            gw.stop()


if __name__ == "__main__":
    main()
