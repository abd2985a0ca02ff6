"""Transparent huge pages for this process's large allocations (Linux with glibc >= 2.35).

On Linux, glibc serves every allocation over 32 MB (activations, gradients, XLA's buffers,
numpy's) with a fresh mmap, and the kernel fills it one 4 KB page fault at a time. Measured on
the 2-core VM this project is developed on (issue 14): writing a fresh 2.2 GB numpy array took
2.5 s against 0.2 s for the same array written again, and a CLT's sparse train step (which
makes a 2.2 GB decoder gradient every step) took 15.4 s against 10.7 s with huge pages. The
glibc tunable `glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages (madvise), so
a fresh array faults 2 MB at a time. Tunables are read when a process starts, so the `cltrace`
command starts itself again once with the tunable set; `CLTRACE_HUGE_PAGES=0` turns this off.
This module imports nothing heavy: it runs before jax is imported.
Where the kernel has transparent huge pages off ("never"), or glibc does not know the tunable,
nothing changes.

Training also keeps its heap (`keep_heap`): a train step allocates the same large buffers every
step (a CLT's 2.3 GB decoder gradient, the dense step's activations) and frees them at its end;
as fresh mmaps they are faulted in again, 2 MB at a time, every step. With every allocation
served from the main heap (`glibc.malloc.arena_max=1`, `mmap_max=0`) and the heap never trimmed
(`trim_threshold`), the next step finds those pages already mapped. Measured with
scripts/bench_train.py's case (SmolLM2 CLT, 2,048 features per layer, 1,024 tokens, this 2-core
VM): the sparse step 5.3-5.4 s -> 4.0 s, the dense one 18.9 -> 15.7 s, peak RSS +0.1 GiB. The
heap then stays at the run's peak until the process ends, which suits a training run, not an
interactive command. Tracing gains nothing from it (scripts/bench_trace.py --tokens 12 --kinds
clt --adjacency dense, alternating: 71.2-71.6 s without, 74.2-78.1 s with), so only `cltrace
train` keeps its heap.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
KEEP_HEAP = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
             "glibc.malloc.trim_threshold=1099511627776")
OFF_VAR = "CLTRACE_HUGE_PAGES"


def huge_pages_env(environ: dict | None = None, keep_heap: bool = False) -> dict | None:
    """The environment to run a process with huge pages for malloc (and, with `keep_heap`, a
    heap that keeps its pages), or None when there is nothing to add (already set, turned off,
    not Linux/glibc, or THP is off). Tunables the environment already names are left as they
    are: the huge pages set by hand (as the Makefile sets them) still get a kept heap."""
    env = dict(os.environ if environ is None else environ)
    tunables = env.get("GLIBC_TUNABLES", "")
    if env.get(OFF_VAR) == "0":
        return None
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    try:
        if "[never]" in thp.read_text():
            return None
    except OSError:
        return None
    add = [t for t in (TUNABLE, *(KEEP_HEAP if keep_heap else ()))
           if t.split("=")[0] not in tunables]
    if not add:
        return None
    env["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + add)
    return env


def reexec_with_huge_pages(module: str, argv: list[str], keep_heap: bool = False) -> None:
    """Start this process again as `python -m module argv...` with `huge_pages_env`, unless
    there is nothing to add (then return). Call it first thing, before any work."""
    env = huge_pages_env(keep_heap=keep_heap)
    if env is None:
        return
    env[OFF_VAR] = "0"  # never twice, whatever glibc makes of the tunable
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


__all__ = ["KEEP_HEAP", "TUNABLE", "huge_pages_env", "reexec_with_huge_pages"]
