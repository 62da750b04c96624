"""A node's observability: its own Prometheus registry, HTTP timing, role readings, and live traffic rates.

Each node app gets its own `CollectorRegistry` (never prometheus-client's global one), so several
nodes in one process — as in tests — never share or clash on a metric. Role readings are read at
scrape time from each role's optional `metrics()` (flat `{name: number}`; names ending in `_total`
are counters, the rest gauges) and `collect_metrics()` (ready Prometheus families, for labelled ones
such as verdicts by outcome or latency by upstream provider).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["NodeMetrics", "TrafficWindow", "role_name"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
INFERENCE_PREFIX = "/v1/"  # "traffic" on the dashboard: POSTs to the OpenAI API (not model lists or page polls)


def role_name(role: Any) -> str:
    """A role's short name: its `role_name`, else its class name without "Role" (LogRole -> log)."""
    name = getattr(role, "role_name", None) or type(role).__name__.removesuffix("Role")
    return str(name).lower()


class TrafficWindow:
    """Rates and latency percentiles over the last `window_s` seconds, for the dashboard's live view."""

    def __init__(self, window_s: float = 30.0, max_events: int = 100_000) -> None:
        self.window_s = window_s
        self._latencies: deque[tuple[float, float]] = deque(maxlen=max_events)  # (finished at, seconds)
        self._samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=256)  # counter snapshots
        self.requests_total = 0
        self.errors_total = 0

    def observe(self, seconds: float, status: int, now: float | None = None) -> None:
        self._latencies.append((time.monotonic() if now is None else now, seconds))
        self.requests_total += 1
        self.errors_total += status >= 400

    def snapshot(self, counters: dict[str, float], now: float | None = None) -> dict[str, Any]:
        """Live traffic given the roles' counters now: requests/s, tokens/s and p50/p99 over the window."""
        now = time.monotonic() if now is None else now
        current = counters | {"requests_total": self.requests_total, "errors_total": self.errors_total}
        while self._latencies and self._latencies[0][0] < now - self.window_s:
            self._latencies.popleft()
        # The oldest snapshot inside the window is the base of every rate (one per second at most).
        if not self._samples or now - self._samples[-1][0] >= 1.0:
            self._samples.append((now, current))
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
        base_t, base = self._samples[0]
        span = now - base_t

        def rate(key: str) -> float:
            return round((current.get(key, 0) - base.get(key, 0)) / span, 3) if span > 0 else 0.0

        latencies = sorted(s for _, s in self._latencies)
        # A gateway's tokens are what it relayed (its own provider's are among them); else the provider's.
        tokens = "gateway_completion_tokens_total" if "gateway_completion_tokens_total" in current \
            else "completion_tokens_total"
        in_flight = "gateway_requests_in_flight" if "gateway_requests_in_flight" in current else "requests_in_flight"
        return {
            "window_s": self.window_s,
            "requests_per_s": rate("requests_total"),
            "tokens_per_s": rate(tokens),
            "p50_ms": _percentile_ms(latencies, 0.50),
            "p99_ms": _percentile_ms(latencies, 0.99),
            "requests_total": self.requests_total,
            "errors_total": self.errors_total,
            "completion_tokens_total": current.get(tokens, 0),
            "prompt_tokens_total": current.get(tokens.replace("completion", "prompt"), 0),
            "in_flight": current.get(in_flight, 0),
        }


def _percentile_ms(sorted_seconds: list[float], q: float) -> float | None:
    if not sorted_seconds:
        return None
    index = min(len(sorted_seconds) - 1, max(0, math.ceil(q * len(sorted_seconds)) - 1))  # nearest rank
    return round(sorted_seconds[index] * 1000, 2)


class NodeMetrics:
    """The Prometheus registry of one node app, the HTTP middleware that times it, and its traffic window."""

    def __init__(self, roles: list[Any], node_labels: dict[str, str]) -> None:
        self.roles = roles  # the app's live list: a role added later is read too
        self.registry = CollectorRegistry(auto_describe=True)
        self.traffic = TrafficWindow()
        self.http_requests = Counter("agora_http_requests", "HTTP requests answered, by route template",
                                     ["route", "method", "status"], registry=self.registry)
        self.http_latency = Histogram("agora_http_request_duration_seconds",
                                      "Time from request to the last byte of the response (whole stream)",
                                      ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_RoleCollector(self, node_labels))

    def counters(self) -> dict[str, float]:
        """Every role's `*_total` readings summed by name (the traffic window's rates come from these)."""
        out: dict[str, float] = {}
        for _, readings in self.readings():
            for key, value in readings.items():
                out[key] = out.get(key, 0) + value
        return out

    def readings(self) -> Iterator[tuple[str, dict[str, float]]]:
        for role in self.roles:
            if callable(fn := getattr(role, "metrics", None)):
                yield role_name(role), fn()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_latency.labels(route, method).observe(seconds)
        if method == "POST" and route.startswith(INFERENCE_PREFIX):
            self.traffic.observe(seconds, status)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        return _TimingMiddleware(app, self)


class _TimingMiddleware:
    """Times each HTTP request to its response's last byte, labelled by the route template that matched."""

    def __init__(self, app: ASGIApp, metrics: NodeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.observe(route, scope["method"], status, time.perf_counter() - started)

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, timed_send)
        finally:
            record()  # a client that hung up mid-stream still counts, with the time it was served


class _RoleCollector(Collector):
    """Reads every role's `metrics()` and `collect_metrics()` when Prometheus scrapes."""

    def __init__(self, metrics: NodeMetrics, node_labels: dict[str, str]) -> None:
        self.metrics, self.node_labels = metrics, node_labels

    def describe(self) -> Iterable[Metric]:
        return []  # readings come and go with roles; nothing to describe up front

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily("agora_node_info", "This node's identity and roles (always 1)",
                                 labels=list(self.node_labels))
        info.add_metric(list(self.node_labels.values()), 1)
        yield info
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for role, readings in self.metrics.readings():
            for key, value in readings.items():
                name = "agora_" + key
                family = families.get(name)
                if family is None:
                    if key.endswith("_total"):
                        family = CounterMetricFamily(name.removesuffix("_total"), f"{key} (counter)",
                                                     labels=["role"])
                    else:
                        family = GaugeMetricFamily(name, f"{key} (gauge)", labels=["role"])
                    families[name] = family
                family.add_metric([role], float(value))
        yield from families.values()
        for role in self.metrics.roles:
            if callable(fn := getattr(role, "collect_metrics", None)):
                yield from fn()
