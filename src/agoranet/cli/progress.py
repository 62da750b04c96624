"""The transfer bar of commands that fetch blocks from peers (`store fetch`, a provider given a model CID)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


class TransferBar:
    """A rich progress bar drawn from the first `update(done_bytes, total_bytes)` on, so a command
    that ends up fetching nothing (the model was already here) prints nothing."""

    def __init__(self, label: str, console: Console) -> None:
        self.label, self.console = label, console
        self._progress: Progress | None = None
        self._task = None

    def update(self, done: int, total: int | None) -> None:
        if self._progress is None:
            self._progress = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), console=self.console)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=None)
        self._progress.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


@contextmanager
def transfer_bar(label: str, console: Console | None = None) -> Iterator[TransferBar]:
    bar = TransferBar(label, console or Console(stderr=True))
    try:
        yield bar
    finally:
        bar.close()
