"""Agora's sampling rule as a vLLM logits processor: vLLM computes the logits, the rule chooses the token.

Start vLLM (≥ 0.11; written against 0.32) with it, where this package is importable by vLLM's Python
(`pip install --no-deps agoranet` into vLLM's environment, or PYTHONPATH=…/src):

    python -m vllm.entrypoints.openai.api_server --model DIR \\
        --logits-processors agoranet.engine.vllm_rule:AgoraRule

A request opts in with `vllm_xargs` (vLLM's `SamplingParams.extra_args`):

    agora_seed, agora_request_id   what the rule's noise is drawn from (with the position)
    agora_temperature, agora_top_p the rule's sampling parameters (vLLM itself is asked for T = 0)
    agora_prompt_len               tokens of Agora's rendered prompt
    agora_prefix_len               tokens already generated (a failover continuation) sent after it
    agora_rule                     optional: RULE_DIGEST of the provider's rule; another one is refused

For every row of such a request, `verify.rule.choose_tokens` picks the token from the row's logits
(seed, request id, position = agora_prefix_len + tokens generated here), and every other token becomes
−inf, so whatever vLLM's own sampler does next it must pick the rule's token. vLLM's logprobs stay the
model's own (its default `--logprobs-mode raw_logprobs`, taken before logits processors). Requests
without the arguments are left alone.

`agora_force` (a token id) makes the processor choose that token instead: the provider's start-up probe,
which proves that the server really runs this processor.

One class serves both of vLLM's model runners: Model Runner V2 (`apply(logits, ctx)`, request slots) and
the legacy V1 runner (`apply(logits)`, `update_state`). It imports nothing of agoranet but the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agoranet.verify.rule import choose_tokens
from agoranet.verify.rules import RULE_DIGEST

_BASES: tuple[type, ...] = ()
try:  # Model Runner V2's interface (vLLM 0.3x)
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2

    _BASES += (_V2,)
except ImportError:  # older vLLM, or none (the rule stays importable and testable)
    pass
try:  # the legacy V1 runner's interface (vLLM ≥ 0.11; what the CPU build runs when Triton has no CPU backend)
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1

    _BASES += (_V1,)
except ImportError:
    pass

ARGS = ("agora_seed", "agora_request_id", "agora_temperature", "agora_top_p", "agora_prompt_len",
        "agora_prefix_len")
RULE_VERSION = 1  # bumped when the arguments change meaning
# RULE_DIGEST, the rule's own source hashed: a provider sends it (`agora_rule`) and the processor refuses
# requests whose rule differs from the one it runs, so a vLLM environment with another agoranet cannot sign
# tokens a verifier's replay would reject. Receipts record it beside the rule's name.


@dataclass(frozen=True)
class RuleArgs:
    """One request's arguments to the rule."""

    seed: int
    request_id: str
    temperature: float
    top_p: float
    prompt_len: int
    prefix_len: int
    force: int | None = None

    @property
    def vllm_prompt_len(self) -> int:
        """Tokens vLLM was sent before its first generated one: Agora's prompt, then the continued prefix."""
        return self.prompt_len + self.prefix_len


def parse_args(extra: dict[str, Any] | None) -> RuleArgs | None:
    """The rule's arguments from a request's `extra_args`; None when it has none; ValueError when malformed."""
    extra = extra or {}
    if (digest := extra.get("agora_rule")) is not None and digest != RULE_DIGEST:
        raise ValueError(f"this vLLM server runs another version of Agora's sampling rule ({RULE_DIGEST}, asked "
                         f"for {digest}): install the provider's agoranet in vLLM's environment and restart it")
    if "agora_force" in extra and not any(k in extra for k in ARGS):
        force = _int(extra, "agora_force")
        return RuleArgs(seed=0, request_id="", temperature=0.0, top_p=1.0, prompt_len=0, prefix_len=0, force=force)
    if not any(k in extra for k in ARGS):
        return None
    missing = [k for k in ARGS if k not in extra]
    if missing:
        raise ValueError(f"Agora's sampling rule needs vllm_xargs {', '.join(missing)} as well")
    request_id = extra["agora_request_id"]
    if not isinstance(request_id, str):
        raise ValueError("vllm_xargs agora_request_id must be a string")
    temperature, top_p = _float(extra, "agora_temperature"), _float(extra, "agora_top_p")
    if temperature < 0:
        raise ValueError("vllm_xargs agora_temperature must be ≥ 0")
    if not 0 < top_p <= 1:
        raise ValueError("vllm_xargs agora_top_p must be in (0, 1]")
    prompt_len, prefix_len = _int(extra, "agora_prompt_len"), _int(extra, "agora_prefix_len")
    if prompt_len < 0 or prefix_len < 0:
        raise ValueError("vllm_xargs agora_prompt_len and agora_prefix_len must be ≥ 0")
    return RuleArgs(seed=_int(extra, "agora_seed"), request_id=request_id, temperature=temperature, top_p=top_p,
                    prompt_len=prompt_len, prefix_len=prefix_len)


