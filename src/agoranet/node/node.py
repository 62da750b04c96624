"""Composing a node process from its roles and settings."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity
from agoranet.engine.base import Engine
from agoranet.engine.upstream import UPSTREAM_ENGINE
from agoranet.log.credits import CreditLedger
from agoranet.log.transparency import TransparencyLog
from agoranet.log.witness import Witness
from agoranet.net.gossip import GossipConfig, GossipDiscovery
from agoranet.net.storage_client import Progress
from agoranet.node.app import create_app
from agoranet.node.credits_role import CreditsRole
from agoranet.node.gateway import Gateway, GatewayConfig
from agoranet.node.keys import KEYS_FILE, KeyStore
from agoranet.node.log_role import LogRole
from agoranet.node.network import NetworkRole
from agoranet.node.provider import Provider, ProviderConfig
from agoranet.node.records_api import records_router
from agoranet.node.state import NodeState
from agoranet.node.storage_role import StorageRole
from agoranet.node.witness_role import WitnessRole
from agoranet.verify.tolerances import AnyTolerances, default_tolerances, load_tolerances

if TYPE_CHECKING:  # the verifier imports torch, which a gateway must not load
    from agoranet.net.libp2p import P2PConfig
    from agoranet.node.verifier import VerifierConfig, VerifierRole

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 1 << 20
WITNESS_FILE = "witness.db"  # the heads this node has verified of other logs, and split views
ROLES = ("gateway", "provider", "verifier", "storage")
PROVIDER_PATH = "/provider"  # where a provider beside a gateway serves its API (the gateway owns /v1)


class UnknownRole(AgoraError):
    hint = f"--roles takes a comma-separated list of {', '.join(ROLES)}"


def parse_roles(text: str) -> tuple[str, ...]:
    """Role names from "gateway,provider": known ones only, each once, in ROLES order."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if not names:
        raise UnknownRole("no role given")
    if unknown := [name for name in names if name not in ROLES]:
        raise UnknownRole(f"unknown role{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}")
    return tuple(name for name in ROLES if name in names)


@dataclass
class ProviderOptions:
    model: str = "agora-tiny"
    precision: str = "fp32"
    engine: str = "transformers"  # or "llamacpp" (a GGUF file), "vllm" (a vLLM server at `upstream` serving
    # `model`), "upstream" (implied by `upstream`)
    upstream: str | None = None
    upstream_model: str | None = None
    upstream_api_key: str | None = None
    threads: int | None = None
    max_batch: int = 32
    storage_peers: list[str] = field(default_factory=list)  # where to fetch a model given by CID
    kubo_rpc: str | None = None  # a kubo daemon whose repo a model CID is read from first
    token_delay_ms: int = 0  # space tokens out (tests and demos that cut a stream mid-way)
    pricing: dict[str, int] = field(default_factory=dict)  # ProviderConfig overrides
    cheat: str | None = None  # TEST/DEMO ONLY: see agoranet.node.cheat
    # Signed tolerance records for what it sells (besides the shipped ones and HOME/tolerances/CID.json).
    tolerance_files: list[Path] = field(default_factory=list)
    fetch_progress: Progress | None = None  # follows the fetch of a model given by CID (the CLI draws a bar)


@dataclass
class VerifierOptions:
    audit: VerifierConfig | None = None  # audit fraction, sources, poll interval (VerifierConfig() by default)
    models: list[str] | None = None  # models to replay with (agora-tiny by default)
    tolerance_files: list[Path] = field(default_factory=list)
    threads: int | None = 1
    storage_peers: list[str] = field(default_factory=list)  # where a model it lacks is fetched by CID


@dataclass
class StorageOptions:
    peers: list[str] = field(default_factory=list)  # the other storage peers, to replicate pins among
    recheck_interval_s: float = 60.0
    kubo_rpc: str | None = None  # a kubo daemon every stored block is also put to


@dataclass(frozen=True)
class Node:
    """A node process: its app and the roles it runs (None for those it does not)."""

    app: FastAPI
    identity: Identity
    roles: tuple[str, ...]
    discovery: GossipDiscovery | None = None
    provider: Provider | None = None
    gateway: Gateway | None = None
    verifier: VerifierRole | None = None
    storage: StorageRole | None = None


def make_engine(opts: ProviderOptions, home: Path) -> Engine:
    engine = _make_engine(opts, home)
    if opts.token_delay_ms:
        from agoranet.engine.stub import PacedEngine

        return PacedEngine(engine, opts.token_delay_ms / 1000)
    return engine


ENGINES = ("transformers", "llamacpp", "vllm", "upstream")
TOLERANCES_DIR = "tolerances"  # where `agora verify calibrate` writes HOME/tolerances/MODEL_CID.json


class NotSellable(AgoraError):
    """A provider asked to sell a (model, precision class) that no tolerance record covers: nobody could judge it."""


