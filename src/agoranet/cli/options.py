"""Options of the commands that run a node (`provide`, `gateway`, `verify serve`, `store serve`, `node`),
each defined once: `agora node` takes the union of the single-role commands' options.

It imports nothing from the command modules, so each of them can import it at the top.
"""

from __future__ import annotations

from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from agoranet.core.settings import Settings

# Every node (--threads: a provider's engine and a verifier's replays; --kubo-rpc: a provider's model, a store)
HomeOpt = Annotated[Optional[Path], typer.Option("--home", help="node directory (default $AGORA_HOME or ~/.agora)")]
PublicUrlOpt = Annotated[Optional[str], typer.Option("--public-url", help="URL others reach this node at")]
PeerOpt = Annotated[Optional[list[str]], typer.Option("--peer", help="seed peer URL to gossip with (repeatable)")]
GossipIntervalOpt = Annotated[float, typer.Option("--gossip-interval", help="seconds between gossip rounds")]

# Discovery: HTTP gossip (default) or libp2p (GossipSub + Kademlia DHT through a go-libp2p daemon)
_discovery = partial(typer.Option, rich_help_panel="Discovery")
DiscoveryOpt = Annotated[str, _discovery(
    "--discovery", help="how nodes find each other: http (signed gossip over HTTP, seeded by --peer) or libp2p "
                        "(GossipSub and the Kademlia DHT on a go-libp2p daemon, joined by --bootstrap; "
                        "pip install 'agoranet[p2p]')")]
BootstrapOpt = Annotated[Optional[list[str]], _discovery(
    "--bootstrap", help="libp2p peer to join through, /ip4/HOST/tcp/PORT/p2p/12D3KooW… (repeatable)")]
P2PListenOpt = Annotated[Optional[list[str]], _discovery(
    "--p2p-listen", help="libp2p listen multiaddr (repeatable; default /ip4/HOST/tcp/0 on --host)")]
P2PAnnounceOpt = Annotated[Optional[list[str]], _discovery(
    "--p2p-announce", help="libp2p multiaddr to announce instead of the listening ones, e.g. a public address")]
P2PNatOpt = Annotated[Optional[str], _discovery(
    "--p2p-nat", help="NAT traversal the daemon offers, comma-separated: autonat, port-map (UPnP/NAT-PMP), relay, "
                      "auto-relay, relay-service (default: none)")]
WatchOpt = Annotated[Optional[list[str]], typer.Option("--watch", help="peer URL to show on the dashboard; repeat")]
LogJsonOpt = Annotated[Optional[bool], typer.Option("--log-json/--no-log-json",
                                                    help="log one JSON object per line (default $AGORA_LOG_JSON)")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads",
                                                   help="torch CPU threads (1 is fastest on a shared CPU)")]
KuboRpcOpt = Annotated[Optional[str], typer.Option(
    "--kubo-rpc", help="a kubo (IPFS) daemon's RPC address, e.g. http://127.0.0.1:5001: blocks (a model CID's too) "
                       "are read from it, and those stored here put to it (default: $AGORA_KUBO_RPC)",
    show_default=False)]

# Each role's own options show in a panel of their own in `--help`.
_provider = partial(typer.Option, rich_help_panel="Provider")
_gateway = partial(typer.Option, rich_help_panel="Gateway")
_verifier = partial(typer.Option, rich_help_panel="Verifier")
_storage = partial(typer.Option, rich_help_panel="Storage peer")

# Provider
ModelOpt = Annotated[str, _provider("--model", help="bundled model name, local model directory, or model CID")]
StoragePeerOpt = Annotated[Optional[list[str]], _provider(
    "--storage-peer", help="storage peer URL to fetch a model CID from (repeatable)")]
PrecisionOpt = Annotated[str, _provider("--precision", help="fp32, bf16 or fp16 (the built-in engine; "
                                                           "--engine vllm: the --dtype vLLM runs; a GGUF declares its own)")]
