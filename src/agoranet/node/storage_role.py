"""Storage peer role: serves and replicates blocks, re-checking its copies in the background."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from agoranet.node.replication import StorageReplicator
from agoranet.node.storage_api import storage_router
from agoranet.store import Blockstore


class StorageRole:
    def __init__(self, home: Path, public_url: str, peers: list[str], *, recheck_interval: float = 60.0) -> None:
        self.store = Blockstore(home / "blocks")
        self.replicator = StorageReplicator(self.store, public_url, peers, recheck_interval=recheck_interval,
                                            state_path=home / "replicas.json")
        self.router = storage_router(self.store, self.replicator)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.replicator.run(), name="agora-storage-recheck")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.store.close()