def tolerance_records(home: Path, files: Sequence[Path], model: str) -> list[AnyTolerances]:
    """The tolerance tables known for `model`: the shipped one, this home's calibration, the files given."""
    paths = [home / TOLERANCES_DIR / f"{model}.json", *files]  # later ones win, as in a verifier
    records = [default_tolerances(model)] + [load_tolerances(p) for p in paths if p.exists()]
    return [r.body for r in records if r is not None and r.body.model == model]


def check_sellable(engine: Engine, home: Path, files: Sequence[Path]) -> None:
    """Refuse to sell what verifiers cannot judge: the engine's (model, precision) needs a tolerance record.
    Upstream engines are their own declared class, never replayed (their offers say `upstream`)."""
    if engine.name == UPSTREAM_ENGINE:
        return
    tables = tolerance_records(home, files, engine.model_cid)
    if any(c.precision == engine.precision for t in tables for c in t.classes):
        return
    have = sorted({c.precision for t in tables for c in t.classes})
    raise NotSellable(
        f"no tolerance record covers model {engine.model_cid} at precision {engine.precision!r}"
        + (f" (calibrated: {', '.join(have)})" if have else ""),
        hint=f"a provider may only sell what verifiers can judge: run `agora verify calibrate --model MODEL "
             f"--precision {engine.precision}` (it writes HOME/{TOLERANCES_DIR}/{engine.model_cid}.json; give verifiers the "
             f"same file with --tolerances), pass --tolerances FILE, or serve a calibrated precision"
             + (f" ({', '.join(have)})" if have else ""))


def calibrated_range(engine: Engine, home: Path, files: Sequence[Path]) -> tuple[int, int]:
    """(prompt, output) tokens the tolerance record of what `engine` sells was calibrated over, which the provider
    serves within: the last record listing its class wins (the files given over this home's over the shipped
    one, as a verifier loads them); (0, 0) when none does (an upstream engine, or a class nobody calibrated)."""
    if engine.name == UPSTREAM_ENGINE:
        return 0, 0
    classes = [c for t in tolerance_records(home, files, engine.model_cid) for c in t.classes
               if c.precision == engine.precision]
    return (classes[-1].max_prompt_tokens, classes[-1].max_output_tokens) if classes else (0, 0)


class UnknownEngine(AgoraError):
    hint = f"--engine takes one of {', '.join(ENGINES)}"


def _make_engine(opts: ProviderOptions, home: Path) -> Engine:
    if opts.engine not in ENGINES:
        raise UnknownEngine(f"unknown engine {opts.engine!r}")
    if opts.engine == "llamacpp":
        from agoranet.engine.llamacpp_engine import LlamaCppEngine
        from agoranet.engine.models import model_cid
        from agoranet.node.models import materialize_model

        if opts.upstream:
            raise UnknownEngine("--engine llamacpp runs the GGUF in process; it takes --model FILE.gguf, not --upstream")
        path, name = materialize_model(opts.model, home, opts.storage_peers, opts.kubo_rpc, opts.fetch_progress)
        if not path.is_file():
            raise UnknownEngine(f"--engine llamacpp needs a GGUF file; {path} is a directory",
                                hint="pass --model FILE.gguf (or --engine transformers for a model directory)")
        gguf = LlamaCppEngine(path, model_cid=model_cid(path), model_name=name, threads=opts.threads)
        check_sellable(gguf, home, opts.tolerance_files)
        return gguf
    if opts.engine == "vllm":
        from agoranet.engine.models import model_cid
        from agoranet.engine.vllm_engine import VLLMEngine
        from agoranet.node.models import materialize_model

        if not opts.upstream:
            raise UnknownEngine("--engine vllm needs --upstream URL of a vLLM server started with Agora's logits "
                                "processor", hint="see `agora provide --help` and README's vLLM section")
        model_dir, name = materialize_model(opts.model, home, opts.storage_peers, opts.kubo_rpc, opts.fetch_progress)
        if model_dir.is_file():
            raise UnknownEngine(f"--engine vllm needs the model directory vLLM serves; {model_dir} is a file",
                                hint="pass --model DIR (the Hugging Face directory given to vLLM)")
        served = VLLMEngine(opts.upstream, model_dir, model_cid=model_cid(model_dir), model_name=name,
                            upstream_model=opts.upstream_model, precision=opts.precision,
                            api_key=opts.upstream_api_key)
        check_sellable(served, home, opts.tolerance_files)
        return served
    if opts.upstream or opts.engine == "upstream":
        if not opts.upstream:
            raise UnknownEngine("--engine upstream needs --upstream URL of an OpenAI-compatible server")
        from agoranet.engine.upstream import UpstreamEngine

        return UpstreamEngine(opts.upstream, model=opts.upstream_model or opts.model, api_key=opts.upstream_api_key)
    from agoranet.engine.transformers_engine import TransformersEngine
    from agoranet.engine.models import model_cid
    from agoranet.node.models import materialize_model

    model_dir, name = materialize_model(opts.model, home, opts.storage_peers, opts.kubo_rpc, opts.fetch_progress)
    if model_dir.is_file():
        raise UnknownEngine(f"{model_dir} is a GGUF file, which the built-in engine does not run",
                            hint="pass --engine llamacpp to serve it with llama.cpp")
    engine = TransformersEngine(model_dir, model_cid=model_cid(model_dir), model_name=name,
                                precision=opts.precision, max_batch=opts.max_batch, threads=opts.threads)
    check_sellable(engine, home, opts.tolerance_files)  # the honest engine: a cheat declares what it likes
    if opts.cheat:
        from agoranet.node.cheat import CheatingEngine

        return CheatingEngine(engine, opts.cheat)  # type: ignore[return-value]
    return engine


