"""`agora provide --model CID`: a provider fetches a published model from a storage peer, verified."""

from __future__ import annotations

import httpx
import openai
import pytest

from agoranet.core.errors import ModelError
from agoranet.engine.models import resolve_model
from agoranet.node.app import create_app
from agoranet.node.models import materialize_model
from agoranet.node.node import ProviderOptions
from agoranet.node.server import BackgroundServer, bind, url_of
from agoranet.node.storage_role import StorageRole
from agoranet.store.unixfs import add_path, model_cid

from .. import kubo_daemon
from ..conftest import start_provider
from ..kubo_daemon import IPFS_ADD

kubo = kubo_daemon.kubo  # the fixture: a real kubo daemon, or the test is skipped with the reason


def test_provider_serves_a_model_fetched_by_cid(tmp_path):
    bundled = resolve_model("agora-tiny")[0]
    sock = bind()
    role = StorageRole(tmp_path / "publisher", url_of(sock), [])
    cid = add_path(role.store, bundled)
    assert cid == model_cid(bundled)
    with BackgroundServer(create_app([role], max_request_bytes=1 << 20), sock) as peer:
        seen: list[tuple[int, int | None]] = []
        server, prov = start_provider(tmp_path / "provider", ProviderOptions(
            model=str(cid), storage_peers=[peer.url], threads=1, fetch_progress=lambda *p: seen.append(p)))
        try:
            assert prov.engine.model_cid == str(cid)
            done, total = seen[-1]  # what `agora provide` draws its transfer bar from
            assert done == total > 6_000_000 and len(seen) > 5
            models = httpx.get(f"{server.url}/v1/models").json()["data"]
            assert models[0]["id"] == str(cid)
            r = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x").completions.create(
                model=str(cid), prompt="import sys\n", max_tokens=8, temperature=0)
            assert r.usage.completion_tokens == 8
        finally:
            server.stop()
    # Now cached locally: no peer needed, and the files still hash to the CID.
    path, name = materialize_model(str(cid), tmp_path / "provider")
    assert name == str(cid) and model_cid(path) == cid


def test_model_pinned_in_kubo_is_read_from_it_verified(kubo, tmp_path):
    bundled = resolve_model("agora-tiny")[0]
    cid = kubo.ipfs(*IPFS_ADD, "-r", str(bundled)).decode().strip()  # published with kubo, not with Agora
    assert cid == str(model_cid(bundled))
    path, name = materialize_model(cid, tmp_path / "provider", kubo_rpc=kubo.rpc_url)
    assert name == cid and model_cid(path) == model_cid(bundled)


def test_unknown_cid_without_peers_says_how_to_get_it(tmp_path):
    cid = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
    with pytest.raises(ModelError, match="--storage-peer"):
        materialize_model(cid, tmp_path)
