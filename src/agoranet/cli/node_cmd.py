"""`agora node --roles gateway,provider,…`: one process, one identity, one port, any mix of roles.

Also what every command that runs a node shares (`provide`, `gateway`, `verify serve`, `store serve`
run one role each through `serve_node`): turning their options into the node layer's settings,
opening the port, building the node, mounting the dashboard, serving.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from agoranet.cli.console import console, fail
from agoranet.cli.options import (
    AuditFractionOpt, BootstrapOpt, ChargeCreditsOpt, CheatOpt, ConnectTimeoutOpt, DiscoveryOpt, GossipIntervalOpt,
    P2PAnnounceOpt, P2PListenOpt, P2PNatOpt, HomeOpt, KuboRpcOpt, LogJsonOpt,
    MaxBatchOpt, MaxConcurrencyOpt, MaxTokensOpt, ModelOpt, PeerOpt, PollIntervalOpt, PrecisionOpt, EngineOpt, PriceInOpt,
    PriceOutOpt, PublicUrlOpt, RecheckOpt, RequireKeysOpt, SourceOpt, StallTimeoutOpt, ThreadsOpt, TokenDelayOpt,
    ReceiptMode, ReceiptsOpt, TolerancesOpt, UpstreamModelOpt, UpstreamOpt, VerifierFeeOpt, VerifierOpt, WatchOpt, home_dir,
    resolve_kubo_rpc,
)
from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity

if TYPE_CHECKING:
    from agoranet.net.libp2p import P2PConfig
    from agoranet.node.gateway import GatewayConfig
    from agoranet.node.node import Node, ProviderOptions, VerifierOptions

# A node listens where its front role's own command would: users talk to a gateway, else a provider.
DEFAULT_PORTS = {"gateway": 8300, "provider": 8400, "storage": 8500, "verifier": 8600}


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


def provider_options(*, model: str, precision: str, upstream: str | None, upstream_model: str | None,
                     engine: str = "transformers",
                     storage_peer: list[str] | None, kubo_rpc: str | None, threads: int | None, max_batch: int,
                     token_delay_ms: int, cheat: str | None, price_in: int, price_out: int, max_concurrency: int,
                     max_tokens: int, tolerances: Path | None = None) -> ProviderOptions:
    from agoranet.node.node import ProviderOptions

    return ProviderOptions(model=model, precision=precision, engine=engine, upstream=upstream,
                           upstream_model=upstream_model,
                           threads=threads, storage_peers=list(storage_peer or []), max_batch=max_batch,
                           kubo_rpc=resolve_kubo_rpc(kubo_rpc), token_delay_ms=token_delay_ms, cheat=cheat,
                           tolerance_files=[tolerances] if tolerances else [],
                           pricing={"input_per_mtok": price_in, "output_per_mtok": price_out,
                                    "max_concurrency": max_concurrency, "max_tokens": max_tokens})


NAT_OPTIONS = {"autonat": "autonat", "port-map": "nat_port_map", "relay": "relay", "auto-relay": "auto_relay",
               "relay-service": "relay_service"}


def p2p_config(*, discovery: str, host: str, peer: list[str] | None, bootstrap: list[str] | None,
               listen: list[str] | None, announce: list[str] | None, nat: str | None) -> P2PConfig | None:
    """libp2p discovery's settings from the command line (None for HTTP gossip); checks the daemon is there."""
    from agoranet.core.errors import AgoraError

    given = {"--bootstrap": bootstrap, "--p2p-listen": listen, "--p2p-announce": announce, "--p2p-nat": nat}
    if discovery == "http":
        if used := [flag for flag, value in given.items() if value]:
            raise fail(f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} for --discovery libp2p; this node "
                       "gossips over HTTP (add --discovery libp2p, or drop the option)")
        return None
    if discovery != "libp2p":
        raise fail(f"--discovery is {discovery!r}; give http or libp2p")
    if peer:
        raise fail("--peer seeds HTTP gossip; with --discovery libp2p join through --bootstrap "
                   "/ip4/HOST/tcp/PORT/p2p/12D3KooW… (a libp2p node lists its multiaddrs at /agora/v1/peers)")
    from agoranet.core.settings import Settings
    from agoranet.net.libp2p import P2PConfig
    from agoranet.net.p2pd import DaemonOptions, find_p2pd, multiaddr_bytes

    flags = [n.strip() for n in (nat or "").split(",") if n.strip()]
    if unknown := [n for n in flags if n not in NAT_OPTIONS]:
        raise fail(f"--p2p-nat: unknown option {', '.join(map(repr, unknown))}; give some of {', '.join(NAT_OPTIONS)}")
    for flag, addrs in (("--bootstrap", bootstrap), ("--p2p-listen", listen), ("--p2p-announce", announce)):
        for addr in addrs or []:
            try:
                multiaddr_bytes(addr)
            except (ValueError, AgoraError) as exc:
                raise fail(f"{flag} {addr!r} is not a multiaddr like /ip4/10.0.0.2/tcp/4001/p2p/12D3KooW…: "
                           f"{exc}") from None
    if any("/p2p/" not in a for a in bootstrap or []):
        raise fail("--bootstrap needs the peer's id at the end: /ip4/HOST/tcp/PORT/p2p/12D3KooW…")
    try:
        binary = find_p2pd(Settings().p2pd)
    except AgoraError as exc:
        raise fail(exc) from None
    proto = "ip6" if ":" in host else "ip4"
    on = {NAT_OPTIONS[n] for n in flags}
    return P2PConfig(daemon=DaemonOptions(
        binary=binary, listen=tuple(listen or [f"/{proto}/{host}/tcp/0"]), announce=tuple(announce or ()),
        bootstrap=tuple(bootstrap or ()), autonat="autonat" in on, nat_port_map="nat_port_map" in on,
        relay="relay" in on, auto_relay="auto_relay" in on, relay_service="relay_service" in on))


