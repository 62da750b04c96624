"""Composing a node process from its roles and settings."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI

from agoranet.core.identity import Identity
from agoranet.engine.base import Engine
from agoranet.node.app import create_app
from agoranet.node.provider import Provider, ProviderConfig
from agoranet.node.state import NodeState

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 1 << 20


@dataclass
class ProviderOptions:
    model: str = "agora-tiny"
    precision: str = "fp32"
    upstream: str | None = None
    upstream_model: str | None = None
    upstream_api_key: str | None = None
    threads: int | None = None
    max_batch: int = 16
    pricing: dict[str, int] = field(default_factory=dict)  # ProviderConfig overrides
    cheat: str | None = None  # TEST/DEMO ONLY: see agoranet.node.cheat


def make_engine(opts: ProviderOptions) -> Engine:
    if opts.upstream:
        from agoranet.engine.upstream import UpstreamEngine

        return UpstreamEngine(opts.upstream, model=opts.upstream_model or opts.model, api_key=opts.upstream_api_key)
    from agoranet.engine.models import model_cid, resolve_model
    from agoranet.engine.transformers_engine import TransformersEngine

    model_dir, name = resolve_model(opts.model)
    engine = TransformersEngine(model_dir, model_cid=model_cid(model_dir), model_name=name, precision=opts.precision,
                                max_batch=opts.max_batch, threads=opts.threads)
    if opts.cheat:
        from agoranet.node.cheat import CheatingEngine

        return CheatingEngine(engine, opts.cheat)  # type: ignore[return-value]
    return engine


def build_provider_node(home: Path, public_url: str, opts: ProviderOptions, *,
                        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> tuple[FastAPI, Provider]:
    identity = Identity.load(home / "identity.key")
    state = NodeState(home / "node.db")
    provider = Provider(identity, make_engine(opts), state, ProviderConfig(public_url=public_url, **opts.pricing))
    return create_app([provider], max_request_bytes=max_request_bytes, title="Agora provider"), provider
