"""Load: many concurrent streaming clients through one gateway to two providers, for a while.

Starts two providers on the stub engine (canned tokens, no model: what is measured is HTTP, SSE,
receipts, routing and the gateway's memory) and a gateway that finds them by gossip, each in its own
process on 127.0.0.1. Then `--clients` clients each stream chat completions back to back for
`--duration` seconds. Reports the error rate (any non-200, error chunk, missing receipt or [DONE],
or exception), p50/p99 time to first token and to the last byte, and the gateway's resident memory
after warm-up, in the middle and at the end. Goal: 0 errors and flat memory (end within 10% + 16 MiB
of the mid-run sample, so steady state does not grow).

    python benchmarks/load.py [--clients 500] [--duration 60] [--tokens 16] [--warmup 5] [--missed-heartbeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import httpx

from agoranet.net.gossip import GossipConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import free_port, pct, wait  # noqa: E402  (the same process pattern)

SRC = Path(__file__).resolve().parent.parent / "src"


def serve(role: str, home: Path, port: int, seed: str | None, missed_heartbeats: int) -> None:
    from agoranet.core.identity import Identity
    from agoranet.engine.stub import StubEngine
    from agoranet.node.gateway import GatewayConfig
    from agoranet.node.node import ProviderOptions, build_gateway_node, build_provider_node
    from agoranet.node.server import bind, serve_forever, url_of

    Identity.load_or_create(home / "identity.key")
    sock = bind("127.0.0.1", port)
    # The defaults `agora provide` and `agora gateway` run with, unless --missed-heartbeats says otherwise.
    gossip = GossipConfig(missed_heartbeats=missed_heartbeats)
    if role == "provider":
        app, _ = build_provider_node(home, url_of(sock), ProviderOptions(pricing={"max_concurrency": 1024}),
                                     peers=[seed] if seed else None, gossip=gossip,
                                     engine=StubEngine(model_name="stub"))
    else:
        # A loaded 2-core box can leave a stream silent for seconds; that is latency, not a dead provider.
        app, _ = build_gateway_node(home, url_of(sock), [], gossip=gossip,
                                    config=GatewayConfig(stall_timeout_s=60.0, connect_timeout_s=30.0))
    sock.listen(4096)  # 500 clients connecting at once overflow the default backlog
    serve_forever(app, sock, log_level="warning")


def spawn(role: str, home: Path, port: int, missed_heartbeats: int, seed: str | None = None):
    import subprocess

    args = [sys.executable, __file__, "--serve", role, "--home", str(home), "--port", str(port),
            "--missed-heartbeats", str(missed_heartbeats)]
    return subprocess.Popen(args + (["--seed", seed] if seed else []), env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin"})


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_fd_limit(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))  # children (the nodes) inherit it
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.ttft_ms: list[float] = []
        self.total_ms: list[float] = []

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def stream_once(client: httpx.AsyncClient, tokens: int, tally: Tally, record: bool) -> None:
    body = {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "stream": True}
    started = time.perf_counter()
    first = None
    done = receipt = False
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return tally.error(f"http_{r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return tally.error("error_chunk")
                first = first or time.perf_counter()
                receipt = receipt or "receipt_cid" in (chunk.get("agora") or {})
    except httpx.HTTPError as exc:
        return tally.error(type(exc).__name__)
    if not (done and receipt):
        return tally.error("no_done" if not done else "no_receipt")
    if record:
        tally.ok += 1
        tally.ttft_ms.append(((first or time.perf_counter()) - started) * 1000)
        tally.total_ms.append((time.perf_counter() - started) * 1000)


async def drive(url: str, clients: int, duration: float, warmup: float, tokens: int, on_tick) -> Tally:
    tally = Tally()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(120.0, connect=60.0, pool=120.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.monotonic()
        measure_from, stop_at = start + warmup, start + warmup + duration

        async def user() -> None:
            while (now := time.monotonic()) < stop_at:
                await stream_once(client, tokens, tally, record=now >= measure_from)

        async def ticker() -> None:
            while time.monotonic() < stop_at:
                await asyncio.sleep(1.0)
                on_tick(time.monotonic() - measure_from)

        async with asyncio.TaskGroup() as group:
            group.create_task(ticker())
            for _ in range(clients):
                group.create_task(user())
    return tally


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve")
    ap.add_argument("--home", type=Path)
    ap.add_argument("--port", type=int)
    ap.add_argument("--seed")
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--duration", type=float, default=60.0, help="measured seconds, after --warmup")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--missed-heartbeats", type=int, default=GossipConfig().missed_heartbeats, help="gossip: heartbeats missed before eviction")
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.home, a.port, a.seed, a.missed_heartbeats)
    fds = raise_fd_limit(4 * a.clients + 1024)
    with tempfile.TemporaryDirectory(prefix="agora-load-") as tmp:
        gp = free_port()
        gw = f"http://127.0.0.1:{gp}"
        procs = [spawn("gateway", Path(tmp) / "gw", gp, a.missed_heartbeats)]
        procs += [spawn("provider", Path(tmp) / f"p{i}", free_port(), a.missed_heartbeats, seed=gw) for i in range(2)]
        try:
            wait(gw, "/agora/v1/providers", lambda j: len(j["providers"]) == 2)
            gw_pid = procs[0].pid
            samples: list[tuple[float, float]] = []  # (seconds into the measured run, gateway RSS MiB)

            def tick(t: float) -> None:
                if t >= 0 and (not samples or t - samples[-1][0] >= 5.0):
                    samples.append((t, rss_mib(gw_pid)))

            print(f"{a.clients} streaming clients, {a.tokens} tokens each, {a.warmup:.0f}s warm-up + "
                  f"{a.duration:.0f}s measured; fd limit {fds}; gateway RSS before load {rss_mib(gw_pid):.1f} MiB")
            wall = time.monotonic()
            tally = asyncio.run(drive(gw, a.clients, a.duration, a.warmup, a.tokens, tick))
            wall = time.monotonic() - wall
            samples.append((a.duration, rss_mib(gw_pid)))
            providers = httpx.get(f"{gw}/agora/v1/providers").json()
        finally:
            for p in procs:
                p.terminate()
                p.wait()
    total = tally.ok + sum(tally.errors.values())
    start_rss, mid_rss, end_rss = samples[0][1], samples[len(samples) // 2][1], samples[-1][1]
    flat = end_rss <= mid_rss * 1.10 + 16
    print(f"requests {total} in {a.duration:.0f}s measured ({tally.ok / a.duration:.1f} streams/s, "
          f"{tally.ok * a.tokens / a.duration:.0f} tokens/s); errors {sum(tally.errors.values())} "
          f"({100 * sum(tally.errors.values()) / max(total, 1):.3f}%) {tally.errors or ''}")
    if tally.ok:
        print(f"time to first token p50 {pct(tally.ttft_ms, 0.5):.0f} ms  p99 {pct(tally.ttft_ms, 0.99):.0f} ms; "
              f"whole stream p50 {pct(tally.total_ms, 0.5):.0f} ms  p99 {pct(tally.total_ms, 0.99):.0f} ms")
    print("gateway RSS MiB: " + "  ".join(f"{t:.0f}s={m:.1f}" for t, m in samples))
    print(f"gateway RSS start {start_rss:.1f} MiB, mid {mid_rss:.1f} MiB, end {end_rss:.1f} MiB -> "
          f"{'flat' if flat else 'GROWING'}; served by provider: "
          f"{ {p['peer'][-6:]: p['served'] for p in providers['providers']} }, failovers {providers['failovers']}")
    print(f"[wall {wall:.0f}s]  goal: 0 errors and flat memory -> "
          f"{'MET' if not tally.errors and flat else 'NOT MET'}")


if __name__ == "__main__":
    main()
