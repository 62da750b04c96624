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
    charge_credits: Annotated[bool, typer.Option(
        help="bill every request to its API key's credits (`agora keys fund`); implies --require-keys")] = False,
    verifier_fee_ppm: Annotated[int, typer.Option(
        help="verifiers' fee in millionths of the providers' charge, paid by the user (0 to 1000000)")] = 0,
    log_json: Annotated[Optional[bool], typer.Option("--log-json/--no-log-json",
                                                     help="log one JSON object per line")] = None,
) -> None:
    """Buy inference for your users: one OpenAI API in front of every provider the network offers."""
    from agoranet.cli.main import console, fail, home_dir, open_node
    from agoranet.core.logs import configure_logging
    from agoranet.core.settings import Settings
    from agoranet.net.gossip import GossipConfig
    from agoranet.node.gateway import GatewayConfig
    from agoranet.node.node import build_gateway_node
    from agoranet.node.server import serve_forever, url_of
    from agoranet.web import mount_dashboard

    configure_logging(json_lines=Settings().log_json if log_json is None else log_json)
    home = home_dir(home)
    if not 0 <= verifier_fee_ppm <= 1_000_000:
        raise fail(f"--verifier-fee-ppm is {verifier_fee_ppm}; give 0 to 1000000 (millionths of the charge)")
    identity, sock = open_node(home, host, port)
    url = public_url or url_of(sock)
    config = GatewayConfig(require_keys=require_keys, stall_timeout_s=stall_timeout, connect_timeout_s=connect_timeout,
                           verifiers=tuple(verifier or []), charge_credits=charge_credits,
                           verifier_fee_ppm=verifier_fee_ppm)
    app_, _ = build_gateway_node(home, url, list(peer or []), config=config,
                                 gossip=GossipConfig(interval_s=gossip_interval))
    mount_dashboard(app_, url=url)
    console.print(f"gateway [bold]{identity.peer_id}[/] at [bold]{url}/v1[/]; seeds: {', '.join(peer or []) or 'none'}"
                  f"{'; API keys required' if require_keys or charge_credits else ''}"
                  f"{'; requests are charged in credits' if charge_credits else ''}; dashboard at {url}/")
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


def _ledger(home: Path | None):
    """The gateway's credit ledger in its log (a running gateway sees the moves at its next commit)."""
    from agoranet.cli.main import fail, home_dir
    from agoranet.core.errors import AgoraError
    from agoranet.core.identity import Identity
    from agoranet.log.credits import CreditLedger
    from agoranet.log.transparency import TransparencyLog

    home = home_dir(home)
    try:
        identity = Identity.load_or_create(home / "identity.key")  # the gateway's, as `agora gateway` makes it
    except AgoraError as exc:
        raise fail(exc) from None
    return CreditLedger(TransparencyLog(home / "log.db", identity))


def _fund(home: Path | None, key_id: str, amount: int) -> int:
    """Fund a key's account (minting what the operator lacks); returns its new balance."""
    from agoranet.cli.main import fail
    from agoranet.log.credits import user
    from agoranet.log.errors import CreditError
    from agoranet.node.credits_role import fund_key

    ledger = _ledger(home)
    try:
        fund_key(ledger, key_id, amount)
        return ledger.balance(user(key_id))
    except CreditError as exc:
        raise fail(exc) from None
    finally:
        ledger.log.close()


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="who or what the key is for")],
    home: HomeOpt = None,
    rate_limit: Annotated[int, typer.Option(help="requests per minute, 0 for no limit")] = 0,
    quota: Annotated[int, typer.Option(help="tokens (prompt + completion) over the key's life, 0 for no limit")] = 0,
    credits: Annotated[int, typer.Option(help="micro-credits to fund the key with (see `agora keys fund`)")] = 0,
) -> None:
    """Create a key; it is shown once, keep it."""
    from agoranet.cli.main import console, fail

    if credits < 0:
        raise fail(f"--credits is {credits}; give a whole number of micro-credits, 0 or more")
    key, secret = _store(home).create(name, rate_per_min=rate_limit, quota_tokens=quota)
    console.print(f"created key [bold]{key.id}[/] for {name!r}; it is shown only now:")
    console.print(secret)
    if credits:
        console.print(f"funded with {credits} micro-credits; balance {_fund(home, key.id, credits)}")


@keys_app.command("fund")
def keys_fund(
    key_id: Annotated[str, typer.Argument(help="the key id `agora keys list` shows")],
    amount: Annotated[int, typer.Argument(help="micro-credits to add (the operator mints what it lacks)")],
    home: HomeOpt = None,
) -> None:
    """Give a key credits to spend on a gateway run with --charge-credits; the moves are logged."""
    from agoranet.cli.main import console, fail

    if _store(home).get(key_id) is None:
        raise fail(f"no key {key_id!r} (see `agora keys list`)")
    if amount <= 0:
        raise fail(f"the amount is {amount}; give a whole number of micro-credits above zero")
    console.print(f"funded {key_id} with {amount} micro-credits; balance {_fund(home, key_id, amount)}")


@keys_app.command("list")
def keys_list(home: HomeOpt = None) -> None:
    """List keys with their limits and usage."""
    from agoranet.cli.main import console

    from agoranet.cli.main import home_dir
    from agoranet.log.credits import user

    ledger = _ledger(home) if (home_dir(home) / "log.db").exists() else None
    try:
        for k in _store(home).list():
            balance = ledger.balance(user(k.id)) if ledger is not None else 0
            console.print(f"{k.id}  {k.name!r:20} {'revoked' if k.revoked else 'active ':7} "
                          f"rate {k.rate_per_min or '-'}/min  quota {k.quota_tokens or '-'}  used {k.used_tokens} "
                          f"tokens in {k.requests} requests, charged {k.charged}, balance {balance} micro-credits")
    finally:
        if ledger is not None:
            ledger.log.close()


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="the key id `agora keys list` shows")],
                home: HomeOpt = None) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    from agoranet.cli.main import console, fail

    if not _store(home).revoke(key_id):
        raise fail(f"no key {key_id!r} (see `agora keys list`)")
    console.print(f"revoked {key_id}")
