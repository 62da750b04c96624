"""The CLI's output: results on stdout, errors on stderr, and the one way a command fails."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from agoranet.core.errors import AgoraError

console = Console(emoji=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)


def fail(problem: AgoraError | str, code: int = 1) -> typer.Exit:
    """Print one line naming the problem on stderr; `raise` what it returns to exit with `code`."""
    text = escape(str(problem)) if isinstance(problem, AgoraError) else problem  # an error's text is not markup
    err.print(f"[bold red]error:[/] {text}", highlight=False)
    return typer.Exit(code)
