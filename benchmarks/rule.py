"""Cost of the public sampling rule per token: v1 (SHAKE-256 noise over the whole vocabulary, full sort for
top-p; kept here as the anchor, same run) against v2 (`agoranet.verify.rule`: noise for V/256 blocks and the
256 tokens of one block, a top-k grown until the nucleus edge shows).

Logits are synthetic, since no large-vocabulary model is at hand: "peaked" rows (a N(0, 2.5²) bulk with
20 tokens lifted by 5–15, roughly how a trained model's next-token logits look) and "flat" rows (N(0, 1),
like an untrained model: v2's worst case for top_p < 1, where the nucleus holds much of the vocabulary and
its edge needs a sort, as in v1). One row at a time (`choose_token`, a provider's decoding step for one
sequence), one CPU thread; medians. "nucleus" is the mean nucleus size, "hashed" the noise values drawn.

    python benchmarks/rule.py                 # vocab 260, 32k, 152k
    python benchmarks/rule.py --vocab 152064 --repeat 50
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import struct
import time

import numpy as np
import torch

from agoranet.verify import rule

# -- v1, verbatim from agoranet/verify/rule.py before agora-gumbel-v2 -----------------------------


def v1_noise(seed: int, request_id: str, position: int, vocab_size: int) -> torch.Tensor:
    head = b"agora-gumbel-v1" + struct.pack(">q", seed) + struct.pack(">I", len(request_id.encode())) + request_id.encode()
    stream = hashlib.shake_256(hashlib.sha256(head + struct.pack(">Q", position)).digest()).digest(8 * vocab_size)
    words = np.frombuffer(stream, dtype=">u8")
    uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
    return torch.from_numpy(-np.log(-np.log(uniform))).to(torch.float32)


def v1_nucleus(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return torch.ones_like(scaled, dtype=torch.bool)
    probs = torch.softmax(scaled.float(), dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    return torch.zeros_like(before < top_p).scatter_(-1, order, before < top_p)


def v1_choose(logits: torch.Tensor, *, temperature: float, top_p: float, seed: int, request_id: str,
              position: int) -> int:
    scaled = logits.float() / temperature
    scores = scaled + v1_noise(seed, request_id, position, logits.shape[-1])
    return int(torch.argmax(scores.masked_fill(~v1_nucleus(scaled, top_p), float("-inf"))))


# -- measurement ----------------------------------------------------------------------------------


def logits_rows(vocab: int, shape: str, n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        if shape == "flat":
            rows.append(torch.randn(vocab, generator=g))
            continue
        row = torch.randn(vocab, generator=g) * 2.5
        lifted = torch.randint(0, vocab, (min(20, vocab),), generator=g)
        row[lifted] += 5 + 10 * torch.rand(len(lifted), generator=g)
        rows.append(row)
    return rows


def per_token_ms(choose, rows: list[torch.Tensor], temperature: float, top_p: float) -> float:
    times = []
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        choose(row, temperature=temperature, top_p=top_p, seed=i, request_id="bench", position=i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def nucleus_size(rows: list[torch.Tensor], temperature: float, top_p: float) -> float:
    return statistics.mean(int(rule.nucleus_mask(rule.scale_logits(r[None], temperature), top_p).sum())
                           for r in rows)


def _v2_noise(position: int, vocab: int) -> None:
    keys = rule.position_keys(position, "bench", [position])
    rule.noise_at(keys[:, 1:], torch.arange(-(-vocab // rule.BLOCK)))
    rule.noise_at(keys[:, :1], torch.arange(min(vocab, rule.BLOCK)))


def _hashed(vocab: int) -> int:
    return -(-vocab // rule.BLOCK) + min(vocab, rule.BLOCK)


def _timed(fn, n: int = 30) -> float:
    fn(0)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - t0) / n * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, action="append", help="vocabulary size(s) (default 260, 32000, 152064)")
    ap.add_argument("--repeat", type=int, default=30, help="rows (decoding steps) per setting")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'vocab':>7} {'logits':>6} {'T':>4} {'top_p':>5} {'nucleus':>8} {'hashed v1/v2':>13} {'v1 ms':>7} "
          f"{'v2 ms':>7} {'v1/v2':>6}")
    for vocab in args.vocab or [260, 32000, 152064]:
        v1_noise_ms = statistics.median(_timed(lambda i: v1_noise(i, "bench", i, vocab)) for _ in range(3))
        v2_noise_ms = statistics.median(_timed(lambda i: _v2_noise(i, vocab)) for _ in range(3))
        print(f"{vocab:>7} noise alone: v1 {v1_noise_ms:.3f} ms (SHAKE-256, {vocab} values), v2 {v2_noise_ms:.3f} ms "
              f"(sha256 + splitmix64, {_hashed(vocab)} values)")
        for shape in ("peaked", "flat"):
            rows = logits_rows(vocab, shape, args.repeat)
            for temperature, top_p in ((0.7, 1.0), (0.7, 0.9), (0.7, 0.5), (1.0, 1.0), (1.0, 0.95)):
                same = [v1_choose(r, temperature=temperature, top_p=top_p, seed=1, request_id="x", position=0)
                        for r in rows[:1]]  # warm both paths
                same += [rule.choose_token(rows[0], temperature=temperature, top_p=top_p, seed=1, request_id="x",
                                           position=0)]
                v1 = per_token_ms(v1_choose, rows, temperature, top_p)
                v2 = per_token_ms(rule.choose_token, rows, temperature, top_p)
                hashed = f"{vocab}/{_hashed(vocab)}"
                print(f"{vocab:>7} {shape:>6} {temperature:>4} {top_p:>5} {nucleus_size(rows, temperature, top_p):>8.0f}"
                      f" {hashed:>13} {v1:>7.3f} {v2:>7.3f} {v1 / v2:>6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