def model_fetcher(home: Path, peers: list[str]) -> Callable[[str], Path] | None:
    """How a verifier gets a model it lacks: by CID from its storage peers into its home (None: it cannot)."""
    if not peers:
        return None
    from agoranet.core.errors import ModelError, ModelUnavailable
    from agoranet.net.storage_client import FetchFailed, PeersUnavailable
    from agoranet.node.models import materialize_model

    def fetch(cid: str) -> Path:
        try:
            return materialize_model(cid, home, peers)[0]
        except PeersUnavailable as exc:  # the verifier's own peers are down: its problem, not the provider's
            raise ModelError(f"cannot fetch model {cid}: {exc}", hint=exc.hint) from None
        except FetchFailed as exc:  # peers answered and none has its blocks: nobody serves this model
            raise ModelUnavailable(str(exc)) from None
    return fetch


def build_node(home: Path, public_url: str, roles: Iterable[str], *, peers: Sequence[str] = (),
               gossip: GossipConfig | None = None, p2p: P2PConfig | None = None, provider: ProviderOptions | None = None,
               engine: Engine | None = None, gateway: GatewayConfig | None = None,
               verifier: VerifierOptions | None = None, storage: StorageOptions | None = None,
               max_request_bytes: int | None = None) -> Node:
    """One process, one identity, one port serving any combination of ROLES.

    What a node has once, its roles share: the identity, the transparency log (a provider's receipts
    and offers, a gateway's credit moves), the records (`node.db`: what a provider signs, what a
    verifier audits), and discovery with the witness of other logs: HTTP gossip, which a gateway
    always runs and any other node when given `peers`, or with `p2p` libp2p (GossipSub and the
    Kademlia DHT through a go-libp2p daemon), which every node given it runs.
    """
    names = parse_roles(",".join(roles))
    identity = Identity.load_or_create(home / "identity.key")
    if "provider" in names and engine is None:
        engine = make_engine(provider or ProviderOptions(), home)  # first: a model that will not load stops here
    log_role = LogRole(TransparencyLog(home / "log.db", identity)) if {"provider", "gateway"} & set(names) else None
    state = NodeState(home / "node.db") if {"provider", "verifier"} & set(names) else None
    discovery = witness = None
    if p2p is not None:
        from agoranet.net.libp2p import LibP2PDiscovery  # needs protobuf, which only the p2p extra brings

        if p2p.log_dir is None:
            p2p = replace(p2p, log_dir=home / "p2p")
        discovery = LibP2PDiscovery(identity, public_url, roles=list(names), config=gossip, p2p=p2p)
    elif "gateway" in names or peers:
        discovery = GossipDiscovery(identity, public_url, list(peers), roles=list(names), config=gossip)
    if discovery is not None:
        # Gossips this node's signed tree head (if it keeps a log) and witnesses every other log's.
        witness = WitnessRole(Witness(home / WITNESS_FILE), discovery, own_log=log_role.log if log_role else None)

    # The roles in start order (create_app stops them in reverse): the log opens first and closes last,
    # since everyone appends to it; gossip starts once the engine runs (the offer it announces must be
    # served) and stops before it; the gateway stops first, then its open credit holds are refunded.
    started: list = [log_role] if log_role is not None else []
    gateway_role = provider_role = verifier_role = storage_role = None
    if "gateway" in names:
        gateway = gateway or GatewayConfig()
        keys = KeyStore(home / KEYS_FILE)
        credits = CreditsRole(CreditLedger(log_role.log), keys, verifier_fee_ppm=gateway.verifier_fee_ppm)
        started.append(credits)
    if "storage" in names:
        storage = storage or StorageOptions()
        storage_role = StorageRole(home, public_url, storage.peers, recheck_interval=storage.recheck_interval_s,
                                   kubo_rpc=storage.kubo_rpc, identity=identity)
        started.append(storage_role)
    if "verifier" in names:
        from agoranet.node.judge import ReplayVerifier  # torch: verifiers only
        from agoranet.node.verifier import VerifierConfig, VerifierRole

        verifier = verifier or VerifierOptions()
        calibrated = sorted((home / TOLERANCES_DIR).glob("*.json"))  # `agora verify calibrate` wrote them here
        replay = ReplayVerifier(identity, models=verifier.models,
                                tolerance_files=[*calibrated, *verifier.tolerance_files],
                                threads=verifier.threads, fetch=model_fetcher(home, verifier.storage_peers))
        verifier_role = VerifierRole(identity, replay, state, verifier.audit or VerifierConfig())
        started.append(verifier_role)
    if "provider" in names:
        # Beside a gateway, which owns /v1 (users talk to it, and it routes over the whole network,
        # this provider included, over HTTP), the provider's API moves to PROVIDER_PATH: its offer's URL.
        path = PROVIDER_PATH if "gateway" in names else ""
        # A gateway that requires keys would be pointless if its provider served anyone under /provider:
        # that provider then serves only requests its own gateway signed with the node's identity.
        keyed = "gateway" in names and (gateway.require_keys or gateway.charge_credits)
        opts = provider or ProviderOptions()
        max_prompt, max_output = calibrated_range(engine, home, opts.tolerance_files)
        config = ProviderConfig(public_url=public_url, path=path, **{"max_prompt_tokens": max_prompt,
                                                                     "max_output_tokens": max_output, **opts.pricing},
                                callers=frozenset({str(identity.peer_id)}) if keyed else None)
        provider_role = Provider(identity, engine, state, config, log_role)
        started.append(provider_role)
    if discovery is not None:
        if provider_role is not None:
            discovery.announce(provider_role.offer)
        started += [witness, NetworkRole(discovery)]
    if "gateway" in names:
        if verifier_role is not None and public_url.rstrip("/") not in gateway.verifiers:
            gateway = replace(gateway, verifiers=(public_url.rstrip("/"), *gateway.verifiers))  # its own verifier too
        gateway_role = Gateway(identity, discovery, gateway, keys, credits)
        gateway_role.routing.exclusions.append(witness.untrusted)  # a provider whose log forked: no traffic
        started.append(gateway_role)
    # The provider's records are the node's too, at its root, where its dashboard links receipts
    # (a verifier there serves the same records already).
    routers = [records_router(state)] if provider_role and provider_role.config.path and not verifier_role else []
    # Routes that take larger bodies (storage blocks, verifier receipts) say so in their role's body_limits.
    app = create_app(started, max_request_bytes=max_request_bytes or DEFAULT_MAX_REQUEST_BYTES,
                     title=f"Agora {names[0]}" if len(names) == 1 else f"Agora node ({', '.join(names)})",
                     routers=routers)
    return Node(app, identity, names, discovery, provider=provider_role, gateway=gateway_role,
                verifier=verifier_role, storage=storage_role)


