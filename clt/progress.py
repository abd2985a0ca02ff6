"""The one progress bar of every long command (training, evaluation, tracing, feature cards).

A `rich` bar on stderr: description, bar, done / total, elapsed and remaining time, and an
optional `{task.fields[info]}` column (training's loss and speed). Disabled, it prints nothing.
"""

from __future__ import annotations


def progress_bar(enabled: bool = True, *, info: bool = False, transient: bool = True):
    """A `rich.progress.Progress` (a context manager; `add_task(description, total=...)`).
    `info`: a last column showing each task's `info` field."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, disable=not enabled, transient=transient)


T0_VAR = "CLTRACE_T0"  # wall time at which the `cltrace` command started (cltrace.entry)


def process_seconds() -> float | None:
    """Wall seconds since the `cltrace` command started (imports, re-exec and loading
    included), for "time to first result" figures; None outside the command."""
    import os
    import time

    try:
        return time.time() - float(os.environ[T0_VAR])
    except (KeyError, ValueError):
        return None


__all__ = ["T0_VAR", "process_seconds", "progress_bar"]
