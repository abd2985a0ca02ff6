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


def process_seconds() -> float | None:
    """Wall seconds since this process started (Linux, from /proc), for "time to first
    result" figures that include imports and loading; None where /proc is not there."""
    import os

    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


__all__ = ["process_seconds", "progress_bar"]
