"""The node's transparency log as a role: its HTTP routes, and group commit for appends.

Every append waits for its commit (an acknowledged record survives a crash), but appends that
arrive together share one commit, so a busy node pays one fsync per batch, not per record.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agoranet.core.records import Record
from agoranet.core.tasks import cancel_and_wait
from agoranet.log.transparency import LogEntry, TransparencyLog
from agoranet.node.log_api import log_router


class LogRole:
    def __init__(self, log: TransparencyLog) -> None:
        self.log = log
        self.router = log_router(log)
        self._queue: asyncio.Queue[tuple[Record | bytes, asyncio.Future[LogEntry]]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._writer = asyncio.create_task(self._write_batches(), name="agora-log-writer")

    async def stop(self) -> None:
        await cancel_and_wait(self._writer)
        self.log.close()

    def status(self) -> dict[str, Any]:
        """Dashboard section: the log's size and root (the page fetches the signed head itself)."""
        return {"log": {"log_id": self.log.log_id, "size": self.log.size, "root": self.log.root().hex()},
                "health": {"log": "ok" if self._writer is not None and not self._writer.done() else "writer stopped"}}

    def metrics(self) -> dict[str, float]:
        return {"log_entries": self.log.size}

    async def append(self, record: Record | bytes) -> LogEntry:
        """Log a record; returns once it is durably committed."""
        return await self.submit(record)

    def submit(self, record: Record | bytes) -> asyncio.Future[LogEntry] | None:
        """Queue a record for the next commit; await the future to know it is durable.

        Called before the node's event loop runs (a node announcing its offer while it is being
        built), the record is appended right away instead.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.log.append(record)
            return None
        done: asyncio.Future[LogEntry] = loop.create_future()
        self._queue.put_nowait((record, done))
        return done

    async def _write_batches(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                entries = await asyncio.to_thread(self.log.append_many, [record for record, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), entry in zip(batch, entries):
                if not done.done():
                    done.set_result(entry)
