"""`agora demo`: the whole network that exists so far, on 127.0.0.1, in one process, then gone."""

from __future__ import annotations

import tempfile

import httpx
import time
from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from agoranet.core.identity import Identity
from agoranet.core.records import ReceiptBody, verify_record
from agoranet.engine.tokenizer import ByteTokenizer
from agoranet.log.records import verify_tree_head
from agoranet.log.transparency import check_inclusion


def run_demo(console: Console, *, prompt: str, max_tokens: int, seed: int) -> None:
    import openai

    from agoranet.engine.models import resolve_model
    from agoranet.node.node import ProviderOptions, build_provider_node
    from agoranet.node.server import BackgroundServer, bind, url_of

    with tempfile.TemporaryDirectory(prefix="agora-demo-") as tmp:
        home = Path(tmp) / "provider"
        Identity.generate().save(home / "identity.key")
        sock = bind()
        t0 = time.perf_counter()
        app, provider = build_provider_node(home, url_of(sock), ProviderOptions(threads=None))
        with BackgroundServer(app, sock) as server:
            e = provider.engine
            console.print(f"[green]provider[/] {provider.identity.peer_id} serves [bold]{e.model_name}[/] "
                          f"({e.model_cid}, {e.precision}) at {server.url}/v1  [dim]started in "
                          f"{time.perf_counter() - t0:.1f}s[/]")
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="demo", max_retries=0)
            console.print(f"[cyan]user[/] asks (official openai SDK, seed {seed}): {prompt!r}")
            stream = client.chat.completions.create(
                model="agora-tiny", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=0.8, seed=seed, stream=True, logprobs=True, top_logprobs=2,
            )
            text, agora = "", None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
                agora = (chunk.model_extra or {}).get("agora", agora)
            console.print(Panel(text, title="answer (streamed)", expand=False))
            if agora is None:
                raise RuntimeError("the provider sent no receipt")
            receipt = verify_record(agora["receipt"], ReceiptBody)
            body = receipt.body
            tok = ByteTokenizer.from_dir(resolve_model("agora-tiny")[0])
            assert str(receipt.cid) == agora["receipt_cid"]
            console.print(f"[magenta]receipt[/] {receipt.cid}")
            console.print(f"  signed by {receipt.signer} — signature [bold green]valid[/]; "
                          f"{len(body.output_tokens)} tokens decode to the answer: "
                          f"[bold]{'yes' if tok.decode(body.output_tokens).startswith(text) else 'NO'}[/]")
            console.print(f"  model {body.model}, precision {body.precision}, seed {body.sampling.seed}, "
                          f"charged {body.price.charged} micro-credits")
            show_inclusion(console, server.url, str(receipt.cid))
        console.print("[dim]network stopped; nothing left running[/]")


def show_inclusion(console: Console, url: str, cid: str) -> None:
    """Prove the receipt is in the provider's transparency log, against the log's signed head."""
    head = verify_tree_head(httpx.get(f"{url}/agora/v1/log/head").json())
    answer = httpx.get(f"{url}/agora/v1/log/proof/inclusion", params={"cid": cid, "size": head.body.size}).json()
    index = check_inclusion(head, cid, answer)
    console.print(f"[blue]log[/] receipt is entry {index} of {head.body.size} in log {head.body.log_id}: inclusion "
                  f"proof of {len(answer['proof'])} hashes [bold green]verified[/] against signed head "
                  f"(root {head.body.root[:16]}…)")