def build_provider_node(home: Path, public_url: str, opts: ProviderOptions, *,
                        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, peers: list[str] | None = None,
                        gossip: GossipConfig | None = None, p2p: P2PConfig | None = None,
                        engine: Engine | None = None) -> tuple[FastAPI, Provider]:
    """A provider node; with `peers` (or `p2p`) it also joins the network and announces its offer."""
    node = build_node(home, public_url, ["provider"], provider=opts, engine=engine, peers=peers or [], gossip=gossip,
                      p2p=p2p, max_request_bytes=max_request_bytes)
    return node.app, node.provider


def build_gateway_node(home: Path, public_url: str, peers: list[str], *, config: GatewayConfig | None = None,
                       gossip: GossipConfig | None = None, p2p: P2PConfig | None = None,
                       max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> tuple[FastAPI, Gateway]:
    """A gateway node: discovers providers (by gossip seeded with `peers`, or by libp2p) and routes users to them."""
    node = build_node(home, public_url, ["gateway"], gateway=config, peers=peers, gossip=gossip, p2p=p2p,
                      max_request_bytes=max_request_bytes)
    return node.app, node.gateway


def build_verifier_node(home: Path, audit: VerifierConfig, *, models: list[str] | None = None,
                        tolerance_files: list[Path] = (), threads: int | None = 1,
                        max_request_bytes: int | None = None,
                        storage_peers: list[str] | None = None) -> tuple[FastAPI, VerifierRole]:
    """A verifier node, reached by its URL alone: it gossips with no one, so it needs none to be built."""
    node = build_node(home, "", ["verifier"], max_request_bytes=max_request_bytes,
                      verifier=VerifierOptions(audit, models, list(tolerance_files), threads, list(storage_peers or [])))
    return node.app, node.verifier
