"""What a gateway costs: requests/s and added p50/p99 latency through it vs straight to the provider.

One run starts a provider on the stub engine (canned tokens, no model: only HTTP, receipts and routing
are measured) and a gateway that discovers it, each in its own process on 127.0.0.1, then measures
both paths alternately, with the CPU each process spent per request. Goal: ≥ 0.85× the direct
throughput and ≤ 2 ms added p50.

Two placements of the processes on the CPUs, each measured with its own direct anchor:
- shared: client, gateway and provider all float over every core. On a small machine the three
  compete for CPU, so the ratio mostly says how the gateway's CPU per request compares with the
  client's and the provider's.
- split: the gateway gets the last core to itself; the client and the provider share the others, in
  both arms alike. This is how a network runs (a gateway is not on its providers' machines), and it
  measures the hop itself: its latency and whether one gateway core keeps up.

    python benchmarks/gateway_overhead.py [--requests 300] [--concurrency 8] [--tokens 16]
        [--placement both|shared|split]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parent.parent / "src"


def serve(role: str, home: Path, port: int, seed: str | None) -> None:
    from agoranet.core.identity import Identity
    from agoranet.engine.stub import StubEngine
    from agoranet.net.gossip import GossipConfig
    from agoranet.node.node import ProviderOptions, build_gateway_node, build_provider_node
    from agoranet.node.server import bind, serve_forever, url_of

    Identity.load_or_create(home / "identity.key")
    sock = bind("127.0.0.1", port)
    gossip = GossipConfig(interval_s=0.3)
    if role == "provider":
        app, _ = build_provider_node(home, url_of(sock), ProviderOptions(pricing={"max_concurrency": 256}),
                                     peers=[seed] if seed else None, gossip=gossip,
                                     engine=StubEngine(model_name="stub"))
    else:
        app, _ = build_gateway_node(home, url_of(sock), [], gossip=gossip)
    serve_forever(app, sock, log_level="warning")


def spawn(role: str, home: Path, port: int, seed: str | None = None) -> subprocess.Popen:
    args = [sys.executable, __file__, "--serve", role, "--home", str(home), "--port", str(port)]
    return subprocess.Popen(args + (["--seed", seed] if seed else []), env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin"})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, path: str, ok, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + path, timeout=1)
            if r.status_code == 200 and ok(r.json()):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready")


def body(tokens: int) -> dict:
    return {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "seed": 1}


def latencies(url: str, n: int, tokens: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(n):
            t = time.perf_counter()
            r = c.post("/v1/chat/completions", json=body(tokens))
            out.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
    return out


async def throughput(url: str, n: int, concurrency: int, tokens: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=concurrency)) as c:
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                r = await c.post("/v1/chat/completions", json=body(tokens))
                assert r.status_code == 200, r.text

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - t)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin(pid: int, cores: set[int]) -> None:
    """Put every thread of a process on `cores` (threads started later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cores)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(urls: dict[str, str], pids: dict[str, int], a: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Medians over `a.rounds` alternating rounds of both paths: p50/p99 ms, req/s, CPU ms per request."""
    runs: dict[str, dict[str, list[float]]] = {k: {"p50": [], "p99": [], "rps": [], "gw_cpu": [], "prov_cpu": []}
                                               for k in urls}
    for _ in range(a.rounds):  # alternate, so drift in machine load hits both paths alike
        for name, url in urls.items():
            lat = latencies(url, a.requests, a.tokens)
            runs[name]["p50"].append(pct(lat, 0.5))
            runs[name]["p99"].append(pct(lat, 0.99))
            before = {k: cpu_s(p) for k, p in pids.items()}
            runs[name]["rps"].append(asyncio.run(throughput(url, a.requests, a.concurrency, a.tokens)))
            for k, p in pids.items():
                runs[name][f"{k}_cpu"].append((cpu_s(p) - before[k]) * 1000 / a.requests)
    return {k: {m: statistics.median(v) for m, v in r.items()} for k, r in runs.items()}


def report(placement: str, med: dict[str, dict[str, float]], a: argparse.Namespace) -> None:
    print(f"-- placement {placement}")
    for k, v in med.items():
        print(f"{k:8} p50 {v['p50']:6.2f} ms   p99 {v['p99']:6.2f} ms   {v['rps']:7.1f} req/s "
              f"(concurrency {a.concurrency})   CPU per request: provider {v['prov_cpu']:.2f} ms, "
              f"gateway {v['gw_cpu']:.2f} ms")
    ratio = med["gateway"]["rps"] / med["direct"]["rps"]
    added50 = med["gateway"]["p50"] - med["direct"]["p50"]
    added99 = med["gateway"]["p99"] - med["direct"]["p99"]
    print(f"throughput ratio {ratio:.2f}x (goal >= 0.85)   added p50 {added50:.2f} ms (goal <= 2)   "
          f"added p99 {added99:.2f} ms   [medians of {a.rounds} rounds, {a.requests} requests each, "
          f"{a.tokens} tokens per answer]")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve")
    ap.add_argument("--home", type=Path)
    ap.add_argument("--port", type=int)
    ap.add_argument("--seed")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--placement", choices=["both", "shared", "split"], default="both")
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.home, a.port, a.seed)
    cores = sorted(os.sched_getaffinity(0))
    placements = ["shared", "split"] if a.placement == "both" else [a.placement]
    if "split" in placements and len(cores) < 2:
        print("-- placement split needs at least 2 cores; skipped")
        placements.remove("split")
    print(f"{len(cores)} cores; gateway and provider each in their own process, stub engine")
    with tempfile.TemporaryDirectory(prefix="agora-bench-") as tmp:
        gp, pp = free_port(), free_port()
        gw, prov = f"http://127.0.0.1:{gp}", f"http://127.0.0.1:{pp}"
        procs = {"gw": spawn("gateway", Path(tmp) / "gw", gp)}
        procs["prov"] = spawn("provider", Path(tmp) / "p", pp, seed=gw)
        pids = {k: p.pid for k, p in procs.items()}
        try:
            wait(gw, "/v1/models", lambda j: bool(j["data"]))
            for placement in placements:
                if placement == "split":
                    rest = set(cores[:-1])
                    pin(pids["gw"], {cores[-1]})
                    pin(pids["prov"], rest)
                    pin(os.getpid(), rest)
                latencies(prov, 30, a.tokens), latencies(gw, 30, a.tokens)  # warm up both paths
                report(placement, measure({"direct": prov, "gateway": gw}, pids, a), a)
        finally:
            for p in procs.values():
                p.terminate()
                p.wait()


if __name__ == "__main__":
    main()
