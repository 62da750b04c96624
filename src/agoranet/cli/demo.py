"""`agora demo`: the whole network on 127.0.0.1 in one process — a verifier, a gateway, providers
found by gossip — asked through the official openai SDK, then shut down with nothing left running."""

from __future__ import annotations

import asyncio
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from agoranet.core.identity import Identity
from agoranet.core.records import ReceiptBody, Record, verify_record
from agoranet.engine.models import resolve_model
from agoranet.engine.tokenizer import ByteTokenizer
from agoranet.log.records import TreeHeadBody
from agoranet.log.transparency import check_inclusion
from agoranet.net.agora_client import AgoraClient, call
from agoranet.wire.agora import InclusionProof, VerifyRequest
from agoranet.wire.openai import check_summary, read_summary

GOSSIP_S = 0.3
PROVIDERS = (("provider-a", 200_000, None), ("provider-b", 300_000, None))
CHEATER = ("cheater", 50_000, "token")  # cheapest, so the price-sorted request goes to it first


def run_demo(console: Console, *, prompt: str, max_tokens: int, seed: int, cheater: bool = False,
             discovery: str = "http") -> None:
    import openai

    from agoranet.net.gossip import GossipConfig
    from agoranet.node.gateway import GatewayConfig
    from agoranet.node.node import ProviderOptions, build_gateway_node, build_provider_node, build_verifier_node
    from agoranet.node.server import BackgroundServer, bind, url_of
    from agoranet.node.verifier import VerifierConfig

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agora-demo-") as tmp, ExitStack() as running:
        def start(app, sock) -> str:
            return running.enter_context(BackgroundServer(app, sock)).url

        def home(name: str) -> Path:
            Identity.generate().save(Path(tmp) / name / "identity.key")
            return Path(tmp) / name

        def step(what: str) -> None:  # loading models takes seconds: say what is happening meanwhile
            console.print(f"[dim]{time.perf_counter() - t0:4.1f}s {what}[/]")

        step("starting a verifier (loads agora-tiny to replay receipts)…")
        sock = bind()
        app, verifier = build_verifier_node(home("verifier"), VerifierConfig(audit_fraction=1.0))
        verifier_url = start(app, sock)
        p2p = None
        if discovery == "libp2p":  # GossipSub and the Kademlia DHT, each node with its own go-libp2p daemon
            from agoranet.net.libp2p import P2PConfig

            p2p = P2PConfig()
        sock = bind()
        app, gateway = build_gateway_node(home("gateway"), url_of(sock), [], gossip=GossipConfig(interval_s=GOSSIP_S),
                                          config=GatewayConfig(verifiers=(verifier_url,), reputation_interval_s=GOSSIP_S),
                                          p2p=p2p)
        gateway_url = start(app, sock)
        if p2p is not None:  # the providers join through the gateway's libp2p address
            p2p = replace(p2p, daemon=replace(p2p.daemon, bootstrap=tuple(gateway.discovery.multiaddrs())))
        step(f"gateway up at {gateway_url}")
        urls, names = {}, {}
        for name, price, cheat in PROVIDERS + ((CHEATER,) if cheater else ()):
            step(f"starting {name} (loads agora-tiny, announces its offer to the gateway)…")
            sock = bind()
            app, provider = build_provider_node(
                home(name), url_of(sock), ProviderOptions(threads=1, cheat=cheat, pricing={"output_per_mtok": price}),
                peers=[] if p2p else [gateway_url], gossip=GossipConfig(interval_s=GOSSIP_S), p2p=p2p)
            peer = str(provider.identity.peer_id)
            urls[peer], names[peer] = start(app, sock), name
        step("waiting for the gateway to find every provider by gossip…")
        deadline = time.monotonic() + 30
        while len(offers := asyncio.run(gateway.discovery.find_offers("agora-tiny"))) < len(urls):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway discovered {len(offers)} of {len(urls)} providers in 30 s")
            time.sleep(0.1)
        found_by = "libp2p (GossipSub, Kademlia DHT)" if p2p else "gossip"
        console.print(f"[dim]network up in {time.perf_counter() - t0:.1f}s: verifier {verifier_url}, "
                      f"gateway {gateway_url}/v1 (dashboard {gateway_url}/), discovery by {found_by}[/]")
        table = Table(title=f"providers the gateway found by {found_by} (signed offers)", title_justify="left")
        for col in ("name", "peer id", "model CID", "precision", "price out / 1M tok"):
            table.add_column(col)
        for o in sorted(offers, key=lambda o: o.body.models[0].output_per_mtok):
            m = o.body.models[0]
            table.add_row(names[o.signer], o.signer[:20] + "…", m.cid[:20] + "…", o.body.precision,
                          f"{m.output_per_mtok / 1e6:.2f} credits")
        console.print(table)

        client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="demo", max_retries=0)
        console.print(f"[cyan]user[/] asks the gateway (official openai SDK, seed {seed}): {prompt!r}")
        text, agora = "", None
        cheaters = [peer for peer, name in names.items() if name == CHEATER[0]]  # its turn comes later
        for chunk in client.chat.completions.create(
                model="agora-tiny", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=0.8, seed=seed, stream=True, extra_body={"provider": {"ignore": cheaters}}):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            agora = (chunk.model_extra or {}).get("agora", agora)
        if agora is None:
            raise RuntimeError("the gateway sent no receipt")
        # The answer carries the receipt's CID and the provider's signed summary; the full receipt (token ids,
        # logprobs) is fetched by CID from the provider and checked against both.
        summary = read_summary(agora)
        receipt = verify_record(httpx.get(agora["receipt_url"], timeout=30).json()["record"], ReceiptBody)
        if str(receipt.cid) != agora["receipt_cid"]:
            raise RuntimeError(f"{agora['receipt_url']} served another record than receipt {agora['receipt_cid']}")
        check_summary(summary, receipt)
        served_by = urls[receipt.signer]
        console.print(Panel(text, title=f"answer, streamed via the gateway from {names[receipt.signer]}",
                            expand=False))
        console.print(f"[magenta]summary[/] signed by {names[summary.signer]}: {summary.body.completion_tokens} tokens, "
                      f"output SHA-256 {summary.body.output_sha256[:16]}…; full receipt fetched by CID "
                      f"({len(receipt.encode())} bytes) and matched to it")
        tok = ByteTokenizer.from_dir(resolve_model("agora-tiny")[0])
        body = receipt.body
        console.print(f"[magenta]receipt[/] {receipt.cid}: signature [bold green]valid[/] "
                      f"({names[receipt.signer]}); {len(body.output_tokens)} token ids decode to the answer: "
                      f"[bold]{'yes' if tok.decode(body.output_tokens).startswith(text) else 'NO'}[/]; "
                      f"charged {body.price.charged} micro-credits")
        verdict = call(verifier_url, lambda v: v.verify(VerifyRequest(receipt=receipt.to_json(), node=served_by)),
                       timeout=60)
        console.print(f"[magenta]verifier[/] replayed it with one forward pass of model {body.model[:20]}…: "
                      + ("[bold green]honest[/]" if verdict.ok else "[bold red]FRAUD[/]")
                      + f" (signed verdict {verdict.verdict_cid[:24]}…)")
        show_inclusion(console, served_by, str(receipt.cid))
        if cheater:
            catch_cheater(console, client, verifier_url, names, prompt, max_tokens)
    console.print("[dim]network stopped; nothing left running[/]")


