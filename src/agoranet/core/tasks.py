"""The background tasks roles own: created in `start()`, cancelled and awaited in `stop()`."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (None: nothing to do) and wait until it has finished, so nothing it holds outlives
    the caller's `stop()`. A task that had already ended with an error raises that error here."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
