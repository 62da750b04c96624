import hashlib
import math
import struct

import pytest
import torch

from agoranet.verify.rule import (
    BLOCK, RULE, choose_token, choose_tokens, gumbel_noise, gumbel_noise_rows, nucleus_mask, token_scores,
)


def test_noise_is_a_pure_function_of_seed_request_and_position():
    a = gumbel_noise(7, "req-1", 3, 260)
    assert torch.equal(a, gumbel_noise(7, "req-1", 3, 260))
    for other in (gumbel_noise(8, "req-1", 3, 260), gumbel_noise(7, "req-2", 3, 260), gumbel_noise(7, "req-1", 4, 260)):
        assert not torch.equal(a, other)
    # Standard Gumbel: mean ≈ 0.5772, variance ≈ π²/6 over many draws.
    many = torch.cat([gumbel_noise(1, "x", i, 260) for i in range(200)])
    assert abs(many.mean().item() - 0.5772) < 0.03 and abs(many.var().item() - 1.6449) < 0.1


def test_greedy_is_argmax_and_sampling_follows_the_softmax():
    logits = torch.tensor([0.0, 2.0, 1.0, -1.0])
    assert choose_token(logits, temperature=0, top_p=1, seed=0, request_id="r", position=0) == 1
    counts = torch.zeros(4)
    for i in range(4000):
        counts[choose_token(logits, temperature=1.0, top_p=1.0, seed=i, request_id="r", position=0)] += 1
    assert torch.allclose(counts / 4000, torch.softmax(logits, -1), atol=0.03)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    scaled = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert nucleus_mask(scaled, 0.5).tolist() == [True, False, False, False]
    assert nucleus_mask(scaled, 0.7).tolist() == [True, True, False, False]
    assert nucleus_mask(scaled, 1.0).all()
    scores = token_scores(scaled, temperature=1.0, top_p=0.7, seed=3, request_id="r", position=0)
    assert torch.isinf(scores[2:]).all() and torch.isfinite(scores[:2]).all()
    # tied tokens are in or out together: both 0.3s have only 0.4 of strictly better mass
    tied = torch.log(torch.tensor([0.4, 0.3, 0.3]))
    assert nucleus_mask(tied, 0.5).tolist() == [True, True, True]


def test_a_large_nucleus_is_found_beyond_the_first_top_k():
    logits = torch.zeros(5000)
    logits[:3] = 4.0  # three likely tokens, then a flat tail of 4997
    assert int(nucleus_mask(logits, 0.9).sum()) == 5000  # the flat tail ties: all of it or none
    logits[3:] = -torch.arange(4997.0) * 1e-3
    mask = nucleus_mask(logits, 0.9)
    sorted_p = torch.softmax(logits, -1).sort(descending=True).values
    assert int(mask.sum()) == int(((torch.cumsum(sorted_p, 0) - sorted_p) < 0.9).sum()) > 64


def test_sampling_across_blocks_follows_the_softmax():
    """Two-level Gumbel-max (blocks by mass, then tokens) is an exact draw: frequencies match softmax."""
    logits = torch.full((700,), -4.0)
    likely = [3, 255, 256, 300, 699]  # in blocks 0, 0, 1, 1, 2
    logits[likely] = torch.tensor([1.0, 0.5, 0.8, 0.0, 1.2])
    probs = torch.softmax(logits, -1)
    counts = torch.zeros(700)
    for i in range(6000):
        counts[choose_token(logits, temperature=1.0, top_p=1.0, seed=i, request_id="r", position=i % 7)] += 1
    freq = counts / 6000
    assert torch.allclose(freq[likely], probs[likely], atol=0.025)
    rest = [i for i in range(700) if i not in likely]
    assert abs(float(freq[rest].sum()) - float(probs[rest].sum())) < 0.03


def test_batched_rule_chooses_what_each_row_gets_alone():
    torch.manual_seed(0)
    logits = torch.randn(48, 260) * 3
    logits[7, 10:20] = logits[7].max()  # a row with exact ties at the top
    temps = [(0.0, 0.7, 1.0, 1.3)[i % 4] for i in range(48)]
    top_ps = [(1.0, 0.9, 0.5)[i % 3] for i in range(48)]
    seeds, ids, positions = list(range(48)), [f"r{i % 5}" for i in range(48)], [i * 7 for i in range(48)]
    batched = choose_tokens(logits, temperatures=temps, top_ps=top_ps, seeds=seeds, request_ids=ids,
                            positions=positions)
    alone = [choose_token(logits[i], temperature=temps[i], top_p=top_ps[i], seed=seeds[i], request_id=ids[i],
                          position=positions[i]) for i in range(48)]
    scored = [int(torch.argmax(token_scores(logits[i], temperature=temps[i], top_p=top_ps[i], seed=seeds[i],
                                            request_id=ids[i], position=positions[i]))) for i in range(48)]
    assert batched == alone == scored
    assert len(set(batched)) > 10  # the rows really differ, so the comparison means something


