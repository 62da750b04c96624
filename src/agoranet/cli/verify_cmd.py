"""`agora verify …`: check a receipt, re-check a fraud proof, calibrate tolerances.

    agora verify RECEIPT_CID --node URL        replay one receipt fetched from a node
    agora verify --fraud-proof CID --node URL  re-check a fraud proof (or --fraud-proof FILE.json)
    agora verify calibrate --precision bf16    measure tolerances on honest runs, sign and store them
    agora verify serve --source URL            run a verifier node (audits, verdicts, reputation)

Exit status: 0 the receipt is valid / the fraud proof holds; 3 the receipt is fraudulent / the
fraud proof is false; 1 anything went wrong before a judgement.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from typer.core import TyperGroup

from agoranet.cli.console import CHECK_FAILED, console, fail
from agoranet.cli.options import (
    AuditFractionOpt, HomeOpt, PollIntervalOpt, SourceOpt, StoragePeerOpt, ThreadsOpt, TolerancesOpt, home_dir,
)
from agoranet.core.errors import AgoraError
from agoranet.core.identity import Identity
from agoranet.verify.tolerances import MIN_TOLERANCE, AnyTolerances

JUDGED_BAD = CHECK_FAILED  # a receipt judged fraud or a violation, or a fraud proof that holds


class _ReceiptOrCommand(TyperGroup):
    """`agora verify CID …` and `agora verify --fraud-proof …` mean `agora verify check …`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["check", *args]
        return super().parse_args(ctx, args)


verify_app = typer.Typer(cls=_ReceiptOrCommand, no_args_is_help=True, add_completion=False,
                         pretty_exceptions_enable=False,
                         help="Verify receipts by replay, re-check fraud proofs, calibrate tolerances.  "
                              "`agora verify RECEIPT_CID --node URL` replays one receipt;  "
                              "`agora verify --fraud-proof CID|FILE [--node URL]` re-checks a fraud proof.  "
                              "Exit status 3 means fraud found / false proof.")

ModelsOpt = Annotated[Optional[list[str]], typer.Option("--model", help="model(s) to replay with: bundled name or "
                                                        "directory (default agora-tiny)")]


