"""Teacher-forced replay: check a receipt with ONE forward pass over prompt + prefix + claimed tokens.

Several receipts of one model are replayed together (`check_receipts`): right-padded rows in one pass,
and a prompt they share computed once; each is judged exactly as if alone, on its own logits.

At every output position the replay recomputes the rule's scores (`agoranet.verify.rule`) and
accepts the claimed token when its score is within τ_tok of the best score — never an exact
argmax, because honest hardware and precision differences move logits a little. Margins are in
logit units (sampling scores are multiplied back by T), so one τ_tok serves every temperature.
The top-p nucleus is judged by mass, within bounds that cannot open it to the whole vocabulary: a
claimed token must be one the provider could have had inside — the replayed mass of the tokens
surely better than it (ahead by more than τ_tok, or above it in the provider's own top-k list) must
stay below top_p with its log-odds raised by τ_mass/T (so never reaching 1); the best score is taken
only among tokens surely inside (the same, lowered).
The claimed logprob and top-k logprobs must be within τ_lp and τ_top of the replayed ones.
The first failing position and what the replay saw there are returned as evidence.

Per-position tolerances alone let a provider choose freely among near ties (τ_tok at bf16 is ~0.5
logit), so each sequence is also judged as a whole (`_sequence_failure`): how many positions hold a token
that is not the rule's choice ("flips", margin > FLIP_EPS), the sum of their margins, and the mean
|Δlogprob|. Honest drift flips only rare exact near ties by a little; a provider choosing within τ_tok
or generating with other weights flips many. The limits are calibrated per (model, precision class).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from agoranet.core.cid import DAG_CBOR, cid_of
from agoranet.core.errors import RecordError
from agoranet.core.records import ReceiptBody, Record, verify_record
from agoranet.verify.records import ClassTolerance, FailureEvidence
from agoranet.wire.canonical import CanonicalRequest
from agoranet.verify.rule import claim_margins, nucleus_edge, position_keys, scale_logits
from agoranet.verify.tolerances import MIN_TOLERANCE, limits_for

__all__ = ["Tolerances", "ReplayResult", "ReplayJob", "check_receipt", "check_receipts", "check_request_binding",
           "request_mismatch", "MIN_TOP_LOGPROBS", "STRICT", "MEASURE"]

MIN_TOP_LOGPROBS = 5  # receipts carry at least this many alternatives per position
FLIP_EPS = 1e-3  # a margin above this is a flip (below it, fp32 summation order alone could decide)
REPLAY_TOKEN_BUDGET = 8192  # rows × padded width of one batched replay pass (bounds its activations)


class ToleranceLike(Protocol):
    tok: float
    lp: float
    top: float
    mass: float
    seq_flips: int  # most flips one sequence may hold (−1: unlimited)
    seq_flip_margin: float  # most summed flip margin per sequence (logit units)
    seq_lp_mean: float  # most mean |claimed − replayed logprob| over a sequence's positions


@dataclass(frozen=True)
class Tolerances:
    tok: float
    lp: float
    top: float
    mass: float = MIN_TOLERANCE  # log-odds drift of a best-token set's mass, logit units (÷T when sampling)
    seq_flips: int = -1
    seq_flip_margin: float = math.inf
    seq_lp_mean: float = math.inf


STRICT = Tolerances(0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0)
MEASURE = Tolerances(math.inf, math.inf, math.inf, math.inf)  # accept everything, just measure deviations


@dataclass
class ReplayResult:
    ok: bool
    checked_positions: int
    failure: FailureEvidence | None = None
    # worst deviations seen over all replayed positions (what calibration measures)
    max_tok: float = 0.0
    max_lp: float = 0.0
    max_top: float = 0.0
    # worst honest drift of a logit *difference* (claimed − replayed logprob, max − min over the listed
    # tokens of one position): what a near tie can flip by, measured at every position, not just at flips
    max_spread: float = 0.0
    # worst honest drift of the log-odds of the T = 1 mass of the listed best tokens (top 1, top 2, …):
    # how far a nucleus edge can move, measured at every position
    max_mass: float = 0.0
    flips: int = 0  # positions where the claimed token is not the replay's best by > FLIP_EPS
    flip_margin: float = 0.0  # sum of the margins at those positions (logit units)
    lp_mean: float = 0.0  # mean |claimed − replayed logprob| over the positions
    flip_margins: list[float] = field(default_factory=list)  # each flip's margin, in position order
    # positions accepted within tolerance although the claimed token is outside the replay's own top-p nucleus
    # (honest bf16 on agora-tiny: 0-2 per 64 tokens at T 0.7; measured, not judged)
    nucleus_edges: int = 0
    # the limits this receipt was judged by: for a class record, those of its prompt-length bucket with the
    # per-sequence limits at its output length (`verify.tolerances.limits_for`)
    tolerances: ToleranceLike | None = None


def _fail(kind: str, detail: str, position: int = -1, **evidence: Any) -> ReplayResult:
    return ReplayResult(ok=False, checked_positions=0,
                        failure=FailureEvidence(kind=kind, position=position, detail=detail, **evidence))


def check_request_binding(body: ReceiptBody, request_bytes: bytes) -> str | None:
    """Why the canonical request does not match the receipt, or None when it does."""
    if str(cid_of(request_bytes, DAG_CBOR)) != body.request:
        return f"the request's CID is {cid_of(request_bytes, DAG_CBOR)}, the receipt names {body.request}"
    try:
        req = CanonicalRequest.decode(request_bytes)
    except RecordError as exc:
        return f"the canonical request does not decode: {exc}"
    s, claimed = req.sampling, body.sampling
    mismatches = [
        name for name, a, b in [
            ("model", req.model, body.model), ("request_id", req.request_id, body.request_id),
            ("prefix_tokens", req.prefix_tokens, body.prefix_tokens),
            ("temperature", s.temperature, claimed.temperature), ("top_p", s.top_p, claimed.top_p),
            ("seed", s.seed, claimed.seed), ("max_tokens", s.max_tokens, claimed.max_tokens),
            ("stop", s.stop, claimed.stop),
        ] if a != b
    ]
    return f"receipt and request disagree on {', '.join(mismatches)}" if mismatches else None


def request_mismatch(why: str) -> ReplayResult:
    """The judgement on a receipt whose canonical request (with the right CID) is not what it claims."""
    return _fail("request", why)


@dataclass
class ReplayJob:
    """One receipt to replay and what it is checked against (the canonical request bytes when known)."""

    prompt_ids: Sequence[int]
    receipt: ReceiptBody | Record
    tolerances: ToleranceLike
    request_bytes: bytes | None = None


def check_receipt(
    model: torch.nn.Module, prompt_ids: Sequence[int], receipt: ReceiptBody | Record, tolerances: ToleranceLike, *,
    model_cid: str | None = None, request_bytes: bytes | None = None,
    decode: Callable[[list[int]], str] | None = None, eos_token: int | Collection[int] | None = None,
) -> ReplayResult:
    """Replay a receipt against `model` (loaded at the reference precision) and judge it.

    `receipt` may be a signed Record (its signature is then checked) or a bare body. The model
    CID, canonical request bytes (and the prompt ids they bind), `decode` (token ids -> text) and the
    end-of-sequence id(s) `eos_token` are checked when given.
    """
    job = ReplayJob(prompt_ids, receipt, tolerances, request_bytes)
    return check_receipts(model, [job], model_cid=model_cid, decode=decode, eos_token=eos_token)[0]


def check_receipts(
    model: torch.nn.Module, jobs: Sequence[ReplayJob], *, model_cid: str | None = None,
    decode: Callable[[list[int]], str] | None = None, eos_token: int | Collection[int] | None = None,
    token_budget: int = REPLAY_TOKEN_BUDGET,
) -> list[ReplayResult]:
    """Judge several receipts of one model as `check_receipt` judges each, replaying them together:
    right-padded rows in as few forward passes as `token_budget` allows, and a prompt shared by several
    receipts (with whatever their outputs share after it) computed once and reused through its KV cache."""
    eos = frozenset([eos_token] if isinstance(eos_token, int) else eos_token or ())
    results: list[ReplayResult | None] = [None] * len(jobs)
    todo: list[tuple[int, ReceiptBody, list[int]]] = []
    for i, job in enumerate(jobs):
        admitted = _admit(model, job, model_cid, eos)
        if isinstance(admitted, ReplayResult):
            results[i] = admitted
        elif not admitted.output_tokens:
            results[i] = ReplayResult(ok=True, checked_positions=0)
        else:
            todo.append((i, admitted, list(job.prompt_ids) + list(admitted.prefix_tokens)))
    sequences = [(context, list(body.output_tokens)) for _, body, context in todo]
    for (i, body, context), logits in zip(todo, _replay_logits(model, sequences, token_budget)):
        tol = _applied(jobs[i].tolerances, len(context), len(body.output_tokens))
        results[i] = _judge(logits, body, tol)
        results[i].tolerances = tol  # type: ignore[union-attr]
    for i, result in enumerate(results):
        body = _body(jobs[i].receipt)
        if result.ok and decode is not None and (why := _text(body, decode, eos)) is not None:
            result.ok, result.failure = False, FailureEvidence(kind="text", position=-1, detail=why)
    return results  # type: ignore[return-value]


def _applied(tol: ToleranceLike, prompt_tokens: int, output_tokens: int) -> ToleranceLike:
    """A class record's limits for this receipt: its bucket by the prompt + prefix length replayed here (the
    request's own prompt as this verifier renders it, never a count the provider states)."""
    return limits_for(tol, prompt_tokens, output_tokens) if isinstance(tol, ClassTolerance) else tol


