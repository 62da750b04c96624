"""`agora store serve` as users run it: the dashboard and metrics are there, and --log-json logs JSON lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

from tests.conftest import free_port


def test_store_serve_serves_the_dashboard_and_logs_json(tmp_path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "node.log"
    env = dict(os.environ, AGORA_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "agoranet.cli", "store", "serve", "--port", str(port), "--log-json"],
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert httpx.get(f"{url}/agora/v1/status").json()["node"]["roles"] == ["storage"]
        assert "agora_store_blocks" in httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(20)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert any(line["msg"] == "Application startup complete." for line in lines), lines
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
