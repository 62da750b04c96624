"""The replay rule (`agora-gumbel-v2`): how a token is chosen, so that anyone holding the model can re-check it.

Greedy (temperature 0): the token with the highest logit (lowest id among equals). Sampling, with
s = logits / T in float32:

1. Nucleus N: every token whose *strictly better* tokens (s_j > s_i) hold less than top_p of
   softmax(s) — tied tokens are in or out together; top_p ≥ 1 keeps the whole vocabulary.
2. Keys: d = sha256(DOMAIN ‖ seed ‖ len(request id) ‖ request id ‖ position) (seed as signed 64-bit,
   length 32-bit, position 64-bit, big-endian); the token key is d[0:8], the block key d[8:16].
   Noise of index i under key k: z = splitmix64(k + (i + 1)·0x9E3779B97F4A7C15 mod 2^64),
   u = ((z >> 11) + 0.5) / 2^53, g = −log(−log u) in float64, rounded to float32.
3. Blocks: token ids in runs of BLOCK = 256 (block b holds ids 256·b … 256·b + 255). A block's log-mass
   is L_b = m + log Σ_{i ∈ N ∩ b} exp(s_i − m) (m = max s, float32). The chosen block is the argmax of
   L_b + noise(block key, b); the chosen token is the argmax, over the nucleus tokens of that block,
   of s_i + noise(token key, i). Lowest index among equals, both times.

This is Gumbel-max twice — over blocks weighted by their mass, then inside the winning block — so the
token is an exact draw from softmax(s) restricted to N, as one Gumbel-max over the vocabulary would
be, but the noise is drawn for V/256 blocks and 256 tokens instead of V tokens: O(√V) hashing (850 at a
152k vocabulary) and O(V) vector arithmetic (the division, one exp, block sums, and for top_p < 1 a
top-k grown until the nucleus edge shows) where v1 drew SHAKE-256 noise for the whole vocabulary
and sorted it for every token.

One sha256 per position keeps the key derivation cryptographic and domain-separated; per index a
counter-based mix is enough because the noise needs no secrecy (anyone recomputes it), only a fixed,
public, well-spread value per (key, index): splitmix64 (Steele, Lea & Flood 2014; passes BigCrush) is
five integer operations, exact in int64 on every torch device, where torch's Philox offers no stable
counter API (on the CPU the same integers come from numpy's uint64, which skips torch's per-operation
overhead). Noise goes through float64 `log`, whose last bit may differ between libm implementations
(numpy on the CPU vs CUDA): a score moves by ~1e-7, far inside any verifier tolerance.
Reported logprobs are always the model's own distribution, log_softmax(logits) at T = 1.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np
import torch

from agoranet.verify.rules import RULE

__all__ = ["RULE", "BLOCK", "position_keys", "noise_at", "scale_logits", "gumbel_noise", "gumbel_noise_rows",
           "nucleus_edge", "nucleus_mask", "block_log_mass", "claim_margins", "token_scores", "choose_token",
           "choose_tokens"]

_DOMAIN = RULE.encode()
BLOCK = 256
_GAMMA = 0x9E3779B97F4A7C15
_FIRST_K = 64  # first top-k tried when looking for the nucleus edge (grown eightfold until found)
_SORT_ALL = 4096  # on the CPU, vocabularies up to this size are sorted whole for the nucleus edge (numpy)


def _i64(value: int) -> int:
    """The int64 with the same 64 bits as `value` (torch has no uint64 arithmetic)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def position_keys(seed: int, request_ids: str | Sequence[str], positions: Sequence[int],
                  seeds: Sequence[int] | None = None) -> torch.Tensor:
    """[positions, 2] int64: the (token key, block key) of each position, from one sha256 each.

    One request id (str) for all positions, or one per position; `seeds` likewise overrides `seed`."""
    return torch.from_numpy(_keys_np(seed, request_ids, positions, seeds))


def _keys_np(seed: int, request_ids: str | Sequence[str], positions: Sequence[int],
             seeds: Sequence[int] | None = None) -> np.ndarray:
    """`position_keys` as a numpy array: d[0:8] and d[8:16] of each digest, big-endian, as int64."""
    digests = []
    for n, position in enumerate(positions):
        rid = (request_ids if isinstance(request_ids, str) else request_ids[n]).encode()
        s = seed if seeds is None else seeds[n]
        digests.append(hashlib.sha256(_DOMAIN + struct.pack(">qI", s, len(rid)) + rid
                                      + struct.pack(">Q", position)).digest()[:16])
    return np.frombuffer(b"".join(digests), dtype=">i8").astype(np.int64).reshape(len(digests), 2)