def _body(receipt: ReceiptBody | Record) -> ReceiptBody:
    return receipt.body if isinstance(receipt, Record) else receipt


def _admit(
    model: torch.nn.Module, job: ReplayJob, model_cid: str | None, eos: frozenset[int]
) -> ReceiptBody | ReplayResult:
    """The receipt's body when it may be replayed, else the failure that stops it before any forward pass."""
    if isinstance(job.receipt, Record):
        try:
            verify_record(job.receipt.encode(), ReceiptBody)
        except RecordError as exc:
            return _fail("signature", str(exc))
    body = _body(job.receipt)
    if model_cid is not None and body.model != model_cid:
        return _fail("model", f"receipt names model {body.model}, the replayed model is {model_cid}")
    if job.request_bytes is not None and (why := check_request_binding(body, job.request_bytes)):
        return _fail("request", why)
    if job.request_bytes is not None and (
        why := prompt_binding(CanonicalRequest.decode(job.request_bytes), job.prompt_ids)
    ):
        return _fail("prompt", why)
    if (why := _structure(body, job.prompt_ids, eos, _vocab_size(model))) is not None:
        return _fail("structure", why[1], why[0])
    return body


@torch.inference_mode()
def _replay_logits(
    model: torch.nn.Module, sequences: list[tuple[list[int], list[int]]], budget: int
) -> list[torch.Tensor]:
    """For each (context, output): fp32 logits of the rows that predict output[0..n-1], teacher-forced."""
    rows = [context + output[:-1] for context, output in sequences]
    full: list[torch.Tensor | None] = [None] * len(rows)  # logits for every position of each row
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(sequences):
        by_context.setdefault(tuple(context), []).append(i)
    singles = []
    for members in by_context.values():
        if len(members) < 2:
            singles += members
            continue
        # shared prompt: compute it (and any common start of the outputs) once, then the rest per receipt
        shared = min(_common_prefix([rows[i] for i in members]), min(len(rows[i]) for i in members) - 1)
        if shared < 1:
            singles += members
            continue
        out = model(input_ids=torch.tensor([rows[members[0]][:shared]]), use_cache=True)
        head, cache = out.logits[0].float(), out[_cache_key(model)]
        parts = _packs(sorted(members, key=lambda i: len(rows[i])), lambda i: len(rows[i]) - shared, budget)
        for part in parts:
            part_cache = copy.deepcopy(cache) if len(parts) > 1 else cache
            part_cache.batch_repeat_interleave(len(part))
            tails = _padded_logits(model, [rows[i][shared:] for i in part], part_cache)
            for j, i in enumerate(part):
                full[i] = torch.cat([head, tails[j, : len(rows[i]) - shared]])
    for part in _packs(sorted(singles, key=lambda i: len(rows[i])), lambda i: len(rows[i]), budget):
        logits = _padded_logits(model, [rows[i] for i in part], None)
        for j, i in enumerate(part):
            full[i] = logits[j, : len(rows[i])]
    return [f[len(context) - 1:] for f, (context, _) in zip(full, sequences)]


