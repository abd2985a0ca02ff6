"""Host memory for the tracer's large numpy arrays: the one home of how they are allocated
(`zeros`) and of handing freed heap pages back (`trim_heap`). Imports nothing heavy.

A large `np.zeros` is a fresh anonymous mapping whose pages the kernel maps one fault at a
time, as they are first written: for the adjacency, while its rows are stored, one batch
ahead of the rows being made (`attribution.stream.rows_ahead`). `zeros` maps them all in the
`mmap` call itself (Linux's `MAP_POPULATE`). Measured on this project's 2-core VM (a KVM guest,
where a page the guest has not used lately costs ~20 us to map, either way): the 12-token CLT
benchmark's rows (`scripts/bench_trace.py --random-model --tokens 12 --kinds clt --adjacency
dense`, fresh processes, old and new alternating) went 30.5 / 32.0 / 32.2 -> 27.4 / 28.3 /
26.8 / 27.5 s, its whole trace call 37.5 / 39.8 / 38.4 -> 34.0 / 35.8 / 33.4 / 34.6 s. Alone,
mapping 2.2 GB took 0.5-0.9 s up front where the guest's recently freed pages sufficed, 11.6 s
in a process already holding 4 GB; writing a fresh 2.2 GB array by faults took 9-13 s."""

from __future__ import annotations

import mmap

import numpy as np

# Arrays at least this large are mapped with all their pages (`zeros`); smaller ones are numpy's
# own. Measured with the demo (`scripts/bench_startup.py --warm 3`, a 0.37 GB adjacency) mapped
# up front: its rows 6.8-8.5 -> 5.9-7.5 s but no faster whole command (12.4-13.9 s against
# 12.5-14.1), and the next command on this VM reached its first row later (2.6-3.8 s against
# 1.9-2.2 s; likely because the pages a command frees had been mapped 4 KB at a time rather than
# as huge pages, not checked). The 12-token cases' 2 GB adjacencies gain 10-20% of their trace
# call (the module docstring).
POPULATE_BYTES = 1 << 30


def zeros(shape, dtype=np.float32) -> np.ndarray:
    """`np.zeros(shape, dtype)`, with every page of a large array mapped before it is returned
    (Linux's `MAP_POPULATE`; see the module docstring). For arrays the caller fills, or mostly
    fills, soon: the whole array is resident at once. Elsewhere (no `MAP_POPULATE`, a small
    array, a mapping refused) it is `np.zeros` itself. The memory goes back when the array and
    every view of it are gone."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    populate = getattr(mmap, "MAP_POPULATE", None)
    if populate is None or size < POPULATE_BYTES or dtype.hasobject:
        return np.zeros(shape, dtype)
    try:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    except (OSError, ValueError):
        return np.zeros(shape, dtype)
    return np.frombuffer(m, dtype).reshape(shape)  # anonymous pages read as zeros


def trim_heap() -> None:
    """Hand the C heap's free pages back to the kernel (glibc's `malloc_trim`); elsewhere,
    nothing. glibc serves allocations up to 32 MB (numpy's and XLA's temporaries) from its heap
    and keeps their pages when they are freed, while a large array (the adjacency) is a fresh
    mapping that cannot reuse them. So a trace trims once before its rows: on an 11-token CLT
    trace, setup left ~0.5 GB of such pages resident under its 1.8 GB adjacency. The planner
    trims before it reads resident memory, for the same reason: one plan of the demo had read
    0.5 GB more than its neighbours."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


__all__ = ["POPULATE_BYTES", "trim_heap", "zeros"]
