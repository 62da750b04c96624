"""Composing a node process from its roles and settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from agoranet.core.identity import Identity
from agoranet.engine.base import Engine
from agoranet.log.credits import CreditLedger
from agoranet.log.transparency import TransparencyLog
from agoranet.log.witness import Witness
from agoranet.net.gossip import GossipConfig, GossipDiscovery
from agoranet.node.app import create_app
from agoranet.node.credits_role import CreditsRole
from agoranet.node.gateway import Gateway, GatewayConfig
from agoranet.node.keys import KEYS_FILE, KeyStore
from agoranet.node.log_role import LogRole
from agoranet.node.network import NetworkRole
from agoranet.node.provider import Provider, ProviderConfig
from agoranet.node.state import NodeState
from agoranet.node.witness_role import WitnessRole

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
WITNESS_FILE = "witness.db"  # the heads this node has verified of other logs, and split views


@dataclass
class ProviderOptions:
    model: str = "agora-tiny"
    precision: str = "fp32"
    upstream: str | None = None
    upstream_model: str | None = None
    upstream_api_key: str | None = None
    threads: int | None = None
    max_batch: int = 16
    storage_peers: list[str] = field(default_factory=list)  # where to fetch a model given by CID
    kubo_rpc: str | None = None  # a kubo daemon whose repo a model CID is read from first
    token_delay_ms: int = 0  # space tokens out (tests and demos that cut a stream mid-way)
    pricing: dict[str, int] = field(default_factory=dict)  # ProviderConfig overrides
    cheat: str | None = None  # TEST/DEMO ONLY: see agoranet.node.cheat


def make_engine(opts: ProviderOptions, home: Path) -> Engine:
    engine = _make_engine(opts, home)
    if opts.token_delay_ms:
        from agoranet.engine.stub import PacedEngine

        return PacedEngine(engine, opts.token_delay_ms / 1000)
    return engine


def _make_engine(opts: ProviderOptions, home: Path) -> Engine:
    if opts.upstream:
        from agoranet.engine.upstream import UpstreamEngine

        return UpstreamEngine(opts.upstream, model=opts.upstream_model or opts.model, api_key=opts.upstream_api_key)
    from agoranet.engine.transformers_engine import TransformersEngine
    from agoranet.engine.models import model_cid
    from agoranet.node.models import materialize_model

    model_dir, name = materialize_model(opts.model, home, opts.storage_peers, opts.kubo_rpc)
    engine = TransformersEngine(model_dir, model_cid=model_cid(model_dir), model_name=name,
                                precision=opts.precision, max_batch=opts.max_batch, threads=opts.threads)
    if opts.cheat:
        from agoranet.node.cheat import CheatingEngine

        return CheatingEngine(engine, opts.cheat)  # type: ignore[return-value]
    return engine


def build_provider_node(home: Path, public_url: str, opts: ProviderOptions, *,
                        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, peers: list[str] | None = None,
                        gossip: GossipConfig | None = None, engine: Engine | None = None) -> tuple[FastAPI, Provider]:
    """A provider node; with `peers` it also joins the network by gossip and announces its offer."""
    identity = Identity.load(home / "identity.key")
    state = NodeState(home / "node.db")
    log_role = LogRole(TransparencyLog(home / "log.db", identity))
    provider = Provider(identity, engine or make_engine(opts, home), state,
                        ProviderConfig(public_url=public_url, **opts.pricing), log_role)
    roles: list = [log_role, provider]
    if peers:
        discovery = GossipDiscovery(identity, public_url, peers, roles=["provider"], config=gossip)
        discovery.announce(provider.offer)
        # Gossips this node's signed tree head and witnesses every other log's.
        roles.append(WitnessRole(Witness(home / WITNESS_FILE), discovery, own_log=log_role.log))
        roles.append(NetworkRole(discovery))  # started after the engine, stopped before it
    return create_app(roles, max_request_bytes=max_request_bytes, title="Agora provider"), provider


def build_gateway_node(home: Path, public_url: str, peers: list[str], *, config: GatewayConfig | None = None,
                       gossip: GossipConfig | None = None,
                       max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> tuple[FastAPI, Gateway]:
    """A gateway node: discovers providers by gossip (seeded with `peers`) and routes users to them."""
    identity = Identity.load(home / "identity.key")
    config = config or GatewayConfig()
    discovery = GossipDiscovery(identity, public_url, peers, roles=["gateway"], config=gossip)
    keys = KeyStore(home / KEYS_FILE)
    log_role = LogRole(TransparencyLog(home / "log.db", identity))  # the credit ledger's moves, auditable
    credits = CreditsRole(CreditLedger(log_role.log), keys, verifier_fee_ppm=config.verifier_fee_ppm)
    gateway = Gateway(identity, discovery, config, keys, credits)
    # Gossips the gateway's own head too (its ledger is in its log) and witnesses every other log's.
    witness = WitnessRole(Witness(home / WITNESS_FILE), discovery, own_log=log_role.log)
    gateway.router_state.exclusions.append(witness.untrusted)  # a provider whose log forked gets no traffic
    # Stopped in reverse: the gateway first, then open holds are refunded, and the log closes last.
    app = create_app([log_role, credits, witness, NetworkRole(discovery), gateway], max_request_bytes=max_request_bytes,
                     title="Agora gateway")
    return app, gateway
