"""Discovery at N nodes: HTTP gossip (the anchor) against libp2p (GossipSub + Kademlia DHT), same run.

Each node is its own process on 127.0.0.1 running discovery only (no engine): the node's HTTP app
with its gossip route, plus a few /bench routes to publish an offer and read what it has seen. A
libp2p node also runs its own go-libp2p daemon. Node 0 is everyone's seed (HTTP) or bootstrap peer
(libp2p); heartbeats every --interval seconds for both. Nodes 0 and N − 1 are gateways (they route,
so with libp2p they follow the topics of the models offered); the others run the provider role, 6 of
them selling a model each (the publishers), the rest selling nothing. Measured per implementation and N:
- offer propagation: the 6 publishers each sign a fresh offer for a new model; the delay until each
  other node holds it (p50/p95 over offers × nodes, and the worst time-to-all);
- idle CPU and RSS per node (the node's process plus its daemon) over --idle seconds, from --settle
  seconds after the gateways list every publisher (past each node's start-up: its first DHT
  announcements, the second one 10 s after it started, and its connections), so that only
  heartbeats (and republished offers) run: the mean over all nodes, and apart for gateways,
  publishers and the nodes that sell nothing;
- DHT lookup (libp2p): from 10 nodes, the time until findProviders names the first provider of each
  published model (p50/p95, misses), as a node's lookup uses it (it fetches records from each provider
  as it is named and answers at the first live offer);
- a killed provider (SIGKILL): time until no gateway lists it (it is routed to no more), in heartbeat
  intervals and seconds; then restarted with the same identity and offer: time until every gateway
  lists it again, counted from when its new process answers (its start-up, imports and daemon, is
  printed apart).
Goals (libp2p, N = 30): p95 propagation ≤ 100 ms, idle CPU ≤ 0.5 % per node, a killed provider
unrouted within 3 heartbeat intervals.

    python benchmarks/discovery.py [--nodes 10 30] [--impl http libp2p] [--interval 2.0] [--idle 20] [--settle 12]

BENCH_GOSSIPSUB_HEARTBEAT_MS=N in the environment starts every p2pd with that GossipSub heartbeat
instead of the node's default (3000).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parent.parent / "src"
PUBLISHERS = 6


# -- one node (a child process) ---------------------------------------------------------------------

def serve(impl: str, home: Path, port: int, interval: float, role: str, join: list[str]) -> None:
    import secrets
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    from agoranet.core.cid import RAW, cid_of
    from agoranet.core.identity import Identity
    from agoranet.core.records import OfferBody, OfferedModel, sign_record
    from agoranet.net.gossip import GossipConfig, GossipDiscovery
    from agoranet.node.network import NetworkRole
    from agoranet.node.server import bind, serve_forever
    from agoranet.verify.rules import RULE

    identity = Identity.load_or_create(home / "identity.key")
    url = f"http://127.0.0.1:{port}"
    config = GossipConfig(interval_s=interval)
    if impl == "libp2p":
        from agoranet.net.libp2p import LibP2PDiscovery, P2PConfig, model_key
        from agoranet.net.p2pd import DaemonOptions

        gossipsub = {"gossipsub_heartbeat_ms": int(os.environ["BENCH_GOSSIPSUB_HEARTBEAT_MS"])} \
            if os.environ.get("BENCH_GOSSIPSUB_HEARTBEAT_MS") else {}  # else the node's default

        d: GossipDiscovery = LibP2PDiscovery(identity, url, roles=[role], config=config,
                                             p2p=P2PConfig(daemon=DaemonOptions(bootstrap=tuple(join), **gossipsub)))
    else:
        d = GossipDiscovery(identity, url, join, roles=[role], config=config)
    seen: dict[str, float] = {}  # offer CID -> wall time this node first held it
    admit = d._admit_all  # both ways in (HTTP pushes checked off the loop, libp2p messages) end here

    def noting(checked: list, source: str) -> int:  # instrumentation: when each offer arrives
        kept = admit(checked, source)
        if kept:  # only the offers of this batch that were kept: idle CPU must not include the bench's own work
            now = time.time()
            for record in checked:
                if not isinstance(record, str) and record.type == OfferBody.record_type \
                        and (held := d.table.get((record.signer, record.type))) is not None and held.cid == record.cid:
                    seen.setdefault(str(record.cid), now)
        return kept

    d._admit_all = noting  # type: ignore[method-assign]
    network = NetworkRole(d)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await network.start()
        yield
        await network.stop()

    app = FastAPI(lifespan=lifespan)
    app.include_router(network.router)

    @app.post("/bench/offer")
    async def offer(model: str = "") -> dict:  # on the event loop, as discovery is used (announce is not thread-safe)
        now = int(time.time() * 1000)
        model = model or str(cid_of(secrets.token_bytes(16), RAW))
        record = sign_record(identity, OfferBody(
            url=url, models=[OfferedModel(cid=model, name=model[-8:], input_per_mtok=1, output_per_mtok=1,
                                          context_length=64)],
            precision="fp32", rule=RULE, max_concurrency=1, hardware="bench", engine="none", issued_ms=now,
            expires_ms=now + 3_600_000, nonce=secrets.token_hex(4)))
        t = time.time()
        d.announce(lambda: record)
        return {"cid": str(record.cid), "model": model, "t": t}

    @app.get("/bench/seen")
    async def seen_offers() -> dict:
        return seen

    @app.get("/bench/members")
    async def members() -> list[str]:
        return sorted(d.members())

    @app.get("/bench/peers")
    async def peers() -> dict:  # libp2p: connections, and peers subscribed to the global topic
        from agoranet.net.libp2p import GLOBAL_TOPIC

        client = d.daemon.client  # type: ignore[attr-defined]
        return {"connected": len({p.peer for p in await client.list_peers()}),  # one entry per connection
                "topic": len(await client.topic_peers(GLOBAL_TOPIC))}

    @app.get("/bench/lookup")
    async def lookup(model: str) -> dict:  # the DHT query a node's lookup runs, until it names a provider
        p2p: P2PConfig = d.p2p  # type: ignore[attr-defined]
        t = time.perf_counter()
        providers = d.daemon.client.providers(model_key(model), count=p2p.lookup_providers,  # type: ignore[attr-defined]
                                              timeout_s=p2p.lookup_timeout_s)
        found = 0
        try:
            async for _ in providers:
                found += 1
                break
        finally:
            await providers.aclose()
        return {"s": time.perf_counter() - t, "found": found}

    serve_forever(app, bind("127.0.0.1", port), log_level="warning")  # served as `agora node` serves


# -- the run ----------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, impl: str, home: Path, interval: float, join: list[str], role: str = "provider") -> None:
        self.impl, self.home, self.interval, self.join, self.role = impl, home, interval, join, role
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        args = [sys.executable, __file__, "--serve", self.impl, str(self.home), str(self.port), str(self.interval),
                self.role, *self.join]
        self.home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(SRC))
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                     stderr=(self.home / "node.log").open("ab"))

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {(self.home / 'node.log').read_text()[-2000:]}")
            try:
                return httpx.get(f"{self.url}/agora/v1/peers", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(f"node {self.url} not up")

    def pids(self) -> list[int]:
        """The node's process and its children (its p2pd)."""
        pids = [self.proc.pid]
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        return pids

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def all_members(client: httpx.AsyncClient, nodes: list[Node]) -> list[set[str]]:
    answers = await asyncio.gather(*(client.get(f"{n.url}/bench/members") for n in nodes), return_exceptions=True)
    return [set(a.json()) if isinstance(a, httpx.Response) else set() for a in answers]


