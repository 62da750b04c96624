"""`agora demo --cheater`: an honest and a cheating provider, a verifier auditing both; the cheat is
caught, its fraud proof re-checked by a third party, and the cheater excluded in the reputation table."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console

from agoranet.core.identity import Identity
from agoranet.core.records import verify_record


def run_cheater_demo(console: Console, *, prompt: str, max_tokens: int, seed: int, cheat: str = "token") -> None:
    import openai

    from agoranet.node.cheat import CHEATS
    from agoranet.node.node import ProviderOptions, build_provider_node
    from agoranet.node.server import BackgroundServer, bind, url_of
    from agoranet.node.verifier import ReplayVerifier, VerifierConfig, build_verifier_node

    with tempfile.TemporaryDirectory(prefix="agora-demo-cheater-") as tmp:
        servers, peers = [], {}
        try:
            for name, opts in (("honest", ProviderOptions(threads=1)), ("cheater", ProviderOptions(threads=1, cheat=cheat))):
                home = Path(tmp) / name
                Identity.generate().save(home / "identity.key")
                sock = bind()
                app, provider = build_provider_node(home, url_of(sock), opts)
                servers.append(BackgroundServer(app, sock).start())
                peers[name] = (servers[-1].url, str(provider.identity.peer_id))
            console.print(f"[green]honest provider[/] {peers['honest'][1]} at {peers['honest'][0]}")
            console.print(f"[red]cheating provider[/] {peers['cheater'][1]} at {peers['cheater'][0]} "
                          f"[dim](test facility: {CHEATS[cheat]}; its receipts still claim the honest model)[/]")
            sock = bind()
            app, role = build_verifier_node(Path(tmp) / "verifier", VerifierConfig(
                audit_fraction=1.0, sources=tuple(url for url, _ in peers.values()), poll_interval_s=0.3))
            servers.append(BackgroundServer(app, sock).start())
            verifier_url = servers[-1].url
            console.print(f"[magenta]verifier[/] {role.identity.peer_id} at {verifier_url} audits every receipt of both")
            for name, (url, _) in peers.items():
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="demo", max_retries=0)
                r = client.chat.completions.create(model="agora-tiny", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=max_tokens, temperature=0.8, seed=seed)
                console.print(f"[cyan]user[/] asked the {name} provider: receipt {r.model_extra['agora']['receipt_cid']}")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                rep = httpx.get(f"{verifier_url}/agora/v1/reputation").json()["providers"]
                if all(rep.get(peer, {}).get("verified") for _, peer in peers.values()):
                    break
                time.sleep(0.3)
            else:
                raise RuntimeError("the verifier did not audit both receipts within 60 s")
            for name, (_, peer) in peers.items():
                s = rep[peer]
                status = "[bold red]EXCLUDED[/]" if s["excluded"] else "[bold green]in good standing[/]"
                console.print(f"  reputation of the {name} provider: score {s['score']:.2f}, {s['passed']}/"
                              f"{s['verified']} receipts valid, {status}")
            proof_cid = rep[peers["cheater"][1]]["fraud_proofs"][0]
            proof = verify_record(httpx.get(f"{verifier_url}/agora/v1/records/{proof_cid}").json()["record"])
            ev = proof.body.evidence
            console.print(f"[bold red]fraud proof[/] {proof_cid} (signed by the verifier): receipt "
                          f"{proof.body.receipt_cid} breaks the rule at token {ev.position}: {ev.detail}")
            recheck = ReplayVerifier(Identity.generate()).recheck(proof)  # anyone holding the model
            console.print(f"  re-checked by a third party (`agora verify --fraud-proof {proof_cid[:16]}… --node "
                          f"{verifier_url}`): {'[bold green]holds[/]' if recheck.holds else '[bold red]FALSE[/]'}")
        finally:
            for server in reversed(servers):
                server.stop()
    console.print("[dim]network stopped; nothing left running[/]")