def _padded_logits(model: torch.nn.Module, rows: list[list[int]], cache: Any) -> torch.Tensor:
    """One forward pass over right-padded rows: causal attention keeps the padding out of every real position."""
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    extra = {_cache_key(model): cache, "use_cache": True} if cache is not None else {}
    return model(input_ids=ids, **extra).logits.float()


def _packs(items: list[int], cost: Callable[[int], int], budget: int) -> list[list[int]]:
    """Split `items` (in order) into runs whose rows × longest row stays within `budget` tokens; rows sorted
    by length start a new run when padding to the longest would waste more than a fifth of the pass."""
    packs: list[list[int]] = []
    for i in items:
        if packs:
            longest = max(cost(j) for j in [*packs[-1], i])
            shortest = min(cost(j) for j in [*packs[-1], i])
            if (len(packs[-1]) + 1) * longest <= budget and shortest * 5 >= longest * 4:
                packs[-1].append(i)
                continue
        packs.append([i])
    return packs


def _common_prefix(rows: list[list[int]]) -> int:
    n = min(map(len, rows))
    first = rows[0]
    for k in range(n):
        if any(row[k] != first[k] for row in rows[1:]):
            return k
    return n


def _cache_key(model: torch.nn.Module) -> str:
    """transformers renamed past_key_values to cache (5.x); speak whichever this version knows."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prompt_binding(request: CanonicalRequest, prompt_ids: Sequence[int]) -> str | None:
    """Why the prompt ids a request binds differ from the ones the verifier renders from its text, or None."""
    bound = request.prompt_tokens
    # text-only requests (upstream engines) bind none: the verifier's own rendering is what it replays
    if not bound or bound == list(prompt_ids):
        return None
    first = next((i for i, (a, b) in enumerate(zip(bound, prompt_ids)) if a != b), min(len(bound), len(prompt_ids)))
    return (f"the request binds {len(bound)} prompt tokens that differ from the {len(prompt_ids)} the model's "
            f"tokenizer and chat template render, from token {first} on")


def _vocab_size(model: torch.nn.Module) -> int:
    return int(model.config.vocab_size)


def _structure(body: ReceiptBody, prompt_ids: Sequence[int], eos: frozenset[int], vocab: int) -> tuple[int, str] | None:
    n = len(body.output_tokens)
    if body.prompt_tokens != len(prompt_ids):
        return -1, f"receipt counts {body.prompt_tokens} prompt tokens, the request renders to {len(prompt_ids)}"
    if len(body.logprobs) != n or len(body.top_logprobs) != n:
        return -1, f"{n} tokens but {len(body.logprobs)} logprobs and {len(body.top_logprobs)} top-logprob lists"
    if n > body.sampling.max_tokens:
        return n - 1, f"{n} tokens exceed max_tokens {body.sampling.max_tokens}"
    for i, token in enumerate(body.output_tokens):
        if token >= vocab:
            return i, f"token {token} is outside the vocabulary of {vocab}"
        if token in eos and i != n - 1:
            return i, "tokens continue after end-of-sequence"
    for i, top in enumerate(body.top_logprobs):
        tokens = [t.token for t in top]
        if len(tokens) < min(MIN_TOP_LOGPROBS, vocab) or len(set(tokens)) != len(tokens) or max(tokens) >= vocab:
            return i, f"top_logprobs must list at least {MIN_TOP_LOGPROBS} distinct in-vocabulary tokens"
    if body.finish_reason == "length" and n != body.sampling.max_tokens:
        return -1, f"finish_reason 'length' after {n} of max_tokens {body.sampling.max_tokens} tokens"
    if body.finish_reason == "stop" and eos and n and body.output_tokens[-1] not in eos \
            and not body.sampling.stop:
        return n - 1, "finish_reason 'stop' without end-of-sequence or a stop string"
    if body.finish_reason not in ("stop", "length", "cancelled"):  # cancelled: a stream cut by its client
        return -1, f"finish_reason {body.finish_reason!r} is not one the rule produces"
    return None


def _text(body: ReceiptBody, decode: Callable[[list[int]], str], eos: frozenset[int]) -> str | None:
    """output_text must be exactly the decoded tokens, cut at the first stop string."""
    tokens = list(body.output_tokens)
    if tokens and tokens[-1] in eos:
        tokens.pop()
    full = decode(tokens)
    stops = [s for s in body.sampling.stop if s]
    cuts = [full.find(s) for s in stops if s in full]
    expected = full[: min(cuts)] if cuts else full
    if stops and cuts and tokens and any(s in decode(tokens[:-1]) for s in stops):
        return "generation went on after a stop string"
    if stops and body.finish_reason == "stop" and not cuts and not (body.output_tokens[-1:] and body.output_tokens[-1] in eos):
        return "finish_reason 'stop' but no stop string in the output"
    if body.finish_reason == "cancelled" and expected.startswith(body.output_text):
        return None  # a cut stream's text may stop inside a character, or before text held back for a stop
    if body.output_text != expected:
        return f"output_text differs from the decoded tokens ({len(body.output_text)} vs {len(expected)} chars)"
    return None


def _judge(logits: torch.Tensor, body: ReceiptBody, tol: ToleranceLike) -> ReplayResult:
    """Judge every output position from the replayed logits (row i predicts output token i)."""
    out = body.output_tokens
    n = len(out)
    claimed = torch.tensor(out)
    rows = torch.arange(n)

    s = body.sampling
    temperature = float(s.temperature)
    in_loose = edge_claims = torch.ones(n, dtype=torch.bool)
    if temperature <= 0.0:
        best_scores, best_tokens = logits.max(dim=-1)
        margins = (best_scores - logits[rows, claimed]).clamp(min=0.0)
    else:
        scaled = scale_logits(logits, temperature)
        surely, possibly, high = _nucleus_bounds(scaled, s.top_p, tol, temperature)
        in_loose = _better_mass(scaled, claimed, body, tol.tok / temperature if math.isfinite(tol.tok) else 0.0) < high
        edge_claims = in_loose & (scaled[rows, claimed] < nucleus_edge(scaled, s.top_p))
        keys = position_keys(s.seed, body.request_id, [len(body.prefix_tokens) + i for i in range(n)])
        margins, best_tokens = claim_margins(scaled, claimed, keys, surely, possibly)
        margins = margins * temperature

    lps = torch.log_softmax(logits, dim=-1)
    replayed_lp = lps[rows, claimed]
    lp_dev = (torch.tensor(body.logprobs, dtype=torch.float32) - replayed_lp).abs()

    # Top-k lists, padded to the longest with copies of their first entry (which changes no max/min).
    k = max(len(top) for top in body.top_logprobs)
    listed = torch.tensor([[e.token for e in top] + [top[0].token] * (k - len(top)) for top in body.top_logprobs])
    values = torch.tensor([[e.logprob for e in top] + [top[0].logprob] * (k - len(top))
                           for top in body.top_logprobs], dtype=torch.float32)
    kth_rank = torch.tensor([len(top) - 1 for top in body.top_logprobs])
    kth = lps.topk(k, dim=-1).values[rows, kth_rank]  # fast path: the k best suffice (a full sort cost O(V log V))
    replayed_top = lps.gather(1, listed)
    drift = values - replayed_top
    # each listed value must match, and each listed token must really be among the top k
    top_dev = torch.maximum(drift.abs().amax(dim=1), (kth[:, None] - replayed_top).amax(dim=1).clamp(min=0.0))
    drift = torch.cat([drift, (torch.tensor(body.logprobs, dtype=torch.float32) - replayed_lp)[:, None]], dim=1)
    spread = drift.amax(dim=1) - drift.amin(dim=1)
    mass_drift = _mass_drift(body, replayed_top)

    bad = (margins > tol.tok) | ~in_loose | (lp_dev > tol.lp) | (top_dev > tol.top)
    flipped = (margins > FLIP_EPS) & in_loose
    result = ReplayResult(
        ok=not bool(bad.any()), checked_positions=n, max_tok=float(margins.masked_fill(~in_loose, 0.0).max()),
        max_lp=float(lp_dev.max()), max_top=float(top_dev.max()), max_spread=float(spread.max()),
        max_mass=float(mass_drift.max()), flips=int(flipped.sum()), flip_margin=float(margins[flipped].sum()),
        lp_mean=float(lp_dev.mean()), flip_margins=margins[flipped].tolist(),
        nucleus_edges=int(edge_claims.sum()) if temperature > 0.0 else 0,
    )
    if result.ok:
        result.failure = _sequence_failure(result, margins, flipped, body, best_tokens, tol)
        result.ok = result.failure is None
        return result
    i = int(bad.nonzero()[0])
    common = dict(position=i, claimed_token=int(out[i]), best_token=int(best_tokens[i]), margin=float(margins[i]),
                  claimed_logprob=float(body.logprobs[i]), replayed_logprob=float(replayed_lp[i]))
    if not in_loose[i]:
        ev = FailureEvidence(kind="nucleus", detail=f"token {out[i]} is outside the top-p {s.top_p} nucleus: tokens "
                             f"better by more than τ_tok hold too much of the mass (τ_mass {tol.mass:.3g})",
                             tolerance=float(tol.mass), **common)
    elif margins[i] > tol.tok:
        ev = FailureEvidence(kind="token", detail=f"token {out[i]} scores {float(margins[i]):.4g} below the best "
                             f"token {int(best_tokens[i])} (tolerance {tol.tok:.3g})", tolerance=float(tol.tok), **common)
    elif lp_dev[i] > tol.lp:
        ev = FailureEvidence(kind="logprob", detail=f"claimed logprob {body.logprobs[i]:.5g}, replayed "
                             f"{float(replayed_lp[i]):.5g} (tolerance {tol.lp:.3g})", tolerance=float(tol.lp), **common)
    else:
        ev = FailureEvidence(kind="top_logprobs", detail=f"top logprobs deviate by {float(top_dev[i]):.4g} "
                             f"(tolerance {tol.top:.3g})", tolerance=float(tol.top), **common)
    result.failure = ev
    return result


def _nucleus_bounds(scaled: torch.Tensor, top_p: float, tol: ToleranceLike,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per position, scaled-logit floors of the tokens surely inside the provider's nucleus and of those
    possibly inside, given honest drift of logit differences (τ_tok) and of a best-token set's log-odds (τ_mass);
    and the most replayed mass a set of tokens better than an inside token can hold (top_p, log-odds + τ_mass/T).

    Possibly inside: the provider's strictly better tokens held < top_p, and they include every token the replay
    sees ahead by more than τ_tok; that set's replayed log-odds can only be τ_mass/T higher. Surely inside: the
    mirror image, plus the replay's best token when it leads by more than τ_tok (the provider's best too)."""
    if top_p >= 1.0:
        everything = torch.full(scaled.shape[:1], float("-inf"))
        return everything, everything, math.inf
    band = tol.tok / temperature if math.isfinite(tol.tok) else 0.0
    odds = min(tol.mass / temperature, 50.0) if math.isfinite(tol.mass) else 0.0
    logit = math.log(top_p) - math.log1p(-top_p)
    low, high = (1.0 / (1.0 + math.exp(-(logit + d))) for d in (-odds, odds))
    surely = nucleus_edge(scaled, low) + band
    top2 = scaled.topk(min(2, scaled.shape[-1]), dim=-1).values
    leads = top2[:, 0] - top2[:, -1] > band
    surely = torch.where(leads, torch.minimum(surely, top2[:, 0]), surely)
    return surely, nucleus_edge(scaled, high) - band, high