EngineOpt = Annotated[str, _provider(
    "--engine", help="transformers (built-in), llamacpp (--model FILE.gguf, in process), vllm (--upstream URL of a vLLM "
    "server started with --logits-processors agoranet.engine.vllm_rule:AgoraRule, serving --model DIR) or upstream "
    "(--upstream URL)")]
UpstreamOpt = Annotated[Optional[str], _provider(
    "--upstream", help="serve through an OpenAI-compatible server at this URL")]
UpstreamModelOpt = Annotated[Optional[str], _provider("--upstream-model", help="model name the upstream serves")]
PriceInOpt = Annotated[int, _provider("--price-in", min=0, help="micro-credits per 1M input tokens")]
PriceOutOpt = Annotated[int, _provider("--price-out", min=0, help="micro-credits per 1M output tokens")]
MaxConcurrencyOpt = Annotated[int, _provider("--max-concurrency", help="most requests served at once (more get 429); keep it at least --max-batch")]
MaxTokensOpt = Annotated[int, _provider("--max-tokens", help="most tokens a request may ask for")]
MaxBatchOpt = Annotated[int, _provider("--max-batch", help="most sequences decoded together")]
TokenDelayOpt = Annotated[int, _provider("--token-delay-ms", hidden=True,
                                         help="space tokens out (failover tests, demos)")]
CheatOpt = Annotated[Optional[str], _provider(
    "--cheat", hidden=True, help="TEST/DEMO ONLY: model|token|logprobs|temperature|seed|top_p|prompt|near_ties|fp16|precision|unknown_model|rule")]

# Gateway
RequireKeysOpt = Annotated[bool, _gateway(
    "--require-keys/--no-require-keys", help="serve only requests with an API key from `agora keys create`")]
StallTimeoutOpt = Annotated[float, _gateway(
    "--stall-timeout", help="seconds of provider silence mid-stream before failing over")]
ConnectTimeoutOpt = Annotated[float, _gateway(
    "--connect-timeout", help="seconds to wait for a provider to accept a connection")]
VerifierOpt = Annotated[Optional[list[str]], _gateway(
    "--verifier", help="verifier URL: relayed receipts go to it, its reputations steer routing (repeatable)")]
ChargeCreditsOpt = Annotated[bool, _gateway(
    "--charge-credits/--no-charge-credits",
    help="bill every request to its API key's credits (`agora keys fund`); implies --require-keys")]
VerifierFeeOpt = Annotated[int, _gateway(
    "--verifier-fee-ppm",
    help="verifiers' fee in millionths of the providers' charge, paid by the user (0 to 1000000)")]
class ReceiptMode(str, Enum):
    full = "full"
    compact = "compact"


ReceiptsOpt = Annotated[ReceiptMode, _gateway(
    "--receipts",
    help="receipts in answers unless a request asks (agora.receipt): compact (CID, URL, the provider's signed "
         "summary) or full signed records with token ids and logprobs")]

# Verifier
SourceOpt = Annotated[Optional[list[str]], _verifier(
    "--source", help="provider/gateway URL whose receipts to pull (repeatable)")]
AuditFractionOpt = Annotated[float, _verifier("--audit-fraction", help="share of seen receipts to replay (0-1)")]
PollIntervalOpt = Annotated[float, _verifier("--poll-interval", help="seconds between pulls from each --source")]
TolerancesOpt = Annotated[Optional[Path], _verifier(
    "--tolerances", help="a signed tolerances record (JSON) beside the shipped defaults and HOME/tolerances/: a "
                         "verifier judges by it; a provider may sell only a model and precision one covers")]

# Storage peer
RecheckOpt = Annotated[float, _storage("--recheck", help="seconds between re-checks of local copies")]


def home_dir(home: Path | None) -> Path:
    """The node directory: --home, else $AGORA_HOME, else ~/.agora."""
    return home if home is not None else Settings().home


def resolve_kubo_rpc(flag: str | None) -> str | None:
    """--kubo-rpc, else $AGORA_KUBO_RPC; `--kubo-rpc ''` turns the setting off for one command."""
    return (flag if flag is not None else Settings().kubo_rpc) or None
