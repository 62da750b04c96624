"""What a gateway costs: requests/s and added p50/p99 latency through it vs straight to the provider.

One run starts a provider on the stub engine (canned tokens, no model: only HTTP, receipts and routing
are measured) and a gateway that discovers it, each in its own process on 127.0.0.1, then measures
both paths alternately. Goal: ≥ 0.85× the direct throughput and ≤ 2 ms added p50.

    python benchmarks/gateway_overhead.py [--requests 300] [--concurrency 8] [--tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
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


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


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
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.home, a.port, a.seed)
    with tempfile.TemporaryDirectory(prefix="agora-bench-") as tmp:
        gp, pp = free_port(), free_port()
        gw, prov = f"http://127.0.0.1:{gp}", f"http://127.0.0.1:{pp}"
        procs = [spawn("gateway", Path(tmp) / "gw", gp)]
        procs.append(spawn("provider", Path(tmp) / "p", pp, seed=gw))
        try:
            wait(gw, "/v1/models", lambda j: bool(j["data"]))
            latencies(prov, 30, a.tokens), latencies(gw, 30, a.tokens)  # warm up both paths
            p50s, p99s, rps = {"direct": [], "gateway": []}, {"direct": [], "gateway": []}, {"direct": [], "gateway": []}
            for _ in range(a.rounds):  # alternate, so drift in machine load hits both paths alike
                for name, url in (("direct", prov), ("gateway", gw)):
                    lat = latencies(url, a.requests, a.tokens)
                    p50s[name].append(pct(lat, 0.5))
                    p99s[name].append(pct(lat, 0.99))
                    rps[name].append(asyncio.run(throughput(url, a.requests, a.concurrency, a.tokens)))
        finally:
            for p in procs:
                p.terminate()
                p.wait()
    med = {k: {m: statistics.median(v[k]) for m, v in (("p50", p50s), ("p99", p99s), ("rps", rps))}
           for k in ("direct", "gateway")}
    for k, v in med.items():
        print(f"{k:8} p50 {v['p50']:6.2f} ms   p99 {v['p99']:6.2f} ms   {v['rps']:7.1f} req/s "
              f"(concurrency {a.concurrency})")
    ratio = med["gateway"]["rps"] / med["direct"]["rps"]
    added50 = med["gateway"]["p50"] - med["direct"]["p50"]
    added99 = med["gateway"]["p99"] - med["direct"]["p99"]
    print(f"throughput ratio {ratio:.2f}x (goal >= 0.85)   added p50 {added50:.2f} ms (goal <= 2)   "
          f"added p99 {added99:.2f} ms   [medians of {a.rounds} rounds, {a.requests} requests each, "
          f"{a.tokens} tokens per answer]")


if __name__ == "__main__":
    main()
