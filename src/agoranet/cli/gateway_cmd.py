"""`agora gateway` and `agora keys …`: run a gateway, manage its users' API keys.

Registered on the main app in cli/main.py; helpers from there are imported inside the commands,
so importing this module never imports main (and main can import it at any point).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="node directory (default $AGORA_HOME or ~/.agora)")]
PeerOpt = Annotated[Optional[list[str]], typer.Option("--peer", help="seed peer URL to gossip with (repeatable)")]
GossipIntervalOpt = Annotated[float, typer.Option(help="seconds between gossip rounds")]


def gateway(
    home: HomeOpt = None,
    host: str = "127.0.0.1",
    port: int = 8300,
    peer: PeerOpt = None,
    public_url: Annotated[Optional[str], typer.Option(help="URL others reach this node at")] = None,
    require_keys: Annotated[bool, typer.Option(help="serve only requests with an API key from `agora keys create`")] = False,
    gossip_interval: GossipIntervalOpt = 2.0,
    stall_timeout: Annotated[float, typer.Option(help="seconds of provider silence mid-stream before failing over")] = 10.0,
    connect_timeout: Annotated[float, typer.Option(help="seconds to wait for a provider to accept a connection")] = 2.0,
    verifier: Annotated[Optional[list[str]], typer.Option(
        "--verifier", help="verifier URL: relayed receipts go to it, its reputations steer routing (repeatable)")] = None,
    log_json: Annotated[Optional[bool], typer.Option("--log-json/--no-log-json",
                                                     help="log one JSON object per line")] = None,
) -> None:
    """Buy inference for your users: one OpenAI API in front of every provider the network offers."""
    from agoranet.cli.main import console, home_dir, open_node
    from agoranet.core.logs import configure_logging
    from agoranet.core.settings import Settings
    from agoranet.net.gossip import GossipConfig
    from agoranet.node.gateway import GatewayConfig
    from agoranet.node.node import build_gateway_node
    from agoranet.node.server import serve_forever, url_of
    from agoranet.web import mount_dashboard

    configure_logging(json_lines=Settings().log_json if log_json is None else log_json)
    home = home_dir(home)
    identity, sock = open_node(home, host, port)
    url = public_url or url_of(sock)
    config = GatewayConfig(require_keys=require_keys, stall_timeout_s=stall_timeout, connect_timeout_s=connect_timeout,
                           verifiers=tuple(verifier or []))
    app_, _ = build_gateway_node(home, url, list(peer or []), config=config,
                                 gossip=GossipConfig(interval_s=gossip_interval))
    mount_dashboard(app_, url=url)
    console.print(f"gateway [bold]{identity.peer_id}[/] at [bold]{url}/v1[/]; seeds: {', '.join(peer or []) or 'none'}"
                  f"{'; API keys required' if require_keys else ''}; dashboard at {url}/")
    serve_forever(app_, sock)


def provider_network(peer: list[str] | None, gossip_interval: float) -> dict:
    """Keyword arguments for `build_provider_node` that make `agora provide --peer URL` join the network."""
    from agoranet.net.gossip import GossipConfig

    return {"peers": list(peer or []), "gossip": GossipConfig(interval_s=gossip_interval)} if peer else {}


keys_app = typer.Typer(help="API keys for this gateway's users (only their hashes are stored).", no_args_is_help=True)


def _store(home: Path | None):
    from agoranet.cli.main import home_dir
    from agoranet.node.keys import KEYS_FILE, KeyStore

    return KeyStore(home_dir(home) / KEYS_FILE)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="who or what the key is for")],
    home: HomeOpt = None,
    rate_limit: Annotated[int, typer.Option(help="requests per minute, 0 for no limit")] = 0,
    quota: Annotated[int, typer.Option(help="tokens (prompt + completion) over the key's life, 0 for no limit")] = 0,
) -> None:
    """Create a key; it is shown once, keep it."""
    from agoranet.cli.main import console

    key, secret = _store(home).create(name, rate_per_min=rate_limit, quota_tokens=quota)
    console.print(f"created key [bold]{key.id}[/] for {name!r}; it is shown only now:")
    console.print(secret)


@keys_app.command("list")
def keys_list(home: HomeOpt = None) -> None:
    """List keys with their limits and usage."""
    from agoranet.cli.main import console

    for k in _store(home).list():
        console.print(f"{k.id}  {k.name!r:20} {'revoked' if k.revoked else 'active ':7} rate {k.rate_per_min or '-'}/min  "
                      f"quota {k.quota_tokens or '-'}  used {k.used_tokens} tokens in {k.requests} requests, "
                      f"charged {k.charged} micro-credits")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key id `agora keys list` shows")],
                home: HomeOpt = None) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    from agoranet.cli.main import console, fail

    if not _store(home).revoke(key_id):
        raise fail(f"no key {key_id!r} (see `agora keys list`)")
    console.print(f"revoked {key_id}")