def _int(extra: dict[str, Any], key: str) -> int:
    value = extra[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"vllm_xargs {key} must be an integer")
    return value


def _float(extra: dict[str, Any], key: str) -> float:
    value = extra[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"vllm_xargs {key} must be a number")
    return float(value)


def apply_rule(logits: torch.Tensor, rows: list[tuple[int, RuleArgs, int]]) -> torch.Tensor:
    """For each (row, args, generated-so-far): the rule's token gets 0, every other token −inf (in place).

    One `choose_tokens` call for all the rule's rows of the step (the rule is row-wise, so a row gets the token
    it would get alone; on the CPU it runs mostly in numpy, see `verify.rule._choose_cpu`), then two in-place
    writes for the mask. benchmarks/provider_batching.py --engine vllm measures what it costs vLLM."""
    if not rows:
        return logits
    index = [row for row, _, _ in rows]
    tokens = [a.force for _, a, _ in rows]
    ruled = [i for i, (_, a, _) in enumerate(rows) if a.force is None]
    if ruled:
        picked = [index[i] for i in ruled]
        whole = picked == list(range(logits.shape[0]))
        # the rule's noise is made on the CPU: bring the rows there (nothing is copied on vLLM's CPU build, where
        # a step's rows are usually all the batch; on a GPU, rows × vocab floats per step), send back the mask
        sub = (logits if whole else logits[picked]).to("cpu", torch.float32)
        args = [rows[i][1] for i in ruled]
        chosen = choose_tokens(sub, temperatures=[a.temperature for a in args], top_ps=[a.top_p for a in args],
                               seeds=[a.seed for a in args], request_ids=[a.request_id for a in args],
                               positions=[a.prefix_len + rows[i][2] for a, i in zip(args, ruled)])
        for i, token in zip(ruled, chosen):
            tokens[i] = token
    tokens_t = torch.tensor(tokens, dtype=torch.long, device=logits.device)[:, None]
    if index == list(range(logits.shape[0])):  # every row of the step (the usual case): two whole-tensor writes
        logits.fill_(float("-inf")).scatter_(1, tokens_t, 0.0)
    else:
        rows_t = torch.tensor(index, dtype=torch.long, device=logits.device)
        logits.index_fill_(0, rows_t, float("-inf"))
        logits[rows_t, tokens_t[:, 0]] = 0.0
    return logits


class _Rule:
    """Agora's public sampling rule for the requests that ask for it (see the module's doc)."""

    def __init__(self, vllm_config: Any, *args: Any) -> None:
        # V2: (vllm_config, req_states); V1: (vllm_config, device, is_pin_memory). Neither is needed.
        self._slots: dict[int, RuleArgs] = {}  # V2: request slot → args
        self._batch: dict[int, tuple[RuleArgs, list[int]]] = {}  # V1: batch row → args, its output ids (live)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        parse_args(getattr(sampling_params, "extra_args", None))

    # -- Model Runner V2 ---------------------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        args = parse_args(getattr(sampling_params, "extra_args", None))
        if args is None:
            self._slots.pop(req_idx, None)
            return False
        self._slots[req_idx] = args
        return True

    def apply_staged_writes(self) -> None:
        pass

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if ctx is None:  # the V1 runner
            rows = [(row, args, len(out)) for row, (args, out) in self._batch.items()]
            return apply_rule(logits, rows)
        if not self._slots:
            return logits
        slots = ctx.expanded_idx_mapping.tolist()
        positions = ctx.pos.tolist()  # the position of the token fed; the one sampled follows it
        rows = []
        for row, (slot, pos) in enumerate(zip(slots, positions)):
            args = self._slots.get(slot)
            if args is None:
                continue
            generated = pos + 1 - args.vllm_prompt_len
            if generated >= 0:  # else a chunk of a prompt still being prefilled: nothing is sampled
                rows.append((row, args, generated))
        return apply_rule(logits, rows)

    # -- the legacy V1 runner ------------------------------------------------------------------------------

    def is_argmax_invariant(self) -> bool:
        return False  # it decides greedy requests' tokens too

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._batch.pop(index, None)
        for index, params, _prompt, output_ids in batch_update.added:
            args = parse_args(getattr(params, "extra_args", None))
            if args is None:
                self._batch.pop(index, None)
            else:
                self._batch[index] = (args, output_ids)
        for a, b, direction in batch_update.moved:
            held_a, held_b = self._batch.pop(a, None), self._batch.pop(b, None)
            if held_a is not None:
                self._batch[b] = held_a
            if held_b is not None and getattr(direction, "name", "") == "SWAP":
                self._batch[a] = held_b


# The class vLLM loads: the rule under whichever of vLLM's interfaces this vLLM has.
AgoraRule: type = type("AgoraRule", (_Rule, *_BASES), {"__module__": __name__, "__doc__": _Rule.__doc__})