def _srl(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def noise_at(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise of `index` under `keys` (int64 tensors that broadcast), as float32, on index's device.

    splitmix64: numpy's uint64 on the CPU (a few microseconds for a block), int64 torch arithmetic elsewhere
    (multiplication wraps modulo 2^64 on every torch device); the integers are the same bits either way."""
    return _noise_numpy(keys, index) if index.device.type == "cpu" else _noise_torch(keys, index)


def _noise_numpy(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(_gumbel_np(keys.cpu().numpy(), index.numpy()))


def _gumbel_np(keys: np.ndarray, index: np.ndarray) -> np.ndarray:
    """splitmix64 → Gumbel noise in numpy: int64 keys and indices that broadcast, float32 out."""
    return np.negative(_log_log(keys, (index.astype(np.uint64) + np.uint64(1)) * np.uint64(_GAMMA)))


def _log_log(keys: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """log(−log u) as float32, the Gumbel noise negated (IEEE negation is exact, so s + g = s − this), given
    spread = (index + 1)·γ mod 2^64; in place where it can be (the same operations, fewer temporaries)."""
    with np.errstate(over="ignore"):
        z = spread + keys.view(np.uint64)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        uniform = (z >> np.uint64(11)).astype(np.float64)
        uniform += 0.5
        uniform *= 1.0 / (1 << 53)  # in (0, 1)
        np.log(uniform, out=uniform)
        np.negative(uniform, out=uniform)
        np.log(uniform, out=uniform)
        return uniform.astype(np.float32)


_SPREADS: dict[int, np.ndarray] = {}  # n → (arange(n) + 1)·γ mod 2^64: the block indices' part of their noise


def _spread(n: int) -> np.ndarray:
    if (spread := _SPREADS.get(n)) is None:
        with np.errstate(over="ignore"):
            spread = _SPREADS[n] = (np.arange(n, dtype=np.uint64) + np.uint64(1)) * np.uint64(_GAMMA)
        spread.flags.writeable = False
    return spread


def _noise_torch(keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    z = (index.to(torch.int64) + 1) * _i64(_GAMMA) + keys.to(device=index.device, dtype=torch.int64)
    z = (z ^ _srl(z, 30)) * _i64(0xBF58476D1CE4E5B9)
    z = (z ^ _srl(z, 27)) * _i64(0x94D049BB133111EB)
    z = z ^ _srl(z, 31)
    uniform = (_srl(z, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))  # in (0, 1)
    return (-torch.log(-torch.log(uniform))).to(torch.float32)


def gumbel_noise(seed: int, request_id: str, position: int, vocab_size: int) -> torch.Tensor:
    """The token noise of every token at one position (O(vocab): the rule itself draws 256 of them)."""
    return gumbel_noise_rows(seed, request_id, [position], vocab_size)[0]


def gumbel_noise_rows(seed: int, request_id: str, positions: list[int], vocab_size: int) -> torch.Tensor:
    """`gumbel_noise` for several positions of one request, as one [positions, vocab] tensor."""
    return noise_at(position_keys(seed, request_id, positions)[:, :1], torch.arange(vocab_size)[None, :])


def scale_logits(logits: torch.Tensor, temperatures: float | Sequence[float]) -> torch.Tensor:
    """logits / T per row ([rows, vocab], float32): the one division every party computes the same way."""
    temps = torch.as_tensor(temperatures, dtype=torch.float32, device=logits.device)
    return logits.float() / (temps if temps.dim() == 0 else temps[:, None])


def nucleus_edge(scaled: torch.Tensor, top_p: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Per row of `scaled` ([rows, vocab]), the lowest scaled logit inside the top-p nucleus (−inf for top_p ≥ 1).

    The nucleus is every token whose strictly better tokens hold less than top_p of softmax(scaled), so it
    is {i : scaled_i ≥ edge}. Found with a top-k grown eightfold until the edge shows (a full sort only for
    nuclei beyond an eighth of the vocabulary). On the CPU a whole-row sort is numpy's (SIMD, ~20× torch's
    topk: 0.1 ms for 64 rows of 1024), so vocabularies up to _SORT_ALL are sorted whole at once, and larger
    ones use it when the top-k grows to the whole row; the values are the same either way."""
    rows, vocab = scaled.shape
    p = torch.as_tensor(top_p, dtype=torch.float64).to(scaled.device).expand(rows)
    need = p < 1.0
    if not bool(need.any()):
        return torch.full((rows,), float("-inf"), dtype=scaled.dtype, device=scaled.device)
    sub = scaled if bool(need.all()) else scaled.masked_fill(~need[:, None], 0.0)  # rows at top_p 1 are dropped below
    lse = torch.logsumexp(sub, dim=-1, keepdim=True).double()
    cpu = sub.device.type == "cpu"
    k = vocab if cpu and vocab <= _SORT_ALL else min(_FIRST_K, vocab)
    while True:
        values = _top_values(sub, k)  # sorted, largest first
        mass = torch.exp(values.double() - lse)
        # Mass listed before each token. A tied group's first member has exactly the mass strictly better than
        # the group, so the last token with less than top_p before it closes its group: the edge is its value.
        inside = (torch.cumsum(mass, dim=-1) - mass < p[:, None]).sum(dim=-1)
        if k == vocab or bool((inside[need] < k).all()):
            break
        k = vocab if 8 * k > vocab // 8 else 8 * k
    edge = values.gather(-1, (inside - 1).clamp(min=0)[:, None])[:, 0]  # never empty: the best token is inside
    return torch.where(need, edge, float("-inf"))


def _top_values(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest values of each row, largest first: exactly torch.topk's values (a whole float32 CPU row
    without NaN is sorted by numpy instead, which orders the same values the same way, many times faster)."""
    if k == x.shape[-1] and x.device.type == "cpu" and x.dtype == torch.float32 and not bool(torch.isnan(x).any()):
        return torch.from_numpy(np.ascontiguousarray(np.sort(x.detach().numpy(), axis=-1)[:, ::-1]))
    return torch.topk(x, k, dim=-1).values


def nucleus_mask(scaled_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the top-p nucleus of one row or a batch of rows (last dimension = vocabulary)."""
    rows = scaled_logits.reshape(-1, scaled_logits.shape[-1]).float()
    return (rows >= nucleus_edge(rows, top_p)[:, None]).reshape(scaled_logits.shape)


def block_log_mass(scaled: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """[rows, blocks]: log of the softmax mass (unnormalised, float32) of the tokens s ≥ floor in each block."""
    rows, vocab = scaled.shape
    top = scaled.amax(dim=-1, keepdim=True)
    weight = torch.exp(scaled - top)
    if bool((floor > float("-inf")).any()):
        weight = weight.masked_fill(scaled < floor[:, None], 0.0)
    blocks = -(-vocab // BLOCK)
    if blocks * BLOCK > vocab:
        weight = torch.nn.functional.pad(weight, (0, blocks * BLOCK - vocab))
    return torch.log(weight.view(rows, blocks, BLOCK).sum(dim=-1)) + top


def _block_tokens(scaled: torch.Tensor, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ids of each row's `block` ([rows, BLOCK]), whether each is in the vocabulary, and its scaled logit."""
    vocab = scaled.shape[-1]
    ids = block[:, None] * BLOCK + torch.arange(BLOCK, device=scaled.device)
    valid = ids < vocab
    return ids, valid, scaled.gather(-1, ids.clamp(max=vocab - 1))


def _choose(scaled: torch.Tensor, floor: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the chosen token among s ≥ floor, and the [rows, BLOCK] token scores of its block (−inf outside)."""
    keys = keys.to(scaled.device)
    mass = block_log_mass(scaled, floor)
    block = torch.argmax(mass + noise_at(keys[:, 1:], torch.arange(mass.shape[-1], device=scaled.device)), dim=-1)
    return _choose_in(scaled, floor, keys, block)


def _choose_in(scaled: torch.Tensor, floor: torch.Tensor, keys: torch.Tensor,
               block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_choose` once each row's block is chosen."""
    ids, valid, values = _block_tokens(scaled, block)
    scores = torch.where(valid & (values >= floor[:, None]), values + noise_at(keys[:, :1], ids), float("-inf"))
    return ids.gather(-1, torch.argmax(scores, dim=-1, keepdim=True))[:, 0], scores


def claim_margins(scaled: torch.Tensor, claimed: torch.Tensor, keys: torch.Tensor, surely: torch.Tensor,
                  possibly: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far (scaled units, ≥ 0) each claimed token falls behind the rule's choice, when the candidates are
    only known to include every token s ≥ `surely` and none below `possibly` (per row), and the rule's choice
    among the sure ones. Both steps count: the claimed token's block (scored with its possible tokens) against
    the best block (scored with sure ones), and the token against the best sure token of its block."""
    keys = keys.to(scaled.device)
    sure_mass = block_log_mass(scaled, surely)
    block_noise = noise_at(keys[:, 1:], torch.arange(sure_mass.shape[-1], device=scaled.device))
    claimed_block = claimed // BLOCK
    claimed_mass = block_log_mass(scaled, possibly).gather(-1, claimed_block[:, None])[:, 0]
    block_gap = (sure_mass + block_noise).amax(dim=-1) - (claimed_mass + block_noise.gather(-1, claimed_block[:, None])[:, 0])
    ids, valid, values = _block_tokens(scaled, claimed_block)
    sure = torch.where(valid & (values >= surely[:, None]), values + noise_at(keys[:, :1], ids), float("-inf"))
    claimed_score = scaled.gather(-1, claimed[:, None])[:, 0] + noise_at(keys[:, 0], claimed)
    token_gap = sure.amax(dim=-1) - claimed_score
    margins = torch.maximum(block_gap, token_gap).nan_to_num(nan=0.0, neginf=0.0).clamp(min=0.0)
    # The rule's choice among the sure tokens (what `_choose` gives), from the block masses, noise and token scores
    # computed above: the chosen block is nearly always the claimed one, whose sure scores are `sure`.
    block = torch.argmax(sure_mass + block_noise, dim=-1)
    if bool((block == claimed_block).all()):
        return margins, ids.gather(-1, torch.argmax(sure, dim=-1, keepdim=True))[:, 0]
    return margins, _choose_in(scaled, surely, keys, block)[0]


def token_scores(
    logits: torch.Tensor, *, temperature: float, top_p: float, seed: int, request_id: str, position: int
) -> torch.Tensor:
    """Per-token scores whose argmax is the chosen token: s + noise for the nucleus tokens of the chosen block,
    −inf elsewhere (greedy: the logits)."""
    logits = logits.float()
    if temperature <= 0.0:
        return logits
    scaled = scale_logits(logits[None], temperature)
    token, scores = _choose(scaled, nucleus_edge(scaled, top_p), position_keys(seed, request_id, [position]))
    ids, valid, _ = _block_tokens(scaled, token // BLOCK)
    out = torch.full_like(logits, float("-inf"))
    out[ids[valid]] = scores[valid]
    return out


def choose_token(
    logits: torch.Tensor, *, temperature: float, top_p: float, seed: int, request_id: str, position: int
) -> int:
    return choose_tokens(logits[None], temperatures=[temperature], top_ps=[top_p], seeds=[seed],
                         request_ids=[request_id], positions=[position])[0]


def choose_tokens(
    logits: torch.Tensor, *, temperatures: list[float], top_ps: list[float], seeds: list[int],
    request_ids: list[str], positions: list[int],
) -> list[int]:
    """The rule for a batch of rows at once (on the logits' device): row i gets exactly the token
    `choose_token` gives it, since every step is row-wise (division, max, sums, top-k, noise)."""
    logits = logits.float()
    sampled = [i for i, t in enumerate(temperatures) if t > 0.0]
    if not sampled:
        return [int(t) for t in torch.argmax(logits, dim=-1).tolist()]  # the first maximum is the lowest id
    every = len(sampled) == logits.shape[0]
    temps, top_p = [temperatures[i] for i in sampled], [top_ps[i] for i in sampled]
    ids, seeds_, pos = [request_ids[i] for i in sampled], [seeds[i] for i in sampled], [positions[i] for i in sampled]
    tokens = None
    if logits.device.type == "cpu":
        x = logits.detach().numpy()
        tokens = _choose_cpu(x if every else x[sampled], temps, top_p, _keys_np(0, ids, pos, seeds_))
    if tokens is None:
        scaled = scale_logits(logits if every else logits[torch.tensor(sampled, device=logits.device)], temps)
        tokens = _choose(scaled, nucleus_edge(scaled, top_p), position_keys(0, ids, pos, seeds=seeds_))[0].tolist()
    if every:
        return [int(t) for t in tokens]
    chosen = torch.argmax(logits, dim=-1).tolist()  # greedy rows
    for i, token in zip(sampled, tokens):
        chosen[i] = token
    return [int(t) for t in chosen]


_PREFIX = 64  # nucleus masses summed first; the rest only for rows whose nucleus is not closed by then


def _choose_cpu(x: np.ndarray, temperatures: list[float], top_p: list[float], keys: np.ndarray) -> list[int] | None:
    """The rule's tokens for float32 CPU rows (`x`, [rows, vocab], all at T > 0), bit-identical to
    `_choose(scale_logits(x), nucleus_edge(…), keys)`, about twice as fast at batch 8 × vocab 1024.

    Steps that are exact in IEEE arithmetic — division, comparisons, sorting, gathers, float32 and float64
    additions and subtractions, cumulative sums, argmax (first maximum) — run in numpy, ~1 µs an operation where
    torch's dispatch costs 3–30. Steps that round differently between libraries — exp, log, the float32 sums —
    are the same torch calls on arrays of the same shape, layout and values as the torch path's. torch.logsumexp
    is ATen's log(Σ exp(s − max)) + max, whose exp(s − max) is the block masses' own, so it is computed once
    (tests/verify/test_rule.py holds both paths and that identity bit for bit). The nucleus masses are summed
    over the first _PREFIX sorted tokens first: a cumulative sum is sequential, so a prefix's values are the full
    sum's, and once it passes top_p (with 1e-9 to spare for rounding) no later token can be inside.
    None where this path does not apply (a NaN, a row without a finite logit, top_p < 1 past _SORT_ALL tokens)."""
    if x.dtype != np.float32:
        return None
    s = x / np.asarray(temperatures, dtype=np.float32)[:, None]  # scale_logits
    rows, vocab = s.shape
    top = s.max(axis=-1, keepdims=True)
    if not bool(np.isfinite(top).all()):  # NaN (max propagates it) or a row of −inf
        return None
    p = np.asarray(top_p, dtype=np.float64)
    need = p < 1.0
    some = bool(need.any())
    if some and vocab > _SORT_ALL:
        return None
    weight = torch.exp(torch.from_numpy(s - top)).numpy()  # block_log_mass's exp(s − max), and logsumexp's
    edge = np.full(rows, -np.inf, dtype=np.float32)
    if some:  # nucleus_edge, whole-row branch
        lse = (torch.log(torch.from_numpy(weight).sum(dim=-1, keepdim=True)).numpy() + top).astype(np.float64)
        values = np.sort(s, axis=-1)[:, ::-1]  # rows at top_p 1 are sorted too, and ignored
        mass = torch.exp(torch.from_numpy(np.subtract(values, lse, dtype=np.float64, order="C"))).numpy()
        k = min(_PREFIX, vocab)
        cum = np.cumsum(mass[:, :k], axis=-1)
        if k < vocab and not bool((cum[:, -1] >= p + 1e-9)[need].all()):
            k, cum = vocab, np.cumsum(mass, axis=-1)
        inside = (cum - mass[:, :k] < p[:, None]).sum(axis=-1)
        edge = values[np.arange(rows), np.maximum(inside - 1, 0)]
        if not need.all():
            edge = np.where(need, edge, np.float32(-np.inf))
        weight = np.where(s < edge[:, None], np.float32(0.0), weight)
    blocks = -(-vocab // BLOCK)
    if blocks * BLOCK > vocab:
        weight = np.pad(weight, ((0, 0), (0, blocks * BLOCK - vocab)))
    block_mass = torch.log(torch.from_numpy(weight).view(rows, blocks, BLOCK).sum(dim=-1)).numpy() + top
    block = np.argmax(block_mass - _log_log(keys[:, 1:], _spread(blocks)), axis=-1)
    ids = block[:, None] * BLOCK + np.arange(BLOCK)
    if vocab % BLOCK == 0:
        values_b = s.reshape(rows, blocks, BLOCK)[np.arange(rows), block]
        keep = values_b >= edge[:, None]
    else:
        values_b = np.take_along_axis(s, np.minimum(ids, vocab - 1), axis=-1)
        keep = (ids < vocab) & (values_b >= edge[:, None])
    scores = np.where(keep, values_b - _log_log(keys[:, :1], _spread(vocab + BLOCK)[ids]), np.float32(-np.inf))
    return (block * BLOCK + np.argmax(scores, axis=-1)).tolist()
