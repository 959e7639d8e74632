"""Terminal output for the command line: a shared rich console and progress displays."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def stage_progress(title: str):
    """A spinner naming the current stage; yields ``tick(stage_name)``. Quiet when not a terminal."""
    if not err_console.is_terminal:
        yield lambda stage: None
        return
    with err_console.status(f"{title}") as status:
        yield lambda stage: status.update(f"{title}: {stage}")


@contextlib.contextmanager
def token_progress(total: int, title: str):
    """A progress bar over generated tokens; yields ``on_token(step, tokens)``."""
    if not err_console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task(title, total=total)
        yield lambda step, tokens: progress.update(task, completed=step + 1)


def is_interactive() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()