@verify_app.command("check", hidden=True)
def check(
    receipt_cid: Annotated[Optional[str], typer.Argument(help="CID of the receipt to verify")] = None,
    node: Annotated[Optional[str], typer.Option(help="node that stores the receipt/proof and its request")] = None,
    fraud_proof: Annotated[Optional[str], typer.Option("--fraud-proof", help="CID (with --node) or JSON file of a "
                                                       "fraud proof or window proof to re-check")] = None,
    model: ModelsOpt = None,
    tolerances: TolerancesOpt = None,
    out: Annotated[Optional[Path], typer.Option(help="write the verdict and any fraud proof here (JSON)")] = None,
    home: HomeOpt = None,
) -> None:
    """Replay a receipt (or re-check a fraud proof) with the model; print and sign the verdict."""
    from agoranet.cli.records import fetch_receipt, fetch_record, load_record_file
    from agoranet.node.judge import ReplayVerifier
    from agoranet.verify.records import WindowProofBody

    if (receipt_cid is None) == (fraud_proof is None):
        raise fail("give a RECEIPT_CID (with --node URL) or --fraud-proof CID|FILE")
    try:
        identity = Identity.load_or_create(home_dir(home) / "identity.key")
        verifier = ReplayVerifier(identity, models=model or ["agora-tiny"],
                                  tolerance_files=[tolerances] if tolerances else [])
        if fraud_proof is not None:
            if Path(fraud_proof).is_file():
                proof = load_record_file(Path(fraud_proof))
            elif node:
                proof = fetch_record(node, fraud_proof)
            else:
                raise fail(f"{fraud_proof} is not a file; pass --node URL to fetch it by CID")
            window = proof.type == WindowProofBody.record_type  # a failed per-provider window: replay all its receipts
            recheck = verifier.recheck_window(proof) if window else verifier.recheck(proof)
            if recheck.holds:
                claim = (f"window proof holds[/]: provider {recheck.provider}'s receipts flip more than honest drift of "
                         "the class" if window else f"fraud proof holds[/]: provider {recheck.provider} broke the rule")
                console.print(f"[bold green]{claim} ({recheck.detail})")
                return
            claim = ("FALSE window proof[/]:" if window else
                     "FALSE fraud proof[/]: the receipt passes replay;")
            console.print(f"[bold red]{claim} verifier {recheck.issuer} accused an honest provider ({recheck.detail})")
            raise typer.Exit(JUDGED_BAD)
        if not node:
            raise fail("pass --node URL: the node that served (or stores) the receipt")
        receipt, request_bytes = fetch_receipt(node, receipt_cid)
        judgement = verifier.judge(receipt, request_bytes)
    except AgoraError as exc:
        raise fail(exc) from None
    v = judgement.verdict
    if out is not None:
        doc = {"verdict": v.to_json(), "verdict_cid": str(v.cid)}
        if judgement.proof is not None:
            doc |= {"fraud_proof": judgement.proof.to_json(), "fraud_proof_cid": str(judgement.proof.cid)}
        out.write_text(json.dumps(doc, indent=1))
    body = v.body
    if body.ok:
        console.print(f"[bold green]valid[/]: receipt {body.receipt} from {body.provider}: {body.checked_positions} "
                      f"tokens replayed within {body.precision} tolerances (verdict {v.cid})")
        return
    f = body.failure
    if f.kind == "violation":  # unjudgeable for a reason the provider controls: counts like a fraud
        console.print(f"[bold red]VIOLATION[/]: receipt {body.receipt} from {body.provider} cannot be judged "
                      f"({f.detail}); verdict {v.cid}" + (f" written to {out}" if out else ""))
        raise typer.Exit(JUDGED_BAD)
    console.print(f"[bold red]FRAUD[/]: receipt {body.receipt} from {body.provider} fails at position {f.position} "
                  f"({f.kind}: {f.detail})")
    console.print(f"verdict {v.cid}; fraud proof {judgement.proof.cid}" + (f" written to {out}" if out else ""))
    raise typer.Exit(JUDGED_BAD)


@verify_app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8600,
    source: SourceOpt = None,
    audit_fraction: AuditFractionOpt = 0.1,
    poll_interval: PollIntervalOpt = 5.0,
    model: ModelsOpt = None,
    tolerances: TolerancesOpt = None,
    threads: ThreadsOpt = 1,
    home: HomeOpt = None,
    storage_peer: StoragePeerOpt = None,
) -> None:
    """Run a verifier node: audit receipts, sign verdicts and fraud proofs, serve reputation."""
    from agoranet.cli.node_cmd import serve_node, verifier_options

    opts = verifier_options(source=source, audit_fraction=audit_fraction, poll_interval=poll_interval, models=model,
                            tolerances=tolerances, threads=threads, storage_peers=storage_peer)
    serve_node(["verifier"], home=home, host=host, port=port, verifier=opts)


def _kept(previous: AnyTolerances | None, calibrated: list[str]) -> str:
    """What a merged record says of the classes it kept from the previous one (their own method)."""
    kept = sorted(c.precision for c in previous.classes if c.precision not in calibrated) if previous else []
    if not kept or previous is None:
        return ""
    return (f". Classes {', '.join(kept)} kept unchanged from the previous record (hardware {previous.hardware}): "
            f"{previous.method}")


