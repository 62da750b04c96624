"""The `agora` command."""

from __future__ import annotations

from typing import Annotated

import typer

from agoranet.cli.console import console, fail
from agoranet.cli.credits_cmd import credits_app
from agoranet.cli.gateway_cmd import gateway, keys_app
from agoranet.cli.node_cmd import node, provider_options, serve_node
from agoranet.cli.options import (
    BootstrapOpt, CheatOpt, DiscoveryOpt, GossipIntervalOpt, P2PAnnounceOpt, P2PListenOpt, P2PNatOpt, HomeOpt, KuboRpcOpt, LogJsonOpt, MaxBatchOpt, MaxConcurrencyOpt, MaxTokensOpt,
    EngineOpt, ModelOpt, PeerOpt, PrecisionOpt, PriceInOpt, PriceOutOpt, PublicUrlOpt, StoragePeerOpt, ThreadsOpt,
    TokenDelayOpt, TolerancesOpt, UpstreamModelOpt, UpstreamOpt, WatchOpt, home_dir,
)
from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity
from agoranet.core.logs import configure_logging
from agoranet.cli.log_cmd import log_app
from agoranet.cli.store_cmd import store_app
from agoranet.cli.verify_cmd import verify_app

app = typer.Typer(help="Agora: an open, verifiable network for AI inference.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)

app.add_typer(log_app, name="log")
app.add_typer(credits_app, name="credits")
app.add_typer(store_app, name="store")
app.add_typer(verify_app, name="verify")


@app.command()
def init(home: HomeOpt = None, force: Annotated[bool, typer.Option(help="replace an existing identity")] = False) -> None:
    """Create this node's Ed25519 identity (key file mode 0600)."""
    path = home_dir(home) / "identity.key"
    try:
        identity = Identity.generate()
        identity.save(path, force=force)
    except AgoraError as exc:
        raise fail(exc) from None
    console.print(f"created identity [bold]{identity.peer_id}[/] in {path}")
    console.print(f"did: {identity.peer_id.did}")


@app.command()
def id(home: HomeOpt = None) -> None:
    """Print this node's peer id."""
    try:
        identity = Identity.load(home_dir(home) / "identity.key")
    except AgoraError as exc:
        raise fail(exc) from None
    console.print(str(identity.peer_id))


@app.command()
def provide(
    home: HomeOpt = None,
    model: ModelOpt = "agora-tiny",
    storage_peer: StoragePeerOpt = None,
    kubo_rpc: KuboRpcOpt = None,
    host: str = "127.0.0.1",
    port: int = 8400,
    precision: PrecisionOpt = "fp32",
    engine: EngineOpt = "transformers",
    upstream: UpstreamOpt = None,
    upstream_model: UpstreamModelOpt = None,
    public_url: PublicUrlOpt = None,
    price_in: PriceInOpt = 100_000,
    price_out: PriceOutOpt = 200_000,
    max_concurrency: MaxConcurrencyOpt = 32,
    max_tokens: MaxTokensOpt = 512,
    threads: ThreadsOpt = None,
    peer: PeerOpt = None,
    gossip_interval: GossipIntervalOpt = 2.0,
    discovery: DiscoveryOpt = "http",
    bootstrap: BootstrapOpt = None,
    p2p_listen: P2PListenOpt = None,
    p2p_announce: P2PAnnounceOpt = None,
    p2p_nat: P2PNatOpt = None,
    max_batch: MaxBatchOpt = 32,
    token_delay_ms: TokenDelayOpt = 0,
    watch: WatchOpt = None,
    log_json: LogJsonOpt = None,
    cheat: CheatOpt = None,
    tolerances: TolerancesOpt = None,
) -> None:
    """Sell inference: serve a model over the OpenAI API with signed receipts."""
    from agoranet.cli.node_cmd import p2p_config
    from agoranet.net.gossip import GossipConfig

    p2p = p2p_config(discovery=discovery, host=host, peer=peer, bootstrap=bootstrap, listen=p2p_listen,
                     announce=p2p_announce, nat=p2p_nat)
    opts = provider_options(model=model, precision=precision, engine=engine, upstream=upstream,
                            upstream_model=upstream_model,
                            storage_peer=storage_peer, kubo_rpc=kubo_rpc, threads=threads, max_batch=max_batch,
                            token_delay_ms=token_delay_ms, cheat=cheat, price_in=price_in, price_out=price_out,
                            max_concurrency=max_concurrency, max_tokens=max_tokens, tolerances=tolerances)
    serve_node(["provider"], home=home, host=host, port=port, public_url=public_url, log_json=log_json,
               watch=watch or [], provider=opts, peers=list(peer or []),
               gossip=GossipConfig(interval_s=gossip_interval), p2p=p2p)


@app.command()
def demo(
    prompt: Annotated[str, typer.Option(help="what to ask the bundled model")] = "write a function that adds two numbers",
    max_tokens: int = 96,
    seed: int = 7,
    cheater: Annotated[bool, typer.Option("--cheater", help="add a cheating provider and watch it get caught")] = False,
    discovery: DiscoveryOpt = "http",
) -> None:
    """Start a small Agora network on 127.0.0.1, ask it through the official openai SDK, shut it down."""
    from agoranet.cli.demo import run_demo

    from agoranet.cli.node_cmd import p2p_config

    p2p_config(discovery=discovery, host="127.0.0.1", peer=None, bootstrap=None, listen=None, announce=None,
               nat=None)  # a clear error now if the daemon is missing or the name is wrong
    configure_logging(level="ERROR")  # the demo narrates; the nodes' own warnings would only interleave
    try:
        run_demo(console, prompt=prompt, max_tokens=max_tokens, seed=seed, cheater=cheater, discovery=discovery)
    except AgoraError as exc:
        raise fail(exc) from None


app.command()(gateway)
app.command()(node)
app.add_typer(keys_app, name="keys")


def main() -> None:
    app()