def _better_mass(scaled: torch.Tensor, claimed: torch.Tensor, body: ReceiptBody, band: float) -> torch.Tensor:
    """Per position, the replayed mass (softmax of `scaled`) of tokens the provider itself ranked above the claimed
    one: those the replay sees ahead by more than `band` (τ_tok/T), and those its own top-k list puts above the
    claimed token's logprob (for an honest provider that list is exact; a dishonest one can bend it only by τ_top)."""
    rows = torch.arange(len(claimed))
    better = scaled > (scaled[rows, claimed] + band)[:, None]
    k = max(len(top) for top in body.top_logprobs)
    listed = torch.tensor([[e.token for e in top] + [top[0].token] * (k - len(top)) for top in body.top_logprobs])
    values = torch.tensor([[e.logprob for e in top] + [top[0].logprob] * (k - len(top)) for top in body.top_logprobs])
    above = values > torch.tensor(body.logprobs)[:, None]
    better.scatter_(1, listed, better.gather(1, listed) | above)
    return (torch.softmax(scaled, dim=-1) * better).sum(dim=-1)


def _mass_drift(body: ReceiptBody, replayed_top: torch.Tensor) -> torch.Tensor:
    """Per position, the worst |claimed − replayed| log-odds of the T = 1 mass of the listed top 1, 2, … tokens
    (ordered as claimed), over sets holding between 0.1% and 99.9% of the mass (outside that, float32
    logprobs near 0 cannot resolve it)."""
    lengths = torch.tensor([len(top) for top in body.top_logprobs])
    k = replayed_top.shape[1]
    valid = torch.arange(k)[None, :] < lengths[:, None]
    claimed = torch.tensor([[e.logprob for e in top] + [-math.inf] * (k - len(top)) for top in body.top_logprobs],
                           dtype=torch.float64)
    order = claimed.argsort(dim=1, descending=True)
    mine = claimed.gather(1, order).exp().cumsum(dim=1)
    theirs = replayed_top.double().masked_fill(~valid, -math.inf).gather(1, order).exp().cumsum(dim=1)
    usable = valid.gather(1, order) & (mine > 1e-3) & (mine < 1 - 1e-3) & (theirs > 1e-3) & (theirs < 1 - 1e-3)
    log_odds = lambda m: m.log() - (-m).log1p()  # noqa: E731
    drift = (log_odds(mine.clamp(1e-3, 1 - 1e-3)) - log_odds(theirs.clamp(1e-3, 1 - 1e-3))).abs()
    return drift.masked_fill(~usable, 0.0).amax(dim=1).float()