def gateway_config(*, require_keys: bool, stall_timeout: float, connect_timeout: float, verifier: list[str] | None,
                   charge_credits: bool, verifier_fee_ppm: int, receipts: str = "compact") -> GatewayConfig:
    from agoranet.node.gateway import GatewayConfig

    if not 0 <= verifier_fee_ppm <= 1_000_000:
        raise fail(f"--verifier-fee-ppm is {verifier_fee_ppm}; give 0 to 1000000 (millionths of the charge)")
    return GatewayConfig(require_keys=require_keys, stall_timeout_s=stall_timeout, connect_timeout_s=connect_timeout,
                         verifiers=tuple(v.rstrip("/") for v in verifier or []), charge_credits=charge_credits,
                         verifier_fee_ppm=verifier_fee_ppm, receipts=receipts)  # type: ignore[arg-type]


def verifier_options(*, source: list[str] | None, audit_fraction: float, poll_interval: float,
                     models: list[str] | None, tolerances: Path | None, threads: int | None,
                     storage_peers: list[str] | None = None) -> VerifierOptions:
    from agoranet.node.node import VerifierOptions
    from agoranet.node.verifier import VerifierConfig

    if not 0.0 <= audit_fraction <= 1.0:
        raise fail(f"--audit-fraction {audit_fraction} is not between 0 and 1")
    audit = VerifierConfig(audit_fraction=audit_fraction, sources=tuple(source or ()), poll_interval_s=poll_interval)
    return VerifierOptions(audit, models, [tolerances] if tolerances else [], threads, list(storage_peers or []))


def serve_node(roles: Sequence[str], *, home: Path | None, host: str, port: int | None, public_url: str | None = None,
               log_json: bool | None = None, watch: Sequence[str] = (), **build: Any) -> None:
    """Run a node in the foreground until SIGINT/SIGTERM: `build` is `build_node`'s keyword arguments."""
    from agoranet.cli.progress import transfer_bar
    from agoranet.core.logs import configure_logging
    from agoranet.core.settings import Settings
    from agoranet.node.node import build_node
    from agoranet.node.server import serve_forever, url_of
    from agoranet.web import mount_dashboard

    configure_logging(json_lines=Settings().log_json if log_json is None else log_json)
    home = home_dir(home)
    if port is None:
        port = next(DEFAULT_PORTS[role] for role in DEFAULT_PORTS if role in roles)
    _, sock = open_node(home, host, port)
    url = (public_url or url_of(sock)).rstrip("/")
    try:
        with transfer_bar("model") as bar:  # drawn only if the provider fetches its model by CID
            if build.get("provider") is not None:
                build["provider"] = replace(build["provider"], fetch_progress=bar.update)
            node = build_node(home, url, roles, **build)
    except AgoraError as exc:
        raise fail(exc) from None
    except OSError as exc:
        raise fail(f"cannot open this node's files in {home}: {exc}") from None
    mount_dashboard(node.app, identity=node.identity, url=url, watch=list(watch))
    for line in describe(node, url):
        console.print(line)
    try:
        serve_forever(node.app, sock)
    except AgoraError as exc:  # a role that could not start (an upstream that does not answer …)
        raise fail(exc) from None