async def peers_json(client: httpx.AsyncClient, nodes: list[Node]) -> list[dict]:
    answers = await asyncio.gather(*(client.get(f"{n.url}/bench/peers") for n in nodes), return_exceptions=True)
    return [a.json() if isinstance(a, httpx.Response) else {"connected": 0, "topic": 0} for a in answers]


async def until(check, timeout: float, what: str) -> float:
    """Seconds until `await check()` holds (TimeoutError naming `what` after `timeout`)."""
    t0 = time.monotonic()
    while not await check():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what} not within {timeout:.0f} s")
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


async def measure(impl: str, n: int, interval: float, idle_s: float, settle_s: float, root: Path) -> dict:
    load0 = os.getloadavg()[0]
    result: dict = {"impl": impl, "n": n}
    first = Node(impl, root / "n0", interval, [], role="gateway")
    info = first.wait_ready()
    join = info.get("multiaddrs", []) if impl == "libp2p" else [first.url]
    nodes = [first]
    for i in range(1, n):  # staggered: thirty interpreters importing at once starve a small machine
        nodes.append(Node(impl, root / f"n{i}", interval, join, role="gateway" if i == n - 1 else "provider"))
        time.sleep(0.5)
    gateways = [nodes[0], nodes[-1]]
    publishers = nodes[1:1 + PUBLISHERS]
    try:
        ids = [n_.wait_ready()["peer"] for n_ in nodes]
        everyone = set(ids)
        async with httpx.AsyncClient(timeout=15) as client:
            if impl == "http":  # every node heartbeats: all must list all
                async def converged() -> bool:
                    return all(v >= everyone for v in await all_members(client, nodes))
            else:  # only sellers heartbeat: the network has formed once every node hears the global topic
                async def converged() -> bool:
                    return all(p_["topic"] >= min(n - 1, 6) for p_ in await peers_json(client, nodes))
            try:
                result["converged_s"] = await until(converged, 180, f"{impl} N={n}: the network forming")
            except TimeoutError:
                views = await all_members(client, nodes)
                raise TimeoutError(f"{impl} N={n}: did not converge in 180 s; nodes missing peers: "
                                   f"{ {i: len(everyone - v) for i, v in enumerate(views) if not v >= everyone} }") from None

            published = []
            for p in publishers:
                published.append((p, (await client.post(f"{p.url}/bench/offer")).json()))
                await asyncio.sleep(1.0)
            deadline = time.monotonic() + 60
            while True:
                seen = [(await client.get(f"{n_.url}/bench/seen")).json() for n_ in nodes]
                if all(o["cid"] in s for s in seen for _, o in published) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            delays, to_all, missing = [], [], 0
            for p, o in published:
                mine = []
                for n_, s in zip(nodes, seen):
                    if n_ is p:
                        continue
                    if o["cid"] in s:
                        mine.append(max(0.0, s[o["cid"]] - o["t"]))
                    else:
                        missing += 1
                        stats = (await client.get(f"{n_.url}/agora/v1/peers")).json()
                        print(f"  missing: node {nodes.index(n_)} ({n_.role}) never held the offer of node "
                              f"{nodes.index(p)}; it rejected {stats.get('rejected')}, follows {stats.get('topics')}",
                              flush=True)
                delays += mine
                to_all.append(max(mine) if mine else float("nan"))
            result.update(prop_p50=pct(delays, 0.5), prop_p95=pct(delays, 0.95), prop_all_max=max(to_all),
                          prop_missing=missing)
            sellers = {ids[nodes.index(p)] for p in publishers}

            async def routed() -> bool:  # every gateway lists every publisher
                return all(v >= sellers for v in await all_members(client, gateways))
            result["routed_s"] = await until(routed, 60, f"{impl} N={n}: the gateways listing the publishers")

            await asyncio.sleep(settle_s)  # idle: nothing but heartbeats (and republished offers)
            pids = [n_.pids() for n_ in nodes]
            before = [sum(cpu_seconds(p) for p in ps) for ps in pids]
            python_before = [cpu_seconds(ps[0]) for ps in pids]
            t = time.monotonic()
            await asyncio.sleep(idle_s)
            elapsed = time.monotonic() - t
            spent = [100 * (sum(cpu_seconds(p) for p in ps) - b) / elapsed for ps, b in zip(pids, before)]
            python = [100 * (cpu_seconds(ps[0]) - b) / elapsed for ps, b in zip(pids, python_before)]
            by_role = {"gateway": [spent[nodes.index(g)] for g in gateways],
                       "publisher": [spent[nodes.index(p)] for p in publishers],
                       "plain": [c for n_, c in zip(nodes, spent) if n_ not in gateways and n_ not in publishers]}
            result["cpu_pct"] = statistics.mean(spent)
            result["cpu_python_pct"] = statistics.mean(python)
            result["cpu_by_role"] = {k: statistics.mean(v) if v else float("nan") for k, v in by_role.items()}
            result["rss_mib"] = statistics.mean(sum(rss_mib(p) for p in ps) for ps in pids)

            if impl == "libp2p":  # flood publishing reaches a publisher's connected topic peers in one hop
                peers = await peers_json(client, nodes)
                result.update(connected=statistics.mean(p_["connected"] for p_ in peers),
                              connected_min=min(p_["connected"] for p_ in peers))
                askers = random.sample([n_ for n_ in nodes if n_ not in publishers], min(10, n - PUBLISHERS))
                lookups = await asyncio.gather(*(client.get(f"{a.url}/bench/lookup", params={"model": o["model"]})
                                                 for a in askers for _, o in published))
                times = [r.json()["s"] for r in lookups]
                result.update(dht_p50=pct(times, 0.5), dht_p95=pct(times, 0.95),
                              dht_miss=sum(r.json()["found"] == 0 for r in lookups), dht_n=len(times))

            victim, victim_offer = published[0]
            victim_id = ids[nodes.index(victim)]
            victim.kill()
            t = time.monotonic()
            while any(victim_id in v for v in await all_members(client, gateways)):
                if time.monotonic() - t > 120:
                    break
                await asyncio.sleep(0.1)
            result["unrouted_s"] = time.monotonic() - t
            victim.start()
            t = time.monotonic()
            await asyncio.to_thread(victim.wait_ready)
            result["restart_s"] = time.monotonic() - t  # the process starting (imports, daemon), not discovery
            await client.post(f"{victim.url}/bench/offer", params={"model": victim_offer["model"]})  # it sells again
            t = time.monotonic()
            while not all(victim_id in v for v in await all_members(client, gateways)):
                if time.monotonic() - t > 120:
                    break
                await asyncio.sleep(0.1)
            result["rejoin_s"] = time.monotonic() - t
    finally:
        for n_ in nodes:
            n_.stop()
    result["load"] = (load0, os.getloadavg()[0])
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        impl, home, port, interval, role, *join = sys.argv[2:]
        serve(impl, Path(home), int(port), float(interval), role, join)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[10, 30])
    ap.add_argument("--impl", nargs="+", default=["http", "libp2p"], choices=["http", "libp2p"])
    ap.add_argument("--interval", type=float, default=2.0, help="heartbeat / gossip interval, seconds (CLI default)")
    ap.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measurement")
    ap.add_argument("--settle", type=float, default=12.0,
                    help="seconds from convergence to the idle measurement (start-up DHT announcements end)")
    args = ap.parse_args()
    print(f"discovery benchmark: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"interval {args.interval} s, {PUBLISHERS} publishers")
    rows = []
    for n in args.nodes:
        by_impl = {}
        for impl in args.impl:
            with tempfile.TemporaryDirectory(prefix=f"agora-bench-{impl}-") as tmp:
                try:
                    r = asyncio.run(measure(impl, n, args.interval, args.idle, args.settle, Path(tmp)))
                except TimeoutError as exc:  # a figure in itself: say so and go on with the other implementation
                    print(f"{impl:7} N={n:3}: {exc} (load {os.getloadavg()[0]:.1f})", flush=True)
                    continue
            by_impl[impl] = r
            rows.append(r)
            dht = (f"; DHT lookup p50 {r['dht_p50'] * 1000:.0f} ms / p95 {r['dht_p95'] * 1000:.0f} ms, "
                   f"{r['dht_miss']}/{r['dht_n']} missed; connected to {r['connected']:.1f} peers per node "
                   f"(fewest {r['connected_min']})") if "dht_p50" in r else ""
            print(f"{impl:7} N={n:3}: propagation p50 {r['prop_p50'] * 1000:.0f} ms / p95 {r['prop_p95'] * 1000:.0f} ms "
                  f"(all nodes within {r['prop_all_max'] * 1000:.0f} ms, {r['prop_missing']} missing){dht}; "
                  f"idle CPU {r['cpu_pct']:.2f} %/node ({r['cpu_python_pct']:.2f} the Python process; gateways "
                  f"{r['cpu_by_role']['gateway']:.2f}, publishers {r['cpu_by_role']['publisher']:.2f}, the others "
                  f"{r['cpu_by_role']['plain']:.2f}), RSS {r['rss_mib']:.0f} MiB/node; killed provider unrouted by the gateways "
                  f"after {r['unrouted_s']:.1f} s ({r['unrouted_s'] / args.interval:.1f} intervals), listed again by them "
                  f"{r['rejoin_s']:.1f} s after its restarted process was up ({r['restart_s']:.1f} s) and offered again; "
                  f"converged {r['converged_s']:.1f} s; load {r['load'][0]:.1f}→"
                  f"{r['load'][1]:.1f}", flush=True)
        if {"http", "libp2p"} <= set(by_impl):
            h, p = by_impl["http"], by_impl["libp2p"]
            print(f"  N={n} libp2p / http: propagation p95 {p['prop_p95'] / h['prop_p95']:.3f}×, idle CPU "
                  f"{p['cpu_pct'] / h['cpu_pct']:.2f}×, RSS {p['rss_mib'] / h['rss_mib']:.2f}×, unrouted "
                  f"{p['unrouted_s'] / h['unrouted_s']:.2f}×", flush=True)
    goal = [r for r in rows if r["impl"] == "libp2p" and r["n"] == 30]
    for r in goal:
        print(f"goals (libp2p, N=30): p95 ≤ 100 ms: {'met' if r['prop_p95'] <= 0.1 else 'NOT met'}; idle CPU ≤ 0.5 %: "
              f"{'met' if r['cpu_pct'] <= 0.5 else 'NOT met'}; unrouted ≤ 3 intervals: "
              f"{'met' if r['unrouted_s'] <= 3 * args.interval else 'NOT met'}")


if __name__ == "__main__":
    main()