def _sequence_failure(result: ReplayResult, margins: torch.Tensor, flipped: torch.Tensor, body: ReceiptBody,
                      best_tokens: torch.Tensor, tol: ToleranceLike) -> FailureEvidence | None:
    """The per-sequence test: too many flips, too much summed flip margin, or too large a mean logprob
    deviation for honest drift of this class. Evidence names the flip positions so anyone can re-check."""
    where = flipped.nonzero()[:, 0].tolist()
    listed = ", ".join(f"{i} (margin {float(margins[i]):.3g})" for i in where[:16]) + (" …" if len(where) > 16 else "")
    if 0 <= tol.seq_flips < result.flips:
        i = where[tol.seq_flips]  # the first flip beyond the limit
        why = f"{result.flips} positions hold a token that is not the rule's choice (at most {tol.seq_flips} " \
              f"for honest drift of this class): {listed}"
        limit = float(tol.seq_flips)
    elif result.flip_margin > tol.seq_flip_margin:
        i = where[-1]
        why = f"flip margins sum to {result.flip_margin:.4g} logit (at most {tol.seq_flip_margin:.3g} for honest " \
              f"drift of this class): {listed}"
        limit = tol.seq_flip_margin
    elif result.lp_mean > tol.seq_lp_mean:
        return FailureEvidence(kind="sequence", position=-1, tolerance=float(tol.seq_lp_mean),
                               detail=f"claimed logprobs deviate by {result.lp_mean:.4g} on average over "
                                      f"{result.checked_positions} positions (at most {tol.seq_lp_mean:.3g})")
    else:
        return None
    return FailureEvidence(kind="sequence", position=i, detail=why, claimed_token=int(body.output_tokens[i]),
                           best_token=int(best_tokens[i]), margin=float(margins[i]), tolerance=limit,
                           claimed_logprob=float(body.logprobs[i]))
