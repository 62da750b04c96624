"""Adversarial storm: a gateway, two honest providers and a verifier under combined attack.

Real nodes, each in its own process on 127.0.0.1: a gateway that charges credits and hands receipts to a
verifier, two honest providers on the bundled model, and the verifier. Honest clients send chat requests
(half streamed) back to back: first in calm (`--calm` seconds, the latency anchor), then for `--seconds`
under a storm from this process:

- gossip flood: signed offers + heartbeats from fresh keys every second, free, at dead URLs (dead sybils);
- expensive sybils: offers at an absurd price;
- abandoned streams: an attacker's key that reads a few tokens of each stream and disconnects;
- poisoned receipts: a provider that served once honestly, then answers with made-up text and its old
  receipt; the old receipt is also pushed to the verifier again and again.

Prints the honest success rate (goal >= 99%), whether each honest provider's paid earnings equal the
charges of the receipts it signed, gateway p99 latency under storm vs calm (goal <= 2x) and the
gateway's RSS at start and end (goal: flat).

    python benchmarks/adversarial.py [--seconds 60] [--calm 15] [--clients 4] [--flood 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import free_port, pct, wait  # noqa: E402  (the same process pattern)
from load import rss_mib  # noqa: E402

SRC = Path(__file__).resolve().parent.parent / "src"
MAX_TOKENS = 16
PROMPTS = ["write a function that adds two numbers", "def fib(n):", "import os\nfor name in", "class Stack:"]


def serve(role: str, home: Path, port: int, seed: str | None, verifier: str | None) -> None:
    """One node of the network, in this process (run by `spawn`)."""
    from agoranet.core.identity import Identity
    from agoranet.log.credits import user
    from agoranet.net.gossip import GossipConfig
    from agoranet.node.gateway import GatewayConfig
    from agoranet.node.node import ProviderOptions, build_gateway_node, build_provider_node, build_verifier_node
    from agoranet.node.server import bind, serve_forever, url_of
    from agoranet.node.verifier import VerifierConfig

    Identity.load_or_create(home / "identity.key")
    sock = bind("127.0.0.1", port)
    gossip = GossipConfig(interval_s=1.0)
    if role == "provider":
        app, _ = build_provider_node(home, url_of(sock), ProviderOptions(threads=1), peers=[seed] if seed else None,
                                     gossip=gossip)
    elif role == "verifier":
        app, _ = build_verifier_node(home, VerifierConfig(audit_fraction=0.2))
    else:
        # A loaded 2-core box can leave a stream silent for seconds; that is latency, not a dead provider.
        app, gateway = build_gateway_node(home, url_of(sock), [], gossip=gossip, config=GatewayConfig(
            charge_credits=True, verifiers=(verifier,) if verifier else (), stall_timeout_s=60.0,
            connect_timeout_s=30.0))
        for name in ("honest", "attacker"):  # the benchmark reads the keys' secrets from the gateway's home
            key, secret = gateway.keys.create(name)
            gateway.credits.ledger.mint(10**12)
            gateway.credits.ledger.fund(user(key.id), 10**12)
            (home / f"{name}.secret").write_text(secret)
    sock.listen(1024)
    serve_forever(app, sock, log_level="warning")


def spawn(role: str, home: Path, port: int, *, seed: str | None = None, verifier: str | None = None):
    home.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, __file__, "--serve", role, "--home", str(home), "--port", str(port)]
    args += ["--seed", seed] if seed else []
    args += ["--verifier", verifier] if verifier else []
    return subprocess.Popen(args, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin", "AGORA_HOME": str(home)},
                            stdout=(home / "node.log").open("wb"), stderr=subprocess.STDOUT)


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.failed: dict[str, int] = {}
        self.latency_ms: list[float] = []

    def fail(self, why: str) -> None:
        self.failed[why] = self.failed.get(why, 0) + 1

    @property
    def total(self) -> int:
        return self.ok + sum(self.failed.values())


async def honest_request(client: httpx.AsyncClient, url: str, secret: str, honest: set[str], tally: Tally,
                         stream: bool) -> None:
    """One user request; a success is a complete answer whose receipt an honest provider signed."""
    body = {"model": "agora-tiny", "max_tokens": MAX_TOKENS, "stream": stream,
            "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
    headers = {"authorization": f"Bearer {secret}"}
    started = time.monotonic()
    try:
        if not stream:
            r = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            if r.status_code != 200:
                return tally.fail(f"http {r.status_code} {_code(r.content)}")
            agora = r.json().get("agora") or {}
        else:
            agora, done = {}, False
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    return tally.fail(f"http {r.status_code} {_code(await r.aread())}")
                async for line in r.aiter_lines():
                    if line.startswith("data: [DONE]"):
                        done = True
                    elif line.startswith("data:") and '"error"' in line[:20]:
                        return tally.fail(f"error chunk {_code(line[5:].encode())}")
                    elif '"agora"' in line and '"receipts"' in line:
                        agora = json.loads(line[5:]).get("agora") or {}
            if not done:
                return tally.fail("no [DONE]")
        if agora.get("provider") not in honest:
            return tally.fail("no honest receipt")
    except httpx.HTTPError as exc:
        return tally.fail(type(exc).__name__)
    tally.ok += 1
    tally.latency_ms.append((time.monotonic() - started) * 1000)


def _code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def warnings_of(log: Path, top: int = 6) -> list[tuple[int, str]]:
    """The gateway's most frequent warnings, ids and numbers masked: what went wrong, at a glance."""
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.strip():  # the node logs warnings and errors, one line each (no handler: Python's last resort)
            key = re.sub(r"12D3Koo\w+|http://[\w.:]+|gw-\w+|req-\w+|\d+", "#", line)[:120]
            counts[key] = counts.get(key, 0) + 1
    return sorted(((n, k) for k, n in counts.items()), reverse=True)[:top]


