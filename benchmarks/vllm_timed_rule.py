"""Stopwatches inside vLLM's engine, for benchmarks/provider_batching.py --engine vllm --time-apply.

vLLM loads them with `--logits-processors vllm_timed_rule:<Class>` (this folder on PYTHONPATH):

  TimedAgoraRule  agoranet.engine.vllm_rule:AgoraRule, timed: what the processor's `apply` takes per step
  TimedNoop       a processor that changes nothing (the plain server's): only the step clock

Each step's logits pass through `apply` once, so the time from one call's start to the next is the engine's
step period (scheduling, the model's forward pass, sampling, output handling). Every call on a step with
requests adds "<rows> <apply µs> <µs since the previous call started> <1 if a row was under the rule>" to the
file named by AGORA_RULE_TIMES
(64 lines at a time: a file write per step would be timed as part of the step). Comparing the two servers'
periods at the same batch size measures the rule's cost inside the engine, away from the HTTP noise of a
shared machine; the stopwatch itself costs two clock reads and an append per step.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from agoranet.engine.vllm_rule import AgoraRule

try:
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1
except ImportError:  # imported outside vLLM (a lint or a test): TimedNoop is only loaded by vLLM
    _V1 = object  # type: ignore[misc, assignment]

_OUT = os.environ.get("AGORA_RULE_TIMES")


class _Stopwatch:
    _start: float | None = None
    _lines: list[str] = []

    def _record(self, rows: int, t0: float, t1: float, ruled: bool) -> None:
        if not _OUT:
            return
        period = (t0 - _Stopwatch._start) * 1e6 if _Stopwatch._start is not None else -1.0
        _Stopwatch._start = t0
        self._lines.append(f"{rows} {(t1 - t0) * 1e6:.1f} {period:.1f} {int(ruled)}\n")
        if len(self._lines) >= 64:
            with open(_OUT, "a") as f:
                f.writelines(self._lines)
            self._lines.clear()


class TimedAgoraRule(_Stopwatch, AgoraRule):  # type: ignore[misc, valid-type]
    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().apply(logits, ctx)
        self._record(logits.shape[0], t0, time.perf_counter(), bool(self._batch or self._slots))
        return out


class TimedNoop(_Stopwatch, _V1):  # type: ignore[misc, valid-type]
    def __init__(self, *args: Any) -> None:
        pass

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return False  # called on every step, greedy or not

    def update_state(self, batch_update: Any) -> None:
        pass

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        t0 = time.perf_counter()
        self._record(logits.shape[0], t0, t0, False)
        return logits
