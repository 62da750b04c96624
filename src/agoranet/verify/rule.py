"""The replay rule: how a token is chosen, so that anyone holding the model can re-check it.

Greedy (temperature 0): the token with the highest logit. Sampling: the token with the highest
logit/T + g_i, where g_i is Gumbel noise derived only from sha256(seed, request id, position) —
never from a hidden RNG state — restricted to the top-p nucleus of softmax(logit/T). A verifier
recomputes the same noise and checks each claimed token with one forward pass.
Reported logprobs are always the model's own distribution, log_softmax(logits) at T = 1.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch

_DOMAIN = b"agora-gumbel-v1"


def gumbel_noise(seed: int, request_id: str, position: int, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise for one position, from SHAKE-256 keyed by sha256(seed, request id, position)."""
    return gumbel_noise_rows(seed, request_id, [position], vocab_size)[0]


def gumbel_noise_rows(seed: int, request_id: str, positions: list[int], vocab_size: int) -> torch.Tensor:
    """`gumbel_noise` for several positions of one request, as one [positions, vocab] tensor (one numpy pass)."""
    head = _DOMAIN + struct.pack(">q", seed) + struct.pack(">I", len(request_id.encode())) + request_id.encode()
    stream = b"".join(
        hashlib.shake_256(hashlib.sha256(head + struct.pack(">Q", p)).digest()).digest(8 * vocab_size)
        for p in positions
    )
    words = np.frombuffer(stream, dtype=">u8").reshape(len(positions), vocab_size)
    uniform = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))  # in (0, 1)
    return torch.from_numpy(-np.log(-np.log(uniform))).to(torch.float32)


def nucleus_mask(scaled_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the smallest set of tokens whose probability reaches top_p (always ≥ 1 token).

    Works on one row of logits or a batch of rows (last dimension = vocabulary)."""
    if top_p >= 1.0:
        return torch.ones_like(scaled_logits, dtype=torch.bool)
    probs = torch.softmax(scaled_logits.float(), dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of strictly better tokens
    keep_sorted = before < top_p
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def token_scores(
    logits: torch.Tensor, *, temperature: float, top_p: float, seed: int, request_id: str, position: int
) -> torch.Tensor:
    """Per-token scores whose argmax is the chosen token (−inf outside the nucleus)."""
    logits = logits.float()
    if temperature <= 0.0:
        return logits
    scaled = logits / temperature
    scores = scaled + gumbel_noise(seed, request_id, position, logits.shape[-1])
    return scores.masked_fill(~nucleus_mask(scaled, top_p), float("-inf"))


def choose_token(
    logits: torch.Tensor, *, temperature: float, top_p: float, seed: int, request_id: str, position: int
) -> int:
    scores = token_scores(
        logits, temperature=temperature, top_p=top_p, seed=seed, request_id=request_id, position=position
    )
    return int(torch.argmax(scores).item())


def choose_tokens(
    logits: torch.Tensor, *, temperatures: list[float], top_ps: list[float], seeds: list[int],
    request_ids: list[str], positions: list[int],
) -> list[int]:
    """The rule for a batch of rows at once: row i gets exactly the token `choose_token` gives it.

    Rows are grouped by (temperature, top_p) so each group runs the same scalar arithmetic as one row
    alone; the row-wise kernels (softmax, sort, cumsum, argmax) do not mix rows."""
    logits = logits.float()
    chosen = [0] * logits.shape[0]
    groups: dict[tuple[float, float], list[int]] = {}
    for i, key in enumerate(zip(temperatures, top_ps)):
        groups.setdefault(key, []).append(i)
    for (temperature, top_p), rows in groups.items():
        sub = logits[rows]
        if temperature <= 0.0:
            scores = sub
        else:
            scaled = sub / temperature
            noise = torch.stack([gumbel_noise(seeds[i], request_ids[i], positions[i], sub.shape[-1]) for i in rows])
            scores = (scaled + noise).masked_fill(~nucleus_mask(scaled, top_p), float("-inf"))
        for i, token in zip(rows, torch.argmax(scores, dim=-1).tolist()):
            chosen[i] = int(token)
    return chosen