async def honest_clients(url: str, secret: str, honest: set[str], clients: int, seconds: float) -> Tally:
    tally = Tally()
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=120) as client:
        async def user(i: int) -> None:
            n = 0
            while time.monotonic() < deadline:
                await honest_request(client, url, secret, honest, tally, stream=(i + n) % 2 == 0)
                n += 1

        await asyncio.gather(*(user(i) for i in range(clients)))
    return tally


# -- the storm ------------------------------------------------------------------------------------

async def flood(url: str, model, per_s: int, seconds: float, counts: dict[str, int]) -> None:
    """Fresh keys gossiping free offers at dead URLs, and a few absurdly priced ones."""
    from agoranet.core.identity import Identity
    from agoranet.node.cheat import sybil_records

    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            records = []
            for i in range(per_s):
                price = {"input_per_mtok": 10**15, "output_per_mtok": 10**15} if i % 10 == 0 else \
                    {"input_per_mtok": 0, "output_per_mtok": 0}
                records += sybil_records(Identity.generate(), f"http://127.0.0.1:{free_port()}",
                                         model.model_copy(update=price))
            try:
                r = await client.post(f"{url}/agora/v1/gossip", json={"records": records})
                counts[f"gossip {r.status_code}"] = counts.get(f"gossip {r.status_code}", 0) + 1
            except httpx.HTTPError as exc:
                counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
            counts["sybil offers"] = counts.get("sybil offers", 0) + per_s
            await asyncio.sleep(1.0)


async def abandon(url: str, secret: str, seconds: float, counts: dict[str, int]) -> None:
    """Streams read for a few tokens, then dropped."""
    deadline = time.monotonic() + seconds
    body = {"model": "agora-tiny", "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=60) as client:
        while time.monotonic() < deadline:
            try:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                                         headers={"authorization": f"Bearer {secret}"}) as r:
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += '"content":"' in line
                        if seen >= 4:
                            break
                counts["abandoned streams"] = counts.get("abandoned streams", 0) + 1
            except httpx.HTTPError:
                counts["abandon errors"] = counts.get("abandon errors", 0) + 1
            await asyncio.sleep(0.5)


async def poison(url: str, verifier: str, identity, replayer_url: str, model, receipt: dict, seconds: float,
                 counts: dict[str, int]) -> None:
    """Keep the replaying provider's offer live, and push its old receipt to the verifier again and again."""
    from agoranet.node.cheat import sybil_records

    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=10) as client:
        seq = 1
        while time.monotonic() < deadline:
            try:
                await client.post(f"{url}/agora/v1/gossip",
                                  json={"records": sybil_records(identity, replayer_url, model, seq=seq)})
                await client.post(f"{verifier}/agora/v1/receipts", json={"receipt": receipt["receipt"]})
                counts["poisoned receipts pushed"] = counts.get("poisoned receipts pushed", 0) + 1
            except httpx.HTTPError:
                pass
            seq += 1
            await asyncio.sleep(2.0)


def turncoat(root: Path, gw_url: str):
    """A provider that serves once honestly, then replays that receipt with made-up text (in this process)."""
    from agoranet.core.identity import Identity
    from agoranet.engine.stub import StubEngine
    from agoranet.node.cheat import hostile_provider_app
    from agoranet.node.node import ProviderOptions, build_provider_node
    from agoranet.node.server import BackgroundServer, bind, url_of

    home = root / "turncoat"
    identity = Identity.load_or_create(home / "identity.key")
    sock = bind()
    app, role = build_provider_node(home, url_of(sock), ProviderOptions(), engine=StubEngine(model_name="agora-tiny"))
    honest = BackgroundServer(app, sock).start()
    r = httpx.post(f"{honest.url}/v1/chat/completions", timeout=30, json={
        "model": "agora-tiny", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "hi"}],
        "agora": {"receipt": "full"}})  # the whole record, which the turncoat replays
    receipt = r.json()["agora"]
    model = role.offer().body.models[0]
    honest.stop()
    replayer = BackgroundServer(hostile_provider_app("replay", receipt=receipt)).start()
    return identity, replayer, model, receipt


