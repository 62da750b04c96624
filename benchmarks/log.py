"""Transparency-log throughput: appends/s and inclusion-proof verifications/s, against the goals.

Run: PYTHONPATH=src python benchmarks/log.py [--runs 5]. Prints the median of several runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from agoranet.core.identity import Identity
from agoranet.core.records import encode_canonical
from agoranet.log.merkle import leaf_hash, verify_inclusion
from agoranet.log.transparency import TransparencyLog
from agoranet.node.log_role import LogRole

APPEND_GOAL = 20_000
VERIFY_GOAL = 50_000


def records(n: int, tag: str) -> list[bytes]:
    # record-sized DAG-CBOR (~300 bytes); the log hashes and stores bytes, it does not parse them
    return [encode_canonical({"tag": tag, "i": i, "pad": b"\x00" * 256}) for i in range(n)]


def rate(n: int, seconds: float) -> float:
    return n / seconds


def bench_appends(tmp: Path, identity: Identity, runs: int) -> dict[str, float]:
    results: dict[str, list[float]] = {"batched 1000/commit, fsync": [], "node: 256 concurrent, fsync": [],
                                       "one per commit, fsync": [], "one per commit, no fsync": []}
    for run in range(runs):
        with TransparencyLog(tmp / f"b{run}.db", identity) as log:
            data = records(20_000, f"b{run}")
            t = time.perf_counter()
            for i in range(0, len(data), 1000):
                log.append_many(data[i:i + 1000])
            results["batched 1000/commit, fsync"].append(rate(len(data), time.perf_counter() - t))
        # What a node does: each request awaits its own durable append; the log role's group commit
        # lets appends that arrive together share one fsync.
        data = records(20_000, f"g{run}")
        results["node: 256 concurrent, fsync"].append(
            rate(len(data), asyncio.run(_group_commit(TransparencyLog(tmp / f"g{run}.db", identity), data))))
        with TransparencyLog(tmp / f"s{run}.db", identity) as log:
            data = records(300, f"s{run}")
            t = time.perf_counter()
            for r in data:
                log.append(r)
            results["one per commit, fsync"].append(rate(len(data), time.perf_counter() - t))
        with TransparencyLog(tmp / f"n{run}.db", identity, fsync=False) as log:
            data = records(5_000, f"n{run}")
            t = time.perf_counter()
            for r in data:
                log.append(r)
            results["one per commit, no fsync"].append(rate(len(data), time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in results.items()}


async def _group_commit(log: TransparencyLog, data: list[bytes], concurrency: int = 256) -> float:
    role = LogRole(log)
    await role.start()
    queue = iter(data)

    async def appender() -> None:
        for record in queue:
            await role.append(record)

    t = time.perf_counter()
    await asyncio.gather(*(appender() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t
    await role.stop()
    return elapsed


def bench_verify(tmp: Path, identity: Identity, runs: int, size: int = 10_000) -> tuple[float, float]:
    with TransparencyLog(tmp / "v.db", identity) as log:
        entries = log.append_many(records(size, "v"))
        root = log.root()
        picks = entries[:: size // 2000]
        gen, ver = [], []
        for _ in range(runs):
            t = time.perf_counter()
            proofs = [log.inclusion_path(e.index) for e in picks]
            gen.append(rate(len(picks), time.perf_counter() - t))
            leaves = [leaf_hash(e.key) for e in picks]
            t = time.perf_counter()
            for e, leaf, proof in zip(picks, leaves, proofs):
                verify_inclusion(leaf, e.index, size, proof, root)
            ver.append(rate(len(picks), time.perf_counter() - t))
    return statistics.median(gen), statistics.median(ver)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    identity = Identity.generate()
    with tempfile.TemporaryDirectory() as d:
        appends = bench_appends(Path(d), identity, args.runs)
        generated, verified = bench_verify(Path(d), identity, args.runs)
    print(f"median of {args.runs} runs")
    for name, value in appends.items():
        print(f"appends/s        {name:<28} {value:>10,.0f}   {value / APPEND_GOAL:5.2f}× goal {APPEND_GOAL:,}")
    print(f"proofs built/s   {'10k-entry log':<28} {generated:>10,.0f}")
    ratio = verified / VERIFY_GOAL
    print(f"proofs checked/s {'10k-entry log':<28} {verified:>10,.0f}   {ratio:5.2f}× goal {VERIFY_GOAL:,}")


if __name__ == "__main__":
    main()
