"""Store benchmarks: `add` throughput against plain sha256, and multi-peer fetch against one peer.

    PYTHONPATH=src python benchmarks/store.py [--size-mib 256] [--repeats 5] [--fetch-mib 64]

Goals (issue 7): add ≥ 0.8× sha256 MB/s over the same bytes; fetch from 4 peers ≥ 3× one peer when
every peer's bandwidth is capped equally.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from agoranet.store import Blockstore, add_path

MiB = 1 << 20


def bench_add(size_mib: int, repeats: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="agora-bench-"))
    try:
        src = work / "model.bin"
        with open(src, "wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(MiB))
        sha_rates, add_rates = [], []
        for i in range(repeats):
            # interleaved so that load from other processes hits both measurements alike
            t = time.perf_counter()
            h = hashlib.sha256()
            with open(src, "rb") as f:
                while chunk := f.read(MiB):
                    h.update(chunk)
            sha_rates.append(size_mib / (time.perf_counter() - t))
            store = Blockstore(work / f"store{i}")
            t = time.perf_counter()
            add_path(store, src)
            add_rates.append(size_mib / (time.perf_counter() - t))
            store.close()
            shutil.rmtree(work / f"store{i}")
        sha, add = statistics.median(sha_rates), statistics.median(add_rates)
        print(f"add {size_mib} MiB: median {add:,.0f} MiB/s; sha256 median {sha:,.0f} MiB/s; "
              f"ratio {add / sha:.2f} (goal >= 0.80)")
    finally:
        shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fetch-mib", type=int, default=64)
    parser.add_argument("--skip-fetch", action="store_true")
    args = parser.parse_args()
    bench_add(args.size_mib, args.repeats)


if __name__ == "__main__":
    main()
