import torch

from agoranet.verify.rule import choose_token, choose_tokens, gumbel_noise, gumbel_noise_rows, nucleus_mask, token_scores


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


def test_batched_rule_chooses_what_each_row_gets_alone():
    torch.manual_seed(0)
    logits = torch.randn(48, 260) * 3
    temps = [(0.0, 0.7, 1.0, 1.3)[i % 4] for i in range(48)]
    top_ps = [(1.0, 0.9, 0.5)[i % 3] for i in range(48)]
    seeds, ids, positions = list(range(48)), [f"r{i % 5}" for i in range(48)], [i * 7 for i in range(48)]
    batched = choose_tokens(logits, temperatures=temps, top_ps=top_ps, seeds=seeds, request_ids=ids,
                            positions=positions)
    alone = [choose_token(logits[i], temperature=temps[i], top_p=top_ps[i], seed=seeds[i], request_id=ids[i],
                          position=positions[i]) for i in range(48)]
    assert batched == alone
    assert len(set(batched)) > 10  # the rows really differ, so the comparison means something


def test_noise_for_many_positions_is_the_noise_of_each_position_bit_for_bit():
    """The batched noise is the published formula, position by position (written out here independently)."""
    import hashlib
    import struct

    import numpy as np

    def one(seed: int, request_id: str, position: int, vocab: int) -> torch.Tensor:
        key = hashlib.sha256(b"agora-gumbel-v1" + struct.pack(">q", seed) + struct.pack(">I", len(request_id.encode()))
                             + request_id.encode() + struct.pack(">Q", position)).digest()
        words = np.frombuffer(hashlib.shake_256(key).digest(8 * vocab), dtype=">u8")
        uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
        return torch.from_numpy(-np.log(-np.log(uniform))).to(torch.float32)

    rows = gumbel_noise_rows(11, "req-é", [0, 3, 64, 2**40], 260)
    assert rows.shape == (4, 260)
    for row, position in zip(rows, [0, 3, 64, 2**40]):
        assert torch.equal(row, one(11, "req-é", position, 260))
        assert torch.equal(row, gumbel_noise(11, "req-é", position, 260))