def earnings_match(gw_url: str, provider_url: str) -> tuple[int, int]:
    """(credits the gateway paid this provider, sum of the charges of every receipt it signed)."""
    peer = httpx.get(f"{provider_url}/agora/v1/offer").json()["record"]["signer"]
    paid = httpx.get(f"{gw_url}/agora/v1/credits/statement/{peer}").json()["proof"]["statement"]["body"]["total"]
    charged, after = 0, 0
    while True:
        page = httpx.get(f"{provider_url}/agora/v1/receipts", params={"after": after, "limit": 100}).json()
        charged += sum(item["record"]["body"]["price"]["charged"] for item in page["receipts"])
        if not page["receipts"]:
            return paid, charged
        after = page["next"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of the storm")
    p.add_argument("--calm", type=float, default=15.0, help="length of the calm anchor run before it")
    p.add_argument("--clients", type=int, default=4, help="honest clients sending back to back")
    p.add_argument("--flood", type=int, default=20, help="sybil offers gossiped per second (each lives 60 s)")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seed", help=argparse.SUPPRESS)
    p.add_argument("--verifier", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        return serve(a.serve, a.home, a.port, a.seed, a.verifier)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ports = {name: free_port() for name in ("gw", "a", "b", "verifier")}
        url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        procs = [spawn("verifier", root / "verifier", ports["verifier"])]
        procs.append(spawn("gateway", root / "gw", ports["gw"], verifier=url["verifier"]))
        try:
            wait(url["gw"], "/v1/models", lambda _: True, timeout=600)  # a loaded box imports torch slowly
            procs += [spawn("provider", root / name, ports[name], seed=url["gw"]) for name in ("a", "b")]
            for name in ("a", "b", "verifier"):
                wait(url[name], "/agora/v1/offer" if name != "verifier" else "/agora/v1/reputation",
                     lambda _: True, timeout=600)
            wait(url["gw"], "/agora/v1/providers", lambda j: len(j["providers"]) >= 2, timeout=300)
            honest = {httpx.get(f"{url[n]}/agora/v1/offer").json()["record"]["signer"] for n in ("a", "b")}
            secret = (root / "gw" / "honest.secret").read_text()
            attacker = (root / "gw" / "attacker.secret").read_text()
            gw_pid = procs[1].pid

            asyncio.run(honest_clients(url["gw"], secret, honest, a.clients, 5.0))  # warm up: off probation
            rss_start = rss_mib(gw_pid)
            calm = asyncio.run(honest_clients(url["gw"], secret, honest, a.clients, a.calm))
            identity, replayer, model, receipt = turncoat(root, url["gw"])
            counts: dict[str, int] = {}

            async def storm() -> Tally:
                attacks = [flood(url["gw"], model, a.flood, a.seconds, counts),
                           abandon(url["gw"], attacker, a.seconds, counts),
                           poison(url["gw"], url["verifier"], identity, replayer.url, model, receipt, a.seconds,
                                  counts)]
                tally, *_ = await asyncio.gather(honest_clients(url["gw"], secret, honest, a.clients, a.seconds),
                                                 *attacks)
                return tally

            stormy = asyncio.run(storm())
            rss_end = rss_mib(gw_pid)
            time.sleep(2)  # let the last settlements land
            replayer.stop()
            matches = {n: earnings_match(url["gw"], url[n]) for n in ("a", "b")}
            providers = httpx.get(f"{url['gw']}/agora/v1/providers").json()["providers"]
            warnings = warnings_of(root / "gw" / "node.log")
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in procs:
                proc.wait(30)

    rate = stormy.ok / max(1, stormy.total)
    calm_p99, storm_p99 = pct(calm.latency_ms, 0.99), pct(stormy.latency_ms, 0.99)
    print(f"calm: {calm.ok}/{calm.total} ok, p50 {pct(calm.latency_ms, 0.5):.0f} ms, p99 {calm_p99:.0f} ms")
    print(f"storm ({a.seconds:.0f}s): {stormy.ok}/{stormy.total} honest requests ok = {100 * rate:.2f}% "
          f"(goal >= 99%); failures {stormy.failed or 'none'}")
    print(f"storm p50 {pct(stormy.latency_ms, 0.5):.0f} ms, p99 {storm_p99:.0f} ms = {storm_p99 / calm_p99:.2f}x calm "
          f"(goal <= 2x)")
    for name, (paid, charged) in matches.items():
        print(f"provider {name}: paid {paid} micro-credits, its receipts charge {charged}: "
              f"{'equal' if paid == charged else 'DIFFERENT'}")
    print(f"gateway RSS start {rss_start:.1f} MiB, end {rss_end:.1f} MiB ({rss_end - rss_start:+.1f} MiB)")
    print(f"attacks: {counts}; providers known to the gateway at the end: {len(providers)}")
    for n, what in warnings:
        print(f"  gateway warning x{n}: {what}")


if __name__ == "__main__":
    main()