def _reference_rule(logits: list[float], temperature: float, top_p: float, seed: int, request_id: str,
                    position: int) -> int:
    """The published rule written out in plain Python (ints, math), independent of the torch code."""
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    scaled = [float(torch.tensor(x, dtype=torch.float32) / torch.tensor(temperature, dtype=torch.float32))
              for x in logits]
    top = max(scaled)
    weights = [math.exp(s - top) for s in scaled]
    probs = [w / sum(weights) for w in weights]
    nucleus = [top_p >= 1.0 or sum(p for p, t in zip(probs, scaled) if t > s) < top_p for s in scaled]
    rid = request_id.encode()
    d = hashlib.sha256(RULE.encode() + struct.pack(">q", seed) + struct.pack(">I", len(rid)) + rid
                       + struct.pack(">Q", position)).digest()
    token_key, block_key = int.from_bytes(d[:8], "big"), int.from_bytes(d[8:16], "big")
    m64 = (1 << 64) - 1

    def noise(key: int, i: int) -> float:
        x = (key + (i + 1) * 0x9E3779B97F4A7C15) & m64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m64
        x ^= x >> 31
        return f32(-math.log(-math.log(((x >> 11) + 0.5) / 2**53)))

    def argmax(scores: list[tuple[float, int]]) -> int:
        return max(scores, key=lambda si: (si[0], -si[1]))[1]

    blocks = range(-(-len(logits) // BLOCK))
    mass = {b: sum(weights[i] for i in range(b * BLOCK, min((b + 1) * BLOCK, len(logits))) if nucleus[i])
            for b in blocks}
    block = argmax([(f32(f32(math.log(mass[b]) + top) + noise(block_key, b)) if mass[b] > 0 else -math.inf, b)
                    for b in blocks])
    members = [i for i in range(block * BLOCK, min((block + 1) * BLOCK, len(logits))) if nucleus[i]]
    return argmax([(f32(scaled[i] + noise(token_key, i)), i) for i in members])


@pytest.mark.parametrize("top_p", [1.0, 0.9, 0.5])
def test_the_rule_is_the_published_formula(top_p):
    torch.manual_seed(1)
    for n in range(30):
        logits = (torch.randn(600) * (1 + n % 4)).tolist()
        temperature = (0.5, 0.8, 1.0, 1.3)[n % 4]
        got = choose_token(torch.tensor(logits), temperature=temperature, top_p=top_p, seed=n, request_id="req-é",
                           position=n * 1000)
        assert got == _reference_rule(logits, temperature, top_p, n, "req-é", n * 1000)


def test_noise_for_many_positions_is_the_noise_of_each_position_bit_for_bit():
    rows = gumbel_noise_rows(11, "req-é", [0, 3, 64, 2**40], 260)
    assert rows.shape == (4, 260)
    for row, position in zip(rows, [0, 3, 64, 2**40]):
        assert torch.equal(row, gumbel_noise(11, "req-é", position, 260))


def test_the_device_path_draws_the_same_noise_as_the_cpu_path():
    """GPU tensors take the int64 torch arithmetic; run here on the CPU it must give numpy's values bit for bit."""
    from agoranet.verify.rule import _noise_numpy, _noise_torch, position_keys

    keys = position_keys(2**62, "req-é", [0, 1, 2**40, 2**63 - 1])
    index = torch.arange(152064)[None, :]
    for column in (0, 1):
        assert torch.equal(_noise_numpy(keys[:, column:column + 1], index),
                           _noise_torch(keys[:, column:column + 1], index))
    if torch.cuda.is_available():
        on_gpu = _noise_torch(keys[:, :1].cuda(), index.cuda()).cpu()
        assert (on_gpu - _noise_numpy(keys[:, :1], index)).abs().max() < 1e-6  # libm may differ in the last bit
        logits = torch.randn(8, 152064) * 3
        kw = dict(temperatures=[0.7] * 8, top_ps=[1.0, 0.9, 0.5, 0.95] * 2, seeds=list(range(8)),
                  request_ids=["r"] * 8, positions=list(range(8)))
        assert choose_tokens(logits.cuda(), **kw) == choose_tokens(logits, **kw)


def test_the_cpu_sort_finds_the_nucleus_edge_torchs_top_k_finds():
    """On the CPU the nucleus edge comes from numpy's sort of whole rows (far faster than torch's topk): the same
    edge as torch.topk's values give, with ties, −inf and NaN rows, for small and large vocabularies."""
    import agoranet.verify.rule as rule

    def by_topk(x: torch.Tensor, p: float) -> torch.Tensor:
        values = torch.topk(x, x.shape[-1], dim=-1).values
        mass = torch.exp(values.double() - torch.logsumexp(x, dim=-1, keepdim=True).double())
        inside = (torch.cumsum(mass, dim=-1) - mass < p).sum(dim=-1)
        return values.gather(-1, (inside - 1).clamp(min=0)[:, None])[:, 0]

    g = torch.Generator().manual_seed(3)
    for vocab in (5, 260, 1024, 9000):
        x = torch.randn(9, vocab, generator=g) * 4
        x[0] = 1.0
        x[1, : vocab // 2] = 2.0
        x[2, 3] = float("-inf")
        x[3] = torch.round(x[3])
        x[4, 1] = float("nan")
        assert torch.equal(rule._top_values(x[:4], vocab), torch.topk(x[:4], vocab, dim=-1).values)
        for p in (0.2, 0.9, 0.999):
            got, want = rule.nucleus_edge(x, p), by_topk(x, p)
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_the_cpu_path_chooses_what_the_torch_path_chooses():
    """choose_tokens on CPU rows runs mostly in numpy (rule._choose_cpu); the torch path (`_choose` over
    `nucleus_edge`, what a GPU runs) must give the same token for every row: ties, −inf logits, vocabularies
    not a multiple of the block, nuclei closed inside and beyond the summed prefix, greedy rows in the batch."""
    import agoranet.verify.rule as rule

    g = torch.Generator().manual_seed(11)
    rows = 0
    for trial in range(120):
        vocab = (5, 256, 300, 1024, 1030, 4096)[trial % 6]
        n = (1, 3, 8, 13)[trial % 4]
        x = torch.randn(n, vocab, generator=g) * (0.5, 3.0, 12.0)[trial % 3]
        if trial % 5 == 0:
            x = torch.round(x)  # ties
        if trial % 7 == 0:
            x[0, : vocab // 3] = float("-inf")
        temps = [(0.0, 0.5, 0.8, 1.3)[(trial + i) % 4] for i in range(n)]
        top_ps = [(1.0, 0.95, 0.5, 0.1, 0.999)[(trial + 2 * i) % 5] for i in range(n)]
        kw = dict(temperatures=temps, top_ps=top_ps, seeds=[trial * 31 + i for i in range(n)],
                  request_ids=[f"r{trial}-{i}" for i in range(n)], positions=[trial * 100 + i for i in range(n)])
        hot = [i for i in range(n) if temps[i] > 0]
        if not hot:
            continue
        scaled = rule.scale_logits(x[hot], [temps[i] for i in hot])
        keys = rule.position_keys(0, [kw["request_ids"][i] for i in hot], [kw["positions"][i] for i in hot],
                                  seeds=[kw["seeds"][i] for i in hot])
        by_torch = rule._choose(scaled, rule.nucleus_edge(scaled, [top_ps[i] for i in hot]), keys)[0].tolist()
        by_numpy = rule._choose_cpu(x[hot].numpy(), [temps[i] for i in hot], [top_ps[i] for i in hot], keys.numpy())
        assert by_numpy == by_torch, trial
        batched = choose_tokens(x, **kw)
        assert [batched[i] for i in hot] == by_torch
        assert all(batched[i] == int(torch.argmax(x[i])) for i in range(n) if temps[i] == 0)
        rows += len(hot)
    assert rows > 400


def test_logsumexp_is_log_of_the_summed_exp_of_s_minus_max_bit_for_bit():
    """_choose_cpu reuses exp(s − max) for torch.logsumexp (ATen computes it as log(Σ exp(s − max)) + max): if a
    torch release computes it another way, this fails and _choose_cpu must call torch.logsumexp again."""
    g = torch.Generator().manual_seed(12)
    for vocab in (5, 260, 1024, 4096):
        s = torch.randn(9, vocab, generator=g) * 7
        top = s.amax(dim=-1, keepdim=True)
        mine = torch.log(torch.exp(s - top).sum(dim=-1, keepdim=True)) + top
        assert torch.equal(mine, torch.logsumexp(s, dim=-1, keepdim=True))
