"""A real Agora network on 127.0.0.1 for dashboard tests: every node serves the dashboard and watches the others.

`start_network(["provider", "provider", "storage"])` binds every node's socket first, so each knows
the others' URLs before it starts. To add a kind (the gateway, say), add a builder to `BUILDERS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from agoranet.core.identity import Identity
from agoranet.node.node import ProviderOptions, StorageOptions, build_node, build_provider_node
from agoranet.node.server import BackgroundServer, bind, url_of
from agoranet.web import Dashboard, mount_dashboard


@dataclass
class RunningNode:
    kind: str
    url: str
    app: FastAPI
    dashboard: Dashboard
    server: BackgroundServer
    role: Any  # the node's main role: the Provider, the StorageRole, …

    @property
    def peer_id(self) -> str | None:
        return self.dashboard.peer_id


def _provider(home: Path, url: str) -> tuple[FastAPI, Any]:
    Identity.load_or_create(home / "identity.key")
    return build_provider_node(home, url, ProviderOptions(threads=1, max_batch=4))


def _storage(home: Path, url: str) -> tuple[FastAPI, Any]:
    node = build_node(home, url, ["storage"], storage=StorageOptions(recheck_interval_s=3600))
    return node.app, node.storage


BUILDERS: dict[str, Callable[[Path, str], tuple[FastAPI, Any]]] = {"provider": _provider, "storage": _storage}


def start_network(root: Path, kinds: list[str], *, watch_interval: float = 0.3) -> list[RunningNode]:
    socks = [bind() for _ in kinds]
    urls = [url_of(s) for s in socks]
    nodes: list[RunningNode] = []
    try:
        for i, (kind, sock, url) in enumerate(zip(kinds, socks, urls)):
            home = root / f"{kind}{i}"
            home.mkdir(parents=True, exist_ok=True)
            app, role = BUILDERS[kind](home, url)
            dashboard = mount_dashboard(app, url=url, watch=[u for u in urls if u != url],
                                        watch_interval=watch_interval)
            nodes.append(RunningNode(kind, url, app, dashboard, BackgroundServer(app, sock), role))
        for node in nodes:
            node.server.start()
    except BaseException:
        stop_network(nodes)
        raise
    return nodes


def stop_network(nodes: list[RunningNode]) -> None:
    for node in nodes:
        if node.server.server.started:
            node.server.stop()


@pytest.fixture(scope="package")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningNode]]:
    """Two providers and a storage peer, all watching each other; shared by the dashboard tests."""
    nodes = start_network(tmp_path_factory.mktemp("network"), ["provider", "provider", "storage"])
    try:
        yield nodes
    finally:
        stop_network(nodes)


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright; skipped only where /usr/bin/chromium is absent.

    Module-scoped on purpose: Playwright's sync API keeps an event loop running in the main thread while
    it is open, which would break any async test that ran in between.
    """
    if not CHROMIUM.exists():
        if os.environ.get("AGORA_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing and AGORA_REQUIRE_BROWSER is set: apt-get install -y chromium")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium); CI installs it and runs these")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]' (do not run `playwright install`)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
