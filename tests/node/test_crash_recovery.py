"""kill -9 a provider while it answers: every receipt a client got back survives, SQLite stays intact."""

from __future__ import annotations

import sqlite3
import threading

import httpx
import pytest

from agoranet.core.records import ReceiptBody, verify_record

from ..conftest import NodeProcess, free_port


@pytest.mark.slow
def test_acknowledged_receipts_survive_sigkill(tmp_path):
    home = tmp_path / "provider"
    node = NodeProcess(["provide", "--threads", "1"], home, free_port()).wait_ready()
    acknowledged: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=30) as http:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = http.post(f"{node.url}/v1/completions", json={
                        "model": "agora-tiny", "prompt": f"# worker {i} call {n}\n", "max_tokens": 3, "temperature": 0})
                except httpx.HTTPError:
                    return  # the node died under us: this answer was never acknowledged
                if r.status_code == 200:
                    acknowledged.append(r.json()["agora"]["receipt_cid"])

    workers = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    while len(acknowledged) < 25:
        threading.Event().wait(0.05)
    node.proc.kill()  # SIGKILL: no shutdown handlers run
    node.proc.wait()
    stop.set()
    for w in workers:
        w.join()

    for db in ("log.db", "node.db"):
        with sqlite3.connect(home / db) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    restarted = NodeProcess(["provide", "--threads", "1"], home, free_port()).wait_ready()
    try:
        with httpx.Client() as http:
            head = http.get(f"{restarted.url}/agora/v1/log/head").json()
            assert head["body"]["size"] >= len(acknowledged)
            for cid in acknowledged:
                record = http.get(f"{restarted.url}/agora/v1/records/{cid}").json()["record"]
                assert verify_record(record, ReceiptBody)
                proof = http.get(f"{restarted.url}/agora/v1/log/proof/inclusion", params={"cid": cid})
                assert proof.status_code == 200, proof.text
    finally:
        restarted.stop()