def describe(node: Node, url: str) -> list[str]:
    """What the node serves where, one line per role, for the operator."""
    lines = []
    if (g := node.gateway) is not None:
        c = g.config
        lines.append(f"gateway at [bold]{url}/v1[/]: routes to every provider {_found_by(node)}"
                     f"{'; API keys required' if c.require_keys or c.charge_credits else ''}"
                     f"{'; requests are charged in credits' if c.charge_credits else ''}"
                     f"{'; verifiers: ' + ', '.join(c.verifiers) if c.verifiers else ''}")
    if (p := node.provider) is not None:
        e = p.engine
        lines.append(f"provider serving [bold]{e.model_name}[/] ({e.model_cid}, {e.precision}) at "
                     f"[bold]{p.config.url}/v1[/]")
    if (v := node.verifier) is not None:
        a = v.config
        lines.append(f"verifier at {url}: auditing {a.audit_fraction:.0%} of receipts from "
                     f"{', '.join(a.sources) or 'submissions'}; reputation at {url}/agora/v1/reputation")
    if (s := node.storage) is not None:
        peers = [p for p in s.replicator.peers if p != s.replicator.url]
        mirror = f"; blocks mirrored to kubo at {s.store.kubo.url}" if s.store.kubo is not None else ""
        lines.append(f"storage peer at {url} with {len(s.store.pins())} pins; peers: {', '.join(peers) or 'none'}"
                     + mirror)
    lines.append(f"node [bold]{node.identity.peer_id}[/]; dashboard at {url}/, metrics at {url}/metrics")
    if (p2p := getattr(node.discovery, "p2p", None)) is not None:
        joined = ", ".join(p2p.daemon.bootstrap) or "none: others join through this node"
        lines.append(f"libp2p discovery on {', '.join(p2p.daemon.listen)} (bootstrap: {joined}); this node's "
                     f"multiaddrs, to --bootstrap others from, are at {url}/agora/v1/peers")
    return lines


def _found_by(node: Node) -> str:
    if getattr(node.discovery, "p2p", None) is not None:
        return "libp2p discovery finds (GossipSub, Kademlia DHT)"
    seeds = ", ".join(node.discovery.seeds) if node.discovery else ""
    return f"gossip finds (seeds: {seeds or 'none'})"


# Which roles use each option that not every node takes: giving one for a role not run is a mistake.
ROLE_OPTIONS = {
    **dict.fromkeys(("model", "precision", "engine", "upstream", "upstream_model", "price_in", "price_out", "max_concurrency",
                     "max_tokens", "max_batch", "token_delay_ms", "cheat"), ("provider",)),
    "storage_peer": ("provider", "storage", "verifier"),  # where models are fetched from, or replicated with
    "kubo_rpc": ("provider", "storage"),
    "threads": ("provider", "verifier"),
    **dict.fromkeys(("require_keys", "stall_timeout", "connect_timeout", "verifier", "charge_credits",
                     "verifier_fee_ppm"), ("gateway",)),
    **dict.fromkeys(("source", "audit_fraction", "poll_interval", "verify_model"), ("verifier",)),
    "tolerances": ("provider", "verifier"),
    "recheck": ("storage",),
}


