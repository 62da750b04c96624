"""The CLI's output: results on stdout, errors on stderr, and the one way a command fails.

Every command exits with one of these statuses (README, "Exit statuses"):
0 done, or the check passed; 1 the command could not do what was asked (bad input, a missing file, a request
the node refused): the message names the fix; 2 usage (click's own: an unknown option, a missing argument);
3 the check ran and found something wrong (a receipt judged fraud or a violation, a forged tree head, a
fork, a statement that does not add up): keep the evidence; 4 a node could not be reached or gave no usable
answer: try again, or check the URL.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from agoranet.core.errors import AgoraError
from agoranet.net.agora_client import NodeRefused, NodeUnreachable

OK, FAILED, USAGE, CHECK_FAILED, UNREACHABLE = 0, 1, 2, 3, 4

console = Console(emoji=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, emoji=False, highlight=False, soft_wrap=True)


def exit_status(problem: AgoraError | str) -> int:
    """The status a problem ends a command with when the caller does not name one."""
    if isinstance(problem, NodeUnreachable) or (isinstance(problem, NodeRefused) and problem.status >= 500):
        return UNREACHABLE
    return FAILED


def fail(problem: AgoraError | str, code: int | None = None) -> typer.Exit:
    """Print one line naming the problem on stderr; `raise` what it returns to exit with `code` (by default
    the problem's `exit_status`)."""
    text = escape(str(problem)) if isinstance(problem, AgoraError) else problem  # an error's text is not markup
    err.print(f"[bold red]error:[/] {text}", highlight=False)
    return typer.Exit(exit_status(problem) if code is None else code)
