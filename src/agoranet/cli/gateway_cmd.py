"""`agora gateway` and `agora keys …`: run a gateway, manage its users' API keys.

Registered on the main app in cli/main.py; helpers from there are imported inside the commands,
so importing this module never imports main (and main can import it at any point).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from agoranet.cli.console import console, fail
from agoranet.cli.options import (
    BootstrapOpt, DiscoveryOpt, P2PAnnounceOpt, P2PListenOpt, P2PNatOpt, ChargeCreditsOpt, ConnectTimeoutOpt, GossipIntervalOpt, HomeOpt, LogJsonOpt, PeerOpt, PublicUrlOpt, RequireKeysOpt,
    ReceiptMode, ReceiptsOpt, StallTimeoutOpt, VerifierFeeOpt, VerifierOpt, home_dir,
)


def gateway(
    home: HomeOpt = None,
    host: str = "127.0.0.1",
    port: int = 8300,
    peer: PeerOpt = None,
    public_url: PublicUrlOpt = None,
    require_keys: RequireKeysOpt = False,
    gossip_interval: GossipIntervalOpt = 2.0,
    discovery: DiscoveryOpt = "http",
    bootstrap: BootstrapOpt = None,
    p2p_listen: P2PListenOpt = None,
    p2p_announce: P2PAnnounceOpt = None,
    p2p_nat: P2PNatOpt = None,
    stall_timeout: StallTimeoutOpt = 10.0,
    connect_timeout: ConnectTimeoutOpt = 2.0,
    verifier: VerifierOpt = None,
    charge_credits: ChargeCreditsOpt = False,
    verifier_fee_ppm: VerifierFeeOpt = 0,
    receipts: ReceiptsOpt = ReceiptMode.compact,
    log_json: LogJsonOpt = None,
) -> None:
    """Buy inference for your users: one OpenAI API in front of every provider the network offers."""
    from agoranet.cli.node_cmd import gateway_config, p2p_config, serve_node
    from agoranet.net.gossip import GossipConfig

    p2p = p2p_config(discovery=discovery, host=host, peer=peer, bootstrap=bootstrap, listen=p2p_listen,
                     announce=p2p_announce, nat=p2p_nat)
    config = gateway_config(require_keys=require_keys, stall_timeout=stall_timeout, connect_timeout=connect_timeout,
                            verifier=verifier, charge_credits=charge_credits, verifier_fee_ppm=verifier_fee_ppm,
                            receipts=receipts.value)
    serve_node(["gateway"], home=home, host=host, port=port, public_url=public_url, log_json=log_json,
               gateway=config, peers=list(peer or []), gossip=GossipConfig(interval_s=gossip_interval), p2p=p2p)


keys_app = typer.Typer(help="API keys for this gateway's users (only their hashes are stored).", no_args_is_help=True)


def _store(home: Path | None):
    from agoranet.node.keys import KEYS_FILE, KeyStore

    return KeyStore(home_dir(home) / KEYS_FILE)


def _ledger(home: Path | None):
    """The gateway's credit ledger in its log (a running gateway sees the moves at its next commit)."""
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

    if _store(home).get(key_id) is None:
        raise fail(f"no key {key_id!r} (see `agora keys list`)")
    if amount <= 0:
        raise fail(f"the amount is {amount}; give a whole number of micro-credits above zero")
    console.print(f"funded {key_id} with {amount} micro-credits; balance {_fund(home, key_id, amount)}")


@keys_app.command("list")
def keys_list(home: HomeOpt = None) -> None:
    """List keys with their limits and usage."""
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

    if not _store(home).revoke(key_id):
        raise fail(f"no key {key_id!r} (see `agora keys list`)")
    console.print(f"revoked {key_id}")