def node(
    ctx: typer.Context,
    roles: Annotated[str, typer.Option(
        help="roles to run, comma-separated: gateway, provider, verifier, storage")],
    home: HomeOpt = None,
    host: str = "127.0.0.1",
    port: Annotated[Optional[int], typer.Option(
        help="port (default: 8300 with a gateway, else 8400 provider, 8500 storage, 8600 verifier)")] = None,
    public_url: PublicUrlOpt = None,
    peer: PeerOpt = None,
    gossip_interval: GossipIntervalOpt = 2.0,
    discovery: DiscoveryOpt = "http",
    bootstrap: BootstrapOpt = None,
    p2p_listen: P2PListenOpt = None,
    p2p_announce: P2PAnnounceOpt = None,
    p2p_nat: P2PNatOpt = None,
    watch: WatchOpt = None,
    log_json: LogJsonOpt = None,
    # provider
    model: ModelOpt = "agora-tiny",
    precision: PrecisionOpt = "fp32",
    engine: EngineOpt = "transformers",
    upstream: UpstreamOpt = None,
    upstream_model: UpstreamModelOpt = None,
    price_in: PriceInOpt = 100_000,
    price_out: PriceOutOpt = 200_000,
    max_concurrency: MaxConcurrencyOpt = 32,
    max_tokens: MaxTokensOpt = 512,
    max_batch: MaxBatchOpt = 32,
    threads: ThreadsOpt = None,
    token_delay_ms: TokenDelayOpt = 0,
    cheat: CheatOpt = None,
    storage_peer: Annotated[Optional[list[str]], typer.Option(
        help="other storage peer URL (repeatable): where a model CID is fetched from; storage replicates with them")
    ] = None,
    kubo_rpc: KuboRpcOpt = None,
    # gateway
    require_keys: RequireKeysOpt = False,
    stall_timeout: StallTimeoutOpt = 10.0,
    connect_timeout: ConnectTimeoutOpt = 2.0,
    verifier: VerifierOpt = None,
    charge_credits: ChargeCreditsOpt = False,
    verifier_fee_ppm: VerifierFeeOpt = 0,
    receipts: ReceiptsOpt = ReceiptMode.compact,
    # verifier
    source: SourceOpt = None,
    audit_fraction: AuditFractionOpt = 0.1,
    poll_interval: PollIntervalOpt = 5.0,
    verify_model: Annotated[Optional[list[str]], typer.Option(
        help="model(s) the verifier replays with: bundled name or directory (default agora-tiny; repeatable)")] = None,
    tolerances: TolerancesOpt = None,
    # storage
    recheck: RecheckOpt = 60.0,
) -> None:
    """Run several roles in one process: one identity, one port, one gossip membership.

    A gateway serves /v1 and routes over the whole network; a provider beside it serves under /provider/v1.
    """
    from agoranet.net.gossip import GossipConfig
    from agoranet.node.node import StorageOptions, parse_roles

    try:
        names = parse_roles(roles)
    except AgoraError as exc:
        raise fail(exc) from None
    for param in ctx.command.params:
        used_by = ROLE_OPTIONS.get(param.name or "", names)
        given = getattr(ctx.get_parameter_source(param.name), "name", None) == "COMMANDLINE"  # not a default
        if given and not set(used_by) & set(names):
            raise fail(f"{param.opts[0]} is for a node running {' or '.join(used_by)}; this one runs "
                       f"{', '.join(names)} (add to --roles, or drop the option)")
    build: dict[str, Any] = {"peers": list(peer or []), "gossip": GossipConfig(interval_s=gossip_interval),
                             "p2p": p2p_config(discovery=discovery, host=host, peer=peer, bootstrap=bootstrap,
                                               listen=p2p_listen, announce=p2p_announce, nat=p2p_nat)}
    if "provider" in names:
        build["provider"] = provider_options(
            model=model, precision=precision, engine=engine, upstream=upstream, upstream_model=upstream_model,
            storage_peer=storage_peer, kubo_rpc=kubo_rpc, threads=threads, max_batch=max_batch,
            token_delay_ms=token_delay_ms,
            cheat=cheat, price_in=price_in, price_out=price_out, max_concurrency=max_concurrency,
            max_tokens=max_tokens, tolerances=tolerances)
    if "gateway" in names:
        build["gateway"] = gateway_config(require_keys=require_keys, stall_timeout=stall_timeout,
                                          connect_timeout=connect_timeout, verifier=verifier,
                                          charge_credits=charge_credits, verifier_fee_ppm=verifier_fee_ppm,
                                          receipts=receipts.value)
    if "verifier" in names:
        build["verifier"] = verifier_options(source=source, audit_fraction=audit_fraction, poll_interval=poll_interval,
                                             models=verify_model, tolerances=tolerances, threads=threads,
                                             storage_peers=storage_peer)
    if "storage" in names:
        build["storage"] = StorageOptions(peers=list(storage_peer or []), recheck_interval_s=recheck,
                                          kubo_rpc=resolve_kubo_rpc(kubo_rpc))
        watch = [*(watch or []), *(storage_peer or [])]  # as `agora store serve` shows its replication peers
    serve_node(names, home=home, host=host, port=port, public_url=public_url, log_json=log_json, watch=watch or [],
               **build)