@verify_app.command()
def calibrate(
    precision: Annotated[Optional[list[str]], typer.Option(
        help="precision class(es) to calibrate: fp32, bf16, fp16 (a GGUF's class is its quantization)")] = None,
    model: Annotated[str, typer.Option(help="bundled model name, local model directory, or .gguf file")] = "agora-tiny",
    engine: Annotated[str, typer.Option(help="the providers' engine: transformers, or llamacpp (replayed with the "
                                             "same GGUF)")] = "transformers",
    sequences: Annotated[int, typer.Option(help="honest calibration sequences per class")] = 400,
    confirm: Annotated[int, typer.Option(help="independent honest sequences that must all pass")] = 400,
    headroom: Annotated[float, typer.Option(help="tolerance = headroom x worst honest deviation")] = 1.5,
    floor: Annotated[float, typer.Option(help="no tolerance below this (logit units). The default, 1e-3, assumes "
                                              "nothing about the hardware; lower it only from a drift measurement "
                                              "of this model on the providers' and verifiers' hardware (threads, "
                                              "batch sizes: benchmarks/fp32_drift.py)")] = MIN_TOLERANCE,
    max_tokens: Annotated[int, typer.Option(help="longest honest output calibrated (receipts with longer outputs "
                                              "are refused)")] = 256,
    buckets: Annotated[str, typer.Option(help="prompt lengths (tokens, comma-separated) at which a new length "
                                              "bucket with its own limits starts; none: one bucket)")] = "128,512",
    seed: int = 1,
    threads: ThreadsOpt = 1,
    out: Annotated[Optional[Path], typer.Option(help="tolerances file to write (merged with an existing one: the "
                                                     "classes calibrated now replace theirs, the others are kept "
                                                     "as they are, and the whole is re-signed)")] = None,
    home: HomeOpt = None,
) -> None:
    """Measure honest deviations at each precision against the fp32 reference and sign tolerances."""
    import torch

    from agoranet.engine.models import model_cid, resolve_model
    from agoranet.engine.transformers_engine import load_causal_lm
    from agoranet.node.calibration import calibrate_precision
    from agoranet.node.provider import hardware_summary
    from agoranet.verify.rule import RULE
    from agoranet.verify.tolerances import REFERENCE_PRECISION, TARGET_FRR, load_tolerances, tolerances_record

    if headroom < 1.5:
        raise fail(f"--headroom {headroom} is below the required 1.5")
    if not 0 < floor <= 1:
        raise fail(f"--floor {floor}: give a tolerance floor in logit units above 0 and at most 1 (default "
                   f"{MIN_TOLERANCE:g})")
    try:
        edges = () if buckets.strip() in ("", "none") else tuple(sorted({int(e) for e in buckets.split(",")}))
    except ValueError:
        raise fail(f"--buckets {buckets!r}: give prompt lengths in tokens, comma-separated (e.g. 128,512)") from None
    if any(e < 1 for e in edges):
        raise fail(f"--buckets {buckets!r}: bucket edges must be positive token counts")
    try:
        identity = Identity.load_or_create(home_dir(home) / "identity.key")
        model_dir, _ = resolve_model(model)
        cid = model_cid(model_dir)
        torch.set_num_threads(threads)
        provider_engine = None
        if engine == "llamacpp":
            from agoranet.engine.llamacpp_engine import GGUFModel, LlamaCppEngine

            if not model_dir.is_file():
                raise fail(f"--engine llamacpp calibrates a GGUF file; {model_dir} is not one")
            reference = GGUFModel(model_dir, threads=threads, all_logits=True)
            provider_engine = LlamaCppEngine(model_dir, model_cid=cid, model_name=model_dir.stem, threads=threads)
            precision = [provider_engine.precision]
        elif engine == "transformers":
            reference = load_causal_lm(model_dir, REFERENCE_PRECISION)
            if not precision:
                raise fail("pass --precision CLASS (fp32, bf16 or fp16) to calibrate")
        else:
            raise fail(f"--engine {engine!r}: calibrate transformers or llamacpp")
        path = out or home_dir(home) / "tolerances" / f"{cid}.json"
        previous = load_tolerances(path).body if path.exists() else None
        classes = {c.precision: c for c in (previous.classes if previous else [])}
        for p in precision:
            console.print(f"calibrating [bold]{p}[/] on {sequences} honest sequences, confirming on {confirm} …")
            c = asyncio.run(calibrate_precision(model_dir, cid, p, reference, sequences=sequences, confirm=confirm,
                                                headroom=headroom, floor=floor, max_tokens=max_tokens, seed=seed,
                                                threads=threads, engine=provider_engine, edges=edges))
            classes[p] = c
            console.print(f"  {p}: τ_tok {c.tok:.4g}  τ_lp {c.lp:.4g}  τ_top {c.top:.4g}  τ_mass {c.mass:.4g}   "
                          f"(worst honest: {c.measured_tok:.3g} / {c.measured_lp:.3g} / {c.measured_top:.3g} / "
                          f"{c.measured_mass:.3g}; confirmation set {c.confirmed_tok:.3g} / {c.confirmed_lp:.3g} / "
                          f"{c.confirmed_top:.3g} / {c.confirmed_mass:.3g}, all passed)")
            console.print(f"  {p} per sequence: ≤ {c.seq_flips} flips, flip margins ≤ {c.seq_flip_margin:.4g}, mean "
                          f"|Δlogprob| ≤ {c.seq_lp_mean:.3g} (worst honest {c.measured_flips} / "
                          f"{c.measured_flip_margin:.3g} / {c.measured_lp_mean:.3g}); covers prompts ≤ "
                          f"{c.max_prompt_tokens} and outputs ≤ {c.max_output_tokens} tokens")
            lo = 0
            for b in c.buckets:
                console.print(f"    prompts {lo}-{b.max_prompt_tokens} ({b.sequences}+{b.confirm_sequences} sequences): "
                              f"τ_tok {b.tok:.4g}  τ_lp {b.lp:.4g}  τ_top {b.top:.4g}  τ_mass {b.mass:.4g}; flips ≤ "
                              f"{b.flips_base:.3g} + {b.flips_per_token:.3g}·n, flip margins ≤ {b.margin_base:.3g} + "
                              f"{b.margin_per_token:.3g}·n, mean |Δlogprob| ≤ {b.lp_mean:.3g}")
                lo = b.max_prompt_tokens + 1
        record = tolerances_record(
            identity, cid, list(classes.values()), hardware=hardware_summary(),
            method=f"agora verify calibrate ({RULE}): {sequences} honest runs per class, replayed "
                   + ("by llama.cpp with the same GGUF, in one batched pass (generated one at a time through llama.cpp; "
                      if engine == "llamacpp" else f"at {REFERENCE_PRECISION} (batch 1 and 16 with left padding; ")
                   + f"chat+completion, T 0-1.3, top-p 1; prompts spread evenly over the length buckets (new bucket at "
                   f"{', '.join(map(str, edges))} tokens, the last up to the context), in each half 64 new tokens and "
                   f"half {max_tokens} (prompts up to the context less {max_tokens}); {confirm} confirmation runs "
                   f"(other prompts and seeds, also top-p 0.8-0.95, batch 8) all pass, then every limit is widened to "
                   f"{headroom}× their worst where that is higher; per bucket and over the whole "
                   f"range: τ = {headroom}× worst, never below {floor:g} (τ_mass: log-odds drift of every listed "
                   f"best-token set's mass); "
                   f"per-sequence limits for FRR {TARGET_FRR:g}/sequence by an exponential fit to the top tenth of the "
                   f"honest sequences, never below {headroom}× the worst: flips and summed flip margin as base + "
                   f"rate·n (rate: the bucket's mean per output token; base: the fit to each sequence's excess over "
                   f"it), mean |Δlogprob| as one limit" + _kept(previous, precision or []),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record.to_json(), indent=1))
    except AgoraError as exc:
        raise fail(exc) from None
    console.print(f"signed tolerances {record.cid} written to {path}")