def show_inclusion(console: Console, url: str, cid: str) -> None:
    """Prove the receipt is in the provider's transparency log, against the log's signed head."""
    async def fetch(node: AgoraClient) -> tuple[Record[TreeHeadBody], InclusionProof]:
        head = await node.log_head()
        return head, await node.inclusion_proof(cid, head.body.size)

    head, answer = call(url, fetch)
    index = check_inclusion(head, cid, answer.model_dump())
    console.print(f"[blue]log[/] receipt is entry {index} of {head.body.size} in the provider's log: inclusion "
                  f"proof of {len(answer.proof)} hashes [bold green]verified[/] against its signed head "
                  f"(root {head.body.root[:16]}…)")


def catch_cheater(console: Console, client, verifier_url: str, names: dict[str, str], prompt: str,
                  max_tokens: int) -> None:
    from agoranet.node.judge import ReplayVerifier

    cheater = next(peer for peer, name in names.items() if name == CHEATER[0])
    console.print(f"[red]cheater[/] {cheater[:20]}… sells cheapest but swaps a token of every answer "
                  "(a test facility; its receipts still claim the honest model)")

    def ask(i: int) -> str:
        r = client.chat.completions.create(model="agora-tiny", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0.8, seed=100 + i,
                                           extra_body={"provider": {"sort": "price"}})
        return r.model_extra["agora"]["provider"]

    # A provider the gateway has not seen proven (a verifier passing its receipts, or 3 requests served) leads
    # at most 10% of requests, whatever the user sorts by: so the cheapest new one may take a few asks.
    for asks in range(1, 101):
        if ask(asks) == cheater:
            break
    console.print(f"[cyan]user[/] asks for the cheapest provider: served by the cheater after {asks} ask(s) "
                  "(a new provider leads at most 10% of requests until it proves itself)")
    deadline = time.monotonic() + 60
    while True:
        rep = call(verifier_url, lambda v: v.reputation()).providers.get(cheater)
        if rep is not None and rep.excluded:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the verifier did not catch the cheater within 60 s")
        time.sleep(0.2)
    proof_cid = rep.fraud_proofs[0]
    proof = call(verifier_url, lambda v: v.record(proof_cid))
    ev = proof.body.evidence
    console.print(f"[bold red]fraud proof[/] {proof_cid[:24]}…: the receipt breaks the sampling rule at token "
                  f"{ev.position} ({ev.detail})")
    recheck = ReplayVerifier(Identity.generate()).recheck(proof)
    console.print("  re-checked by a third party with the model (`agora verify --fraud-proof CID`): "
                  + ("[bold green]holds[/]" if recheck.holds else "[bold red]FALSE[/]"))
    time.sleep(1.0)  # the gateway follows the verifier's reputation table
    later = [ask(i) for i in range(200, 203)]
    console.print(f"[cyan]user[/] asks for the cheapest provider again: served by {', '.join(names[p] for p in later)}"
                  + (" — the cheater gets no more traffic" if cheater not in later else " — [bold red]STILL THE CHEATER[/]"))
