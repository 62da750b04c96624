"""Teacher-forced replay: honest receipts pass, every edit fails at the position it was made."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest
import torch

from agoranet.core.records import TopLogprob
from agoranet.engine.models import model_cid, resolve_model
from agoranet.engine.tokenizer import ByteTokenizer
from agoranet.engine.transformers_engine import TransformersEngine, load_causal_lm
from agoranet.node.calibration import HonestRun, honest_requests, honest_runs
from agoranet.verify.replay import MEASURE, STRICT, ReplayJob, Tolerances, check_receipt, check_receipts
from agoranet.verify.rule import choose_token, token_scores
from agoranet.verify.records import LengthBucket
from agoranet.verify.tolerances import default_tolerances, tolerance_for

MODEL_DIR = resolve_model("agora-tiny")[0]
MODEL_CID = model_cid(MODEL_DIR)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is many times faster
    return load_causal_lm(MODEL_DIR, "fp32")


def run_engine(requests, *, precision: str = "fp32", concurrency: int = 4, engine=None) -> list[HonestRun]:
    """Generate through the real built-in engine (or `engine`), several requests sharing each batch."""
    engine = engine or TransformersEngine(MODEL_DIR, model_cid=MODEL_CID, precision=precision, threads=1)

    async def go():
        await engine.start()
        try:
            return await honest_runs(engine, requests, concurrency)
        finally:
            await engine.stop()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def honest() -> list[HonestRun]:
    """Eight honest fp32 receipts: chat and completion, greedy and sampled, some with top-p < 1."""
    return run_engine(honest_requests(8, seed=42, model_cid=MODEL_CID, max_tokens=24))


TOK = ByteTokenizer.from_dir(MODEL_DIR)
FP32 = Tolerances(1e-3, 1e-3, 1e-3)


def check(reference, run, body=None, tol=FP32, **kw):
    kw = {"model_cid": MODEL_CID, "request_bytes": run.request_bytes, "decode": TOK.decode, "eos_token": TOK.eos} | kw
    return check_receipt(reference, run.prompt, body or run.body, tol, **kw)


def edited(body, **changes):
    return body.model_copy(update=changes)


def test_honest_receipts_pass_with_the_shipped_fp32_tolerances(reference, honest):
    table = default_tolerances(MODEL_CID)
    assert table is not None, "default_tolerances.json must ship tolerances for agora-tiny"
    tol = tolerance_for(table.body, "fp32")
    kinds = {(r.request.kind, r.body.sampling.temperature > 0, r.body.sampling.top_p < 1) for r in honest}
    assert len(kinds) >= 3  # the fixture covers greedy, sampled and nucleus-sampled requests
    for run in honest:
        result = check(reference, run, tol=tol)
        assert result.ok, result.failure
        assert result.checked_positions == len(run.body.output_tokens)
        assert result.max_lp < 1e-4 and result.max_tok < 1e-4


@pytest.mark.parametrize("index", [0, 5, 17])
def test_tampered_token_fails_at_its_position(reference, honest, index):
    for run in honest:
        tokens = list(run.body.output_tokens)
        if len(tokens) <= index or TOK.eos in tokens:
            continue
        tokens[index] = (tokens[index] + 7) % 256
        body = edited(run.body, output_tokens=tokens, output_text=TOK.decode(tokens))
        result = check(reference, run, body)
        assert not result.ok
        assert (result.failure.kind, result.failure.position) in {("token", index), ("nucleus", index)}
        assert result.failure.claimed_token == tokens[index]


def test_tampered_logprob_and_top_logprobs_fail_at_their_position(reference, honest):
    run = honest[0]
    logprobs = list(run.body.logprobs)
    logprobs[3] += 0.01
    result = check(reference, run, edited(run.body, logprobs=logprobs))
    assert (result.failure.kind, result.failure.position) == ("logprob", 3)
    assert result.failure.replayed_logprob == pytest.approx(run.body.logprobs[3], abs=1e-4)

    tops = [list(t) for t in run.body.top_logprobs]
    tops[4][1] = TopLogprob(token=tops[4][1].token, logprob=tops[4][1].logprob - 0.5)
    result = check(reference, run, edited(run.body, top_logprobs=tops))
    assert (result.failure.kind, result.failure.position) == ("top_logprobs", 4)

    # listing a token that is not among the top k, with its true logprob, is caught too
    tops = [list(t) for t in run.body.top_logprobs]
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([run.prompt + run.body.output_tokens[:6]])).logits[0, -1]
    lps = torch.log_softmax(logits, -1)
    listed = {e.token for e in tops[6]}
    worst = int(torch.argmin(lps))
    assert worst not in listed
    tops[6][-1] = TopLogprob(token=worst, logprob=float(lps[worst]))
    result = check(reference, run, edited(run.body, top_logprobs=tops))
    assert (result.failure.kind, result.failure.position) == ("top_logprobs", 6)


def test_binding_and_consistency_checks(reference, honest):
    run = honest[1]
    b = run.body
    assert check(reference, run, model_cid="bafyother").failure.kind == "model"
    assert check(reference, run, edited(b, request_id="req-other")).failure.kind == "request"
    assert check(reference, run, edited(b, sampling=b.sampling.model_copy(update={"temperature": 0.3}))
                 ).failure.kind == "request"
    assert check(reference, run, edited(b, prompt_tokens=b.prompt_tokens - 5)).failure.kind == "structure"
    assert check(reference, run, edited(b, output_text=b.output_text + "!")).failure.kind == "text"
    assert check(reference, run, edited(b, finish_reason="stop")).failure.kind == "structure"
    short = edited(b, output_tokens=b.output_tokens[:10], logprobs=b.logprobs[:10], top_logprobs=b.top_logprobs[:10],
                   output_text=TOK.decode(b.output_tokens[:10]))
    assert check(reference, run, short).failure.kind == "structure"  # 'length' claimed, 10 < max_tokens


class FixedLogits(torch.nn.Module):
    """A stand-in model whose next-token logits are the same row at every position."""

    def __init__(self, row: list[float]) -> None:
        super().__init__()
        self.row = torch.tensor(row)
        self.config = SimpleNamespace(vocab_size=len(row))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.row.expand(1, input_ids.shape[1], -1).clone())


def fake_receipt(honest_body, model, token: int, *, temperature=0.0, top_p=1.0):
    lps = torch.log_softmax(model.row, -1)
    top = torch.topk(lps, 5)
    return honest_body.model_copy(update={
        "output_tokens": [token], "logprobs": [float(lps[token])], "finish_reason": "length",
        "top_logprobs": [[TopLogprob(token=int(t), logprob=float(v)) for v, t in zip(top.values, top.indices)]],
        "sampling": honest_body.sampling.model_copy(update={"temperature": temperature, "top_p": top_p,
                                                            "max_tokens": 1}),
    })


def test_near_ties_pass_within_tolerance_never_by_exact_argmax(honest):
    run = honest[0]
    model = FixedLogits([5.0, 5.0 - 4e-4, 1.0, 0.5, 0.2, 0.1] + [0.0] * 4)
    body = fake_receipt(run.body, model, token=1)  # greedy, but the runner-up by 4e-4
    assert check_receipt(model, run.prompt, body, FP32).ok
    strict = check_receipt(model, run.prompt, body, STRICT)
    assert (strict.failure.kind, strict.failure.best_token) == ("token", 0)
    assert strict.failure.margin == pytest.approx(4e-4, rel=1e-3)
    far = fake_receipt(run.body, model, token=2)
    assert check_receipt(model, run.prompt, far, FP32).failure.kind == "token"


def test_sampling_margins_are_in_logit_units_and_nucleus_edges_are_tolerated(honest):
    run = honest[0]
    b = run.body
    model = FixedLogits([3.0, 2.0, 1.9, 1.0, 0.5, 0.1, 0.0, -1.0, -2.0, -3.0])
    rule = dict(seed=b.sampling.seed, request_id=b.request_id, position=len(b.prefix_tokens))
    for temperature in (0.25, 0.8, 1.5):
        scores = token_scores(model.row, temperature=temperature, top_p=1.0, **rule)
        chosen = int(torch.argmax(scores))
        assert check_receipt(model, run.prompt, fake_receipt(b, model, chosen, temperature=temperature), FP32).ok
        other = int(torch.argsort(scores, descending=True)[1])
        fail = check_receipt(model, run.prompt, fake_receipt(b, model, other, temperature=temperature), FP32).failure
        assert fail.kind == "token"
        assert fail.margin == pytest.approx(float(scores[chosen] - scores[other]) * temperature, rel=1e-4)
    # top-p: a token outside the nucleus is rejected even if its noisy score is the highest
    probs = torch.softmax(model.row, -1)
    top_p = float(probs[0]) + 1e-6  # nucleus = {token 0, token 1}; token 2 is well outside
    edge = fake_receipt(b, model, 2, temperature=1.0, top_p=top_p)
    assert check_receipt(model, run.prompt, edge, FP32).failure.kind == "nucleus"
    # … but a token exactly on the edge (mass before it == top_p within tolerance) is accepted as inside
    at_edge = fake_receipt(b, model, 1, temperature=1.0, top_p=float(probs[0]) - 1e-5)
    result = check_receipt(model, run.prompt, at_edge, Tolerances(1e-3, 1e-3, 1e-3))
    assert result.failure is None or result.failure.kind != "nucleus"


def test_measure_mode_reports_worst_deviations_without_failing(reference, honest):
    run = honest[2]
    logprobs = [lp - 0.2 for lp in run.body.logprobs]
    result = check(reference, run, edited(run.body, logprobs=logprobs), tol=MEASURE)
    assert result.ok and result.max_lp == pytest.approx(0.2, abs=1e-3)


@pytest.mark.parametrize("precision", ["bf16"])
def test_honest_reduced_precision_receipts_pass_their_class_tolerances_at_the_fp32_reference(reference, precision):
    runs = run_engine(honest_requests(4, seed=77, model_cid=MODEL_CID, max_tokens=24), precision=precision)
    tol = tolerance_for(default_tolerances(MODEL_CID).body, precision)
    for run in runs:
        assert run.body.precision == precision
        result = check(reference, run, tol=tol)
        assert result.ok, result.failure
    # … and those tolerances are not a blank cheque: a random edit is still caught
    b = runs[0].body
    tokens = list(b.output_tokens)
    tokens[4] = (tokens[4] + 7) % 256
    assert not check(reference, runs[0], b.model_copy(update={"output_tokens": tokens}), tol=tol).ok


@pytest.mark.parametrize("budget", [8192, 48])
def test_batched_replay_judges_each_receipt_as_it_is_judged_alone(reference, honest, budget):
    """One padded pass (or several, under a small token budget), a prompt shared by three receipts computed
    once: the same verdicts, failure positions and (to fp32 noise) deviations as one replay per receipt."""
    first = honest[0]
    tokens = list(first.body.output_tokens)
    tokens[5] = (tokens[5] + 7) % 256
    tampered = edited(first.body, output_tokens=tokens, output_text=TOK.decode(tokens))
    logprobs = list(honest[1].body.logprobs)
    logprobs[2] += 0.01
    jobs = [ReplayJob(r.prompt, r.body, FP32, r.request_bytes) for r in honest]
    jobs += [ReplayJob(first.prompt, tampered, FP32, first.request_bytes),  # shares first's prompt and 5 tokens
             ReplayJob(first.prompt, first.body, FP32, first.request_bytes),
             ReplayJob(honest[1].prompt, edited(honest[1].body, logprobs=logprobs), FP32, honest[1].request_bytes)]
    kw = {"model_cid": MODEL_CID, "decode": TOK.decode, "eos_token": TOK.eos}
    together = check_receipts(reference, jobs, token_budget=budget, **kw)
    alone = [check_receipt(reference, j.prompt_ids, j.receipt, j.tolerances, request_bytes=j.request_bytes, **kw)
             for j in jobs]
    assert [r.ok for r in together] == [True] * len(honest) + [False, True, False]
    for a, b in zip(alone, together):
        assert a.ok == b.ok and a.checked_positions == b.checked_positions
        assert (a.failure.kind, a.failure.position) == (b.failure.kind, b.failure.position) if a.failure else True
        assert abs(a.max_lp - b.max_lp) < 1e-4 and abs(a.max_top - b.max_top) < 1e-4
        assert not b.ok or b.max_lp < 1e-3
    assert (together[-3].failure.kind, together[-3].failure.position) in {("token", 5), ("nucleus", 5)}
    assert (together[-1].failure.kind, together[-1].failure.position) == ("logprob", 2)


BF16_LIKE = Tolerances(0.468, 0.275, 0.351, mass=0.3)  # the size of honest bf16 drift on agora-tiny


@pytest.mark.parametrize("top_p", [0.9, 0.5])
def test_the_nucleus_is_judged_by_mass_and_bf16_tolerances_do_not_open_it(honest, top_p):
    """v1 widened top_p by exp(2·τ_lp/T) — at bf16 and T 0.7 that admits every token. Judged by mass, a token
    whose better tokens clearly hold more than top_p is refused; tokens inside are never refused as outside."""
    run, t = honest[0], 0.7
    assert top_p * math.exp(2 * BF16_LIKE.lp / t) > 1.0  # the old slack would have accepted anything here
    row = [4.0, 3.2, 2.6, 2.0] + torch.linspace(1.0, -3.0, 60).tolist()
    model = FixedLogits(row)
    probs = torch.softmax(model.row / t, -1)
    better = torch.cumsum(probs, 0) - probs  # the row is sorted: mass strictly before each token
    kinds = {}
    for token in range(len(row)):
        failure = check_receipt(model, run.prompt, fake_receipt(run.body, model, token, temperature=t, top_p=top_p),
                                BF16_LIKE).failure
        kinds[token] = failure.kind if failure else None
    inside = [i for i in range(len(row)) if better[i] < top_p]
    deep = [i for i in range(len(row)) if better[i] > top_p + 0.7 * (1 - top_p)]  # e.g. > 0.97 for 0.9
    assert inside and deep
    assert all(kinds[i] != "nucleus" for i in inside)
    assert all(kinds[i] == "nucleus" for i in deep)


def test_an_honest_token_on_the_nucleus_edge_is_not_refused(honest):
    """The provider's logits drift a little from the replay's: its nucleus holds a token the exact replay
    would leave out. Within τ_tok and τ_mass that token is accepted; with no tolerance it would not be."""
    run, t = honest[0], 0.7
    replay_row = torch.tensor([2.0, 1.9, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    provider_row = replay_row + torch.tensor([-0.08, 0.08, 0, 0, 0, 0, 0, 0])
    p_replay, p_provider = (float(torch.softmax(r / t, -1)[0]) for r in (replay_row, provider_row))
    top_p = (p_replay + p_provider) / 2  # token 1 is inside for the provider (p0 < top_p), outside for the replay
    b = run.body
    seed = next(s for s in range(500) if choose_token(provider_row, temperature=t, top_p=top_p, seed=s,
                                                      request_id=b.request_id, position=len(b.prefix_tokens)) == 1)
    model = FixedLogits(replay_row.tolist())
    body = fake_receipt(b, model, 1, temperature=t, top_p=top_p)
    body = body.model_copy(update={"sampling": body.sampling.model_copy(update={"seed": seed})})
    result = check_receipt(model, run.prompt, body, Tolerances(0.2, 0.2, 0.2, mass=0.2))
    assert result.ok, result.failure
    assert check_receipt(model, run.prompt, body, Tolerances(0.0, 0.2, 0.2, mass=0.0)).failure.kind == "nucleus"


@pytest.mark.parametrize("top_p", [0.9, 0.5])
def test_a_bf16_provider_ignoring_top_p_is_caught_and_honest_bf16_passes(reference, top_p):
    """At T 0.7 with the shipped bf16 tolerances: every honest bf16 sequence passes, and a provider sampling
    from the whole distribution is caught where that changed its output — nearly every time at top_p 0.5; at
    0.9 its tokens often land just past the edge, inside the tolerance. These short prompts are judged by the
    shipped record's ≤ 128-token bucket, τ_mass 0.84 (whole range 1.63; 0.39 when calibrated on 64-token
    short-prompt runs only: 28/31 caught at 0.9), so at 0.9 only a minority is caught (4 of 10 changed
    outputs; 3 of 10 under the single-bucket τ_mass 1.28)."""
    from agoranet.node.cheat import CheatingEngine

    requests = honest_requests(12, seed=515, model_cid=MODEL_CID, max_tokens=48, temperatures=(0.7,),
                               top_ps=(top_p,))
    tol = tolerance_for(default_tolerances(MODEL_CID).body, "bf16")
    honest_runs_ = run_engine(requests, precision="bf16")
    for run in honest_runs_:
        result = check(reference, run, tol=tol)
        assert result.ok, result.failure
    cheat = CheatingEngine(TransformersEngine(MODEL_DIR, model_cid=MODEL_CID, precision="bf16", threads=1), "top_p")
    cheated = run_engine(requests, engine=cheat)
    changed = [c for c, h in zip(cheated, honest_runs_) if c.body.output_tokens != h.body.output_tokens]
    verdicts = [check(reference, c, tol=tol) for c in changed]
    caught = [r for r in verdicts if r.failure is not None and r.failure.kind == "nucleus"]
    print(f"top_p {top_p}: {len(changed)} of {len(cheated)} outputs changed, {len(caught)} caught")
    assert len(changed) >= len(cheated) // 2
    assert len(caught) >= (0.9 if top_p == 0.5 else 0.2) * len(changed)


def runner_up_at_last(reference, run):
    """The body with its last token replaced by the rule's second choice there, and that choice's margin."""
    b = run.body
    n = len(b.output_tokens)
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([run.prompt + b.output_tokens[:-1]])).logits[0, -1]
    s = b.sampling
    scores = token_scores(logits, temperature=s.temperature, top_p=s.top_p, seed=s.seed, request_id=b.request_id,
                          position=n - 1)
    top2 = torch.topk(scores, 2)
    token = int(top2.indices[1])
    margin = float(top2.values[0] - top2.values[1]) * (s.temperature if s.temperature > 0 else 1.0)
    lp = float(torch.log_softmax(logits, -1)[token])
    tokens, logprobs = [*b.output_tokens[:-1], token], [*b.logprobs[:-1], lp]
    return edited(b, output_tokens=tokens, logprobs=logprobs, output_text=TOK.decode(tokens)), margin


def test_sequence_test_rejects_flips_beyond_the_class_allowance_with_re_checkable_evidence(reference, honest):
    """Per-position tolerances wide open (as a near tie is at bf16): one flip passes an allowance of one
    flip, fails an allowance of none, and fails a summed-margin limit below its margin; the evidence
    names the position, tokens and margin, and replaying again gives the same verdict."""
    run = next(r for r in honest if r.body.finish_reason == "length" and TOK.eos not in r.body.output_tokens
               and r.body.sampling.top_p == 1.0)
    body, margin = runner_up_at_last(reference, run)
    assert 1e-3 < margin < 50
    wide = dict(tok=100.0, lp=100.0, top=100.0)
    n = len(body.output_tokens)
    result = check(reference, run, body, tol=Tolerances(**wide, seq_flips=1, seq_flip_margin=100.0, seq_lp_mean=1.0))
    assert result.ok and result.flips == 1 and result.flip_margin == pytest.approx(margin, rel=1e-3)
    for tol in (Tolerances(**wide, seq_flips=0, seq_flip_margin=100.0, seq_lp_mean=1.0),
                Tolerances(**wide, seq_flips=1, seq_flip_margin=margin * 0.9, seq_lp_mean=1.0)):
        result = check(reference, run, body, tol=tol)
        f = result.failure
        assert not result.ok and (f.kind, f.position, f.claimed_token) == ("sequence", n - 1, body.output_tokens[-1])
        assert f.best_token == run.body.output_tokens[-1] and f.margin == pytest.approx(margin, rel=1e-3)
        assert check(reference, run, body, tol=tol).failure == f  # a third party's replay sees the same


def test_sequence_test_bounds_the_mean_logprob_deviation(reference, honest):
    run = honest[1]
    body = edited(run.body, logprobs=[lp - 0.05 for lp in run.body.logprobs])
    loose = Tolerances(1e-3, 0.1, 0.1, seq_lp_mean=0.06)
    assert check(reference, run, body, tol=loose).ok
    result = check(reference, run, body, tol=Tolerances(1e-3, 0.1, 0.1, seq_lp_mean=0.04))
    assert (result.failure.kind, result.failure.position) == ("sequence", -1)


def bucket(max_prompt: int, *, tok: float, flips_base: float, margin_base: float) -> LengthBucket:
    return LengthBucket(max_prompt_tokens=max_prompt, tok=tok, lp=100.0, top=100.0, mass=100.0, flips_base=flips_base,
                        flips_per_token=0.0, margin_base=margin_base, margin_per_token=0.0, lp_mean=1.0,
                        measured_tok=0.0, measured_lp=0.0, measured_top=0.0, measured_mass=0.0, measured_flips=0,
                        measured_flip_margin=0.0, measured_lp_mean=0.0, sequences=100, confirm_sequences=100)


def test_a_short_prompt_receipt_is_judged_by_the_short_bucket_not_the_long_one(reference, honest):
    """One flip (the last token swapped for the rule's runner-up) passes the long-prompt bucket's limits, which
    allow the flips honest drift makes over long prompts, and fails the short bucket's, which allow none: a
    short-prompt receipt is judged by the short bucket, chosen from the prompt the verifier renders from the
    request; claiming a longer prompt to reach the long bucket's limits fails the structure check instead."""
    from agoranet.verify.tolerances import SequenceStats, bucketed, class_tolerance, limits_for

    run = next(r for r in honest if r.body.finish_reason == "length" and TOK.eos not in r.body.output_tokens
               and r.body.sampling.top_p == 1.0)
    assert len(run.prompt) <= 128
    body, margin = runner_up_at_last(reference, run)
    assert 1e-3 < margin < 50
    stats = SequenceStats(flips=[0], flip_margins=[0.0], lp_means=[0.0], max_prompt_tokens=960,
                          max_output_tokens=256, batch_sizes=(1, 16))
    whole = class_tolerance("bf16", (40.0, 40.0, 40.0, 40.0), (0, 0, 0, 0), sequences=200, confirm_sequences=200,
                            stats=stats, headroom=2.5).model_copy(update={"seq_flips": 3, "seq_flip_margin": 100.0})
    short = bucket(128, tok=margin * 2, flips_base=0.0, margin_base=1e-3)
    long = bucket(960, tok=100.0, flips_base=3.0, margin_base=margin * 3)
    tol = bucketed(whole, [short, long])

    result = check(reference, run, body, tol=tol)
    assert not result.ok and (result.failure.kind, result.failure.position) == ("sequence", len(body.output_tokens) - 1)
    assert result.tolerances.max_prompt_tokens == 128 and result.tolerances.seq_flips == 0  # the bucket it was judged by
    assert check(reference, run, tol=tol).ok  # the honest receipt passes the short bucket
    # the same deviation passes the long bucket's limits, and the class's whole-range ones
    long_limits = limits_for(tol, 900, len(body.output_tokens))
    assert long_limits.seq_flips == 3 and check(reference, run, body, tol=long_limits).ok
    assert check(reference, run, body, tol=whole).ok
    # the bucket comes from the rendered prompt, not from a count the provider signs: claiming 900 prompt tokens
    # does not buy the long bucket
    padded = edited(body, prompt_tokens=900)
    assert check(reference, run, padded, tol=tol).failure.kind == "structure"
