"""Storage peer role: serves and replicates blocks, re-checking its copies in the background."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agoranet.core.identity import Identity
from agoranet.core.tasks import cancel_and_wait
from agoranet.wire.storage import BLOCKS
from agoranet.node.replication import StorageReplicator
from agoranet.node.operator import operator_token
from agoranet.node.storage_api import StorageAccess, storage_router
from agoranet.store import Blockstore, connect_kubo


class StorageRole:
    def __init__(self, home: Path, public_url: str, peers: list[str], *, recheck_interval: float = 60.0,
                 kubo_rpc: str | None = None, identity: Identity | None = None) -> None:
        # With a kubo RPC address, every block this peer stores is put to that kubo as well.
        self.store = Blockstore(home / "blocks", kubo=connect_kubo(kubo_rpc) if kubo_rpc else None)
        self.replicator = StorageReplicator(self.store, public_url, peers, recheck_interval=recheck_interval,
                                            state_path=home / "replicas.json", identity=identity)
        # Writes need the operator's token (the file in home) or a replication peer's signature.
        self.router = storage_router(self.store, self.replicator, StorageAccess(operator_token=operator_token(home)))
        self.body_limits = {BLOCKS: 64 << 20}  # blocks of up to 4 MiB, and lists of many CIDs
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.replicator.run(), name="agora-storage-recheck")

    def status(self) -> dict[str, Any]:
        """Dashboard section: what this peer holds and how its replicated pins fare."""
        blocks, size, pins = self.store.usage()
        r = self.replicator
        report = r.last_report
        section: dict[str, Any] = {"url": r.url, "blocks": blocks, "bytes": size, "pins": pins,
                                   "replicated_pins": len(r.intents), "known_peers": len(r.peers),
                                   "kubo_rpc": self.store.kubo.url if self.store.kubo is not None else None}
        health = "ok"
        if report is not None:
            section |= {"alive_peers": len(report.alive), "corrupt_blocks": len(report.corrupt_blocks),
                        "failed_repairs": len(report.failed)}
            if report.corrupt_blocks or report.failed:
                health = f"{len(report.corrupt_blocks)} corrupt block(s), {len(report.failed)} failed repair(s)"
        return {"storage": section, "health": {"storage": health}}

    def metrics(self) -> dict[str, float]:
        blocks, size, pins = self.store.usage()
        readings = {"store_blocks": blocks, "store_bytes": size, "store_pins": pins,
                    "replication_intents": len(self.replicator.intents),
                    "store_forged_blocks_total": sum(self.replicator.forged.values())}
        if (report := self.replicator.last_report) is not None:
            readings |= {"replication_alive_peers": len(report.alive),
                         "replication_corrupt_blocks": len(report.corrupt_blocks),
                         "replication_failed_repairs": len(report.failed)}
        return readings

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self.store.close()
