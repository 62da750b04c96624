"""kill -9 in the middle of 10k appends: every acknowledged entry survives and the root recomputes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from agoranet.core.identity import Identity
from agoranet.log.merkle import leaf_hash, root_from_leaf_hashes
from agoranet.log.transparency import TransparencyLog, cid_key

TOTAL = 10_000
KILL_AFTER = 4_000

WRITER = """
import sys
from agoranet.core.identity import Identity
from agoranet.core.records import encode_canonical
from agoranet.log.transparency import TransparencyLog

log = TransparencyLog(sys.argv[1], Identity.generate())
i, step = 0, 1
while i < {total}:
    batch = [encode_canonical({{"i": j}}) for j in range(i, min(i + step, {total}))]
    entries = log.append_many(batch)  # returns only after the commit is on disk
    sys.stdout.write("".join(f"{{e.index}}\\n" for e in entries))
    sys.stdout.flush()
    i += len(batch)
    step = step % 37 + 1  # single appends and batches of up to 37, interleaved
"""


def expected(i: int) -> bytes:
    from agoranet.core.records import encode_canonical

    return encode_canonical({"i": i})


def test_acknowledged_appends_survive_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(total=TOTAL), str(db)], stdout=subprocess.PIPE, env=env, text=True,
    )
    acknowledged = []
    assert child.stdout is not None
    for line in child.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) >= KILL_AFTER:
            child.send_signal(signal.SIGKILL)
            break
    acknowledged += [int(line) for line in child.stdout]  # whatever it printed before dying also counts
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    assert acknowledged == list(range(len(acknowledged))) and len(acknowledged) < TOTAL

    with TransparencyLog(db, Identity.generate()) as log:
        assert log.size >= len(acknowledged)
        stored = [e.record for start in range(0, log.size, 1000) for e in log.entries(start, log.size)]
        assert stored[: len(acknowledged)] == [expected(i) for i in acknowledged]
        assert log.root() == root_from_leaf_hashes([leaf_hash(cid_key(r)) for r in stored])
        assert log.tampered_entries() == []
