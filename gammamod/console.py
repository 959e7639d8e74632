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


class StageProgress:
    """Progress of a multi-stage job: one line per stage, a bar where the stage knows its size.
    ``stage(name, total)`` starts a stage and returns ``advance(n=1)``."""

    def __init__(self, title: str):
        self.title = title
        self._progress = None
        self._task = None

    def __enter__(self):
        if err_console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=err_console)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._finish()
            self._progress.__exit__(*exc)
        return False

    def _finish(self):
        if self._task is not None:
            task = self._progress.tasks[-1]
            self._progress.update(self._task, completed=task.total or 1, total=task.total or 1)

    def stage(self, name: str, total: int | None = None):
        if self._progress is None:
            return lambda n=1: None
        self._finish()
        self._task = self._progress.add_task(f"{self.title}: {name}", total=total)
        task = self._task
        return lambda n=1: self._progress.advance(task, n)
