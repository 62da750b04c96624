"""What a gateway counts of the traffic it routes: Prometheus metrics, and the figures its dashboard shows.

Names follow vLLM's (`vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`,
`vllm:request_success_total` …) with an `agora_gateway_` prefix instead of `vllm:`: Prometheus reserves
colons in metric names for recording rules, so exporters use underscores. Providers are labelled by
peer id (the key their receipts are signed with), models by name. Credits are micro-credits (µcr).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

__all__ = ["GatewayMetrics", "PartOutcome", "TTFT_BUCKETS", "ITL_BUCKETS"]

# vLLM's buckets for the same two histograms, so dashboards built for one read the other alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
RECENT = 2048  # requests kept for the dashboard's latency percentiles

# What became of one attempt at one provider: served, or why the gateway moved on.
PartOutcome = str  # "ok" | "unreachable" | "error" | "busy" | "bad_receipt" | "broken_stream" | "rejected"


@dataclass
class ProviderTotals:
    """One provider's traffic through this gateway, for the dashboard (Prometheus has the same as counters)."""

    requests: int = 0  # attempts routed to it, whatever became of them
    served: int = 0
    errors: int = 0  # attempts that failed at the provider (not requests it rightly refused)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    charged: int = 0  # µcr its receipts charged


class GatewayMetrics:
    """A gateway's own registry (collected into the node's /metrics) and its per-provider totals."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("agora_gateway_requests", "Requests answered by the gateway, by kind and outcome "
                                "(ok, or the error code the client got)", ["kind", "outcome"], registry=r)
        self.provider_requests = Counter(
            "agora_gateway_provider_requests", "Attempts routed to each provider, by outcome (ok, unreachable, "
            "error, busy, bad_receipt, broken_stream, rejected)", ["provider", "model", "outcome"], registry=r)
        self.provider_prompt_tokens = Counter("agora_gateway_provider_prompt_tokens",
                                              "Prompt tokens each provider's receipts state", ["provider", "model"],
                                              registry=r)
        self.provider_completion_tokens = Counter("agora_gateway_provider_completion_tokens",
                                                  "Completion tokens each provider's receipts state",
                                                  ["provider", "model"], registry=r)
        self.provider_charged = Counter("agora_gateway_provider_charged_microcredits",
                                        "Micro-credits each provider's receipts charged", ["provider"], registry=r)
        self.ttft = Histogram("agora_gateway_time_to_first_token_seconds",
                              "From opening a provider's stream to its first token", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("agora_gateway_inter_token_latency_seconds",
                             "Between consecutive tokens of a stream, as relayed", ["model"],
                             buckets=ITL_BUCKETS, registry=r)
        self.duration = Histogram("agora_gateway_request_duration_seconds",
                                  "From a request's arrival to its last byte (failovers included)", ["kind"],
                                  buckets=REQUEST_BUCKETS, registry=r)
        self.failovers = Counter("agora_gateway_failovers", "Streams continued on another provider mid-answer",
                                 registry=r)
        self.credits_moved = Counter("agora_gateway_credits_moved_microcredits",
                                     "Micro-credits settled out of requests' holds, by destination "
                                     "(provider, verifier, refund)", ["to"], registry=r)
        self.providers: dict[str, ProviderTotals] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._recent: deque[tuple[float, float | None, float]] = deque(maxlen=RECENT)  # (at, ttft s, duration s)

    def of(self, peer: str) -> ProviderTotals:
        return self.providers.setdefault(peer, ProviderTotals())

    def part(self, peer: str, model: str, outcome: PartOutcome) -> None:
        """One attempt at one provider ended (`ok`: its receipt came; else why the gateway moved on)."""
        self.provider_requests.labels(peer, model, outcome).inc()
        totals = self.of(peer)
        totals.requests += 1
        totals.served += outcome == "ok"
        totals.errors += outcome not in ("ok", "rejected", "busy")

    def receipt(self, peer: str, model: str, *, prompt_tokens: int, completion_tokens: int, charged: int) -> None:
        """What a provider's accepted receipt states: its tokens and its charge."""
        self.provider_prompt_tokens.labels(peer, model).inc(prompt_tokens)
        self.provider_completion_tokens.labels(peer, model).inc(completion_tokens)
        self.provider_charged.labels(peer).inc(charged)
        totals = self.of(peer)
        totals.prompt_tokens += prompt_tokens
        totals.completion_tokens += completion_tokens
        totals.charged += charged
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def finished(self, kind: str, outcome: str, duration_s: float, ttft_s: float | None = None) -> None:
        """A client's request ended: `ok`, or the error code it got."""
        self.requests.labels(kind, outcome).inc()
        self.duration.labels(kind).observe(duration_s)
        if outcome == "ok":
            self._recent.append((time.monotonic(), ttft_s, duration_s))

    def settled(self, payments: Iterable[tuple[str, int]], refunded: int) -> None:
        for account, amount in payments:
            self.credits_moved.labels(account.split(":", 1)[0]).inc(amount)
        if refunded > 0:
            self.credits_moved.labels("refund").inc(refunded)

    def latency(self, window_s: float) -> dict[str, Any]:
        """Percentiles of the requests served in the last `window_s` seconds, in ms."""
        since = time.monotonic() - window_s
        recent = [(ttft, d) for at, ttft, d in self._recent if at >= since]
        ttfts = sorted(t for t, _ in recent if t is not None)
        durations = sorted(d for _, d in recent)
        return {"window_s": window_s, "requests": len(recent),
                "ttft_p50_ms": _percentile_ms(ttfts, 0.5), "ttft_p95_ms": _percentile_ms(ttfts, 0.95),
                "p50_ms": _percentile_ms(durations, 0.5), "p95_ms": _percentile_ms(durations, 0.95),
                "p99_ms": _percentile_ms(durations, 0.99)}

    def collect(self, standing: dict[str, Any]) -> Iterable[Metric]:
        """This registry's metrics, and the verifiers' verdicts on each provider as the gateway last read them."""
        yield from self.registry.collect()
        verdicts = GaugeMetricFamily("agora_gateway_provider_verdicts",
                                     "Receipts of each provider the gateway's verifiers judged, by outcome",
                                     labels=["provider", "outcome"])
        excluded = GaugeMetricFamily("agora_gateway_provider_excluded",
                                     "1 when a verifier holds a fraud proof or violation against the provider", labels=["provider"])
        for peer, s in standing.items():
            verdicts.add_metric([peer, "passed"], s.passed)
            verdicts.add_metric([peer, "failed"], s.verified - s.passed - len(s.violations))
            verdicts.add_metric([peer, "violation"], len(s.violations))  # unjudgeable by the provider's doing
            excluded.add_metric([peer], int(s.excluded))
        yield verdicts
        yield excluded


def _percentile_ms(sorted_seconds: list[float], q: float) -> float | None:
    if not sorted_seconds:
        return None
    index = min(len(sorted_seconds) - 1, max(0, math.ceil(q * len(sorted_seconds)) - 1))  # nearest rank
    return round(sorted_seconds[index] * 1000, 1)
