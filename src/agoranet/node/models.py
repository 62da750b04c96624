"""Models by CID: a provider serves `--model bafy…` from its local store, fetching it (verified,
block by block) from storage peers when it is not there yet."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from agoranet.core.cid import parse_cid
from agoranet.core.errors import InvalidCID, ModelError, ModelUnavailable
from agoranet.engine.models import resolve_model
from agoranet.net.storage_client import Progress, fetch_dag
from agoranet.store import Blockstore, connect_kubo
from agoranet.store.unixfs import export, model_cid


def materialize_model(spec: str, home: Path, storage_peers: list[str] = (), kubo_rpc: str | None = None,
                      progress: Progress | None = None) -> tuple[Path, str]:
    """(directory, served name) for a bundled name, a local directory, or a model CID.

    With `kubo_rpc`, blocks missing here are read from that kubo's repo first (verified), then from peers.
    `progress(done_bytes, total_bytes)` follows a fetch from peers.
    """
    try:
        cid = parse_cid(spec)
    except InvalidCID:
        return resolve_model(spec)
    dest = home / "models" / str(cid)
    if (dest / "config.json").exists() and model_cid(dest) == cid:
        return dest, str(cid)
    with Blockstore(home / "blocks", kubo=connect_kubo(kubo_rpc) if kubo_rpc else None) as store:
        if store.missing(cid) and storage_peers:
            asyncio.run(fetch_dag(store, cid, list(storage_peers), progress=progress))
        absent = store.missing(cid)
        if absent:
            raise ModelUnavailable(
                f"model {cid} is not in the local store ({len(absent)} block(s) missing)",
                hint="pass --storage-peer URL of a peer that holds it, --kubo-rpc URL of a kubo that pinned it, "
                     "or publish it here with `agora store add DIR`",
            )
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        export(store, cid, tmp)
    if model_cid(tmp) != cid:  # export re-reads and re-hashes every block; this double-checks the tree
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"the files exported for {cid} do not hash back to it", hint="run `agora store gc` and retry")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest, str(cid)
