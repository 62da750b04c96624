"""The `agora` command."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from agoranet.cli.credits_cmd import credits_app
from agoranet.cli.gateway_cmd import GossipIntervalOpt, PeerOpt, gateway, keys_app
from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity
from agoranet.core.logs import configure_logging
from agoranet.core.settings import Settings
from agoranet.cli.log_cmd import log_app
from agoranet.cli.store_cmd import store_app
from agoranet.cli.verify_cmd import verify_app

app = typer.Typer(help="Agora: an open, verifiable network for AI inference.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console(emoji=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)

app.add_typer(log_app, name="log")
app.add_typer(credits_app, name="credits")
app.add_typer(store_app, name="store")
app.add_typer(verify_app, name="verify")

HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="node directory (default $AGORA_HOME or ~/.agora)")]
LogJsonOpt = Annotated[Optional[bool], typer.Option("--log-json/--no-log-json",
                                                    help="log one JSON object per line (default $AGORA_LOG_JSON)")]
WatchOpt = Annotated[Optional[list[str]], typer.Option("--watch", help="peer URL to show on the dashboard; repeat")]


def home_dir(home: Path | None) -> Path:
    return home if home is not None else Settings().home


def open_node(home: Path, host: str, port: int) -> tuple[Identity, socket.socket]:
    """This node's identity (created on first run) and its listening socket, or one clear error line."""
    from agoranet.node.server import bind

    try:
        identity = Identity.load_or_create(home / "identity.key")
        return identity, bind(host, port)
    except OSError as exc:
        raise fail(f"cannot listen on {host}:{port}: {exc.strerror} (pick another --port)") from None
    except AgoraError as exc:
        raise fail(exc) from None


def fail(exc: AgoraError | str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    return typer.Exit(1)


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
    model: Annotated[str, typer.Option(help="bundled model name, local model directory, or model CID")] = "agora-tiny",
    storage_peer: Annotated[Optional[list[str]], typer.Option(help="storage peer URL to fetch a model CID from")] = None,
    kubo_rpc: Annotated[Optional[str], typer.Option(help="kubo RPC address to read a model CID from (default: $AGORA_KUBO_RPC)")] = None,
    host: str = "127.0.0.1",
    port: int = 8400,
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16")] = "fp32",
    upstream: Annotated[Optional[str], typer.Option(help="serve through an OpenAI-compatible server at this URL")] = None,
    upstream_model: Annotated[Optional[str], typer.Option(help="model name the upstream serves")] = None,
    public_url: Annotated[Optional[str], typer.Option(help="URL others reach this node at")] = None,
    price_in: Annotated[int, typer.Option(help="micro-credits per 1M input tokens")] = 100_000,
    price_out: Annotated[int, typer.Option(help="micro-credits per 1M output tokens")] = 200_000,
    max_concurrency: int = 16,
    max_tokens: int = 512,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads")] = None,
    peer: PeerOpt = None,
    gossip_interval: GossipIntervalOpt = 2.0,
    max_batch: Annotated[int, typer.Option(help="most sequences decoded together")] = 16,
    token_delay_ms: Annotated[int, typer.Option(hidden=True, help="space tokens out (failover tests, demos)")] = 0,
    watch: WatchOpt = None,
    log_json: LogJsonOpt = None,
    cheat: Annotated[Optional[str], typer.Option(
        hidden=True, help="TEST/DEMO ONLY: model|token|logprobs|temperature|seed|prompt")] = None,
) -> None:
    """Sell inference: serve a model over the OpenAI API with signed receipts."""
    from agoranet.cli.gateway_cmd import provider_network
    from agoranet.node.node import ProviderOptions, build_provider_node
    from agoranet.node.server import serve_forever, url_of

    from agoranet.web import mount_dashboard

    configure_logging(json_lines=Settings().log_json if log_json is None else log_json)
    home = home_dir(home)
    _, sock = open_node(home, host, port)
    url = public_url or url_of(sock)
    opts = ProviderOptions(model=model, precision=precision, upstream=upstream, upstream_model=upstream_model,
                           threads=threads, storage_peers=storage_peer or [], max_batch=max_batch,
                           kubo_rpc=(kubo_rpc if kubo_rpc is not None else Settings().kubo_rpc) or None,
                           token_delay_ms=token_delay_ms, cheat=cheat, pricing={"input_per_mtok": price_in, "output_per_mtok": price_out,
                                                     "max_concurrency": max_concurrency, "max_tokens": max_tokens})
    try:
        app_, provider = build_provider_node(home, url, opts, **provider_network(peer, gossip_interval))
    except AgoraError as exc:
        raise fail(exc) from None
    mount_dashboard(app_, url=url, watch=watch or [])
    e = provider.engine
    console.print(f"provider [bold]{provider.identity.peer_id}[/] serving [bold]{e.model_name}[/] ({e.model_cid}, "
                  f"{e.precision}) at [bold]{url}/v1[/]; dashboard at {url}/, metrics at {url}/metrics")
    serve_forever(app_, sock)


@app.command()
def demo(
    prompt: Annotated[str, typer.Option(help="what to ask the bundled model")] = "write a function that adds two numbers",
    max_tokens: int = 96,
    seed: int = 7,
    cheater: Annotated[bool, typer.Option("--cheater", help="add a cheating provider and watch it get caught")] = False,
) -> None:
    """Start a small Agora network on 127.0.0.1, ask it through the official openai SDK, shut it down."""
    from agoranet.cli.demo import run_demo

    configure_logging(level="ERROR")  # the demo narrates; the nodes' own warnings would only interleave
    try:
        run_demo(console, prompt=prompt, max_tokens=max_tokens, seed=seed, cheater=cheater)
    except AgoraError as exc:
        raise fail(exc) from None


app.command()(gateway)
app.add_typer(keys_app, name="keys")


def main() -> None:
    app()
