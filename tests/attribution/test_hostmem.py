"""attribution.hostmem: large arrays mapped whole, equal to np.zeros in every way a caller sees."""

import gc
import mmap

import numpy as np
import pytest

from attribution import hostmem


def _resident_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


@pytest.mark.parametrize("mapped", [False, True])  # as numpy's, or every array mapped up front
@pytest.mark.parametrize("shape, dtype", [((3000, 700), np.float32), ((5, 7), np.float32),
                                          (2_000_000, np.float64), ((0, 4), np.float32),
                                          ((1200, 1100), np.int32)])
def test_zeros_is_np_zeros(shape, dtype, mapped, monkeypatch):
    if mapped:
        monkeypatch.setattr(hostmem, "POPULATE_BYTES", 1)
    a, ref = hostmem.zeros(shape, dtype), np.zeros(shape, dtype)
    if mapped and a.size and getattr(mmap, "MAP_POPULATE", None) is not None:
        assert not a.flags.owndata  # the mapped path, not numpy's
    else:
        assert a.flags.owndata
    assert a.shape == ref.shape and a.dtype == ref.dtype
    assert a.flags.writeable and a.flags.c_contiguous
    np.testing.assert_array_equal(a, ref)
    if a.size:  # written like any array, rows by fancy index as a trace writes them
        rows = np.array([2, 0, 1])
        a[rows] = np.arange(3)[:, None] + 1 if a.ndim == 2 else 7
        ref[rows] = np.arange(3)[:, None] + 1 if ref.ndim == 2 else 7
        np.testing.assert_array_equal(a, ref)


def test_large_zeros_are_mapped_up_front_and_given_back(monkeypatch):
    """A large array's pages are resident as soon as it is made (MAP_POPULATE), before any write;
    they go when the last view goes. A small one is numpy's own."""
    small = hostmem.zeros((10, 10))
    assert small.base is None  # np.zeros' own buffer
    monkeypatch.setattr(hostmem, "POPULATE_BYTES", 64 << 20)  # from 64 MB here, not 1 GB
    assert hostmem.zeros((1000, 1000)).base is None  # 4 MB: still numpy's
    before = _resident_kb()
    if getattr(mmap, "MAP_POPULATE", None) is None or before is None:
        a = hostmem.zeros((4096, 4096))  # 64 MB: np.zeros where nothing can map it up front
        np.testing.assert_array_equal(a[::512, ::512], 0)
        return
    n_mb = 256
    a = hostmem.zeros((n_mb * 256, 1024))  # n_mb MB of float32
    assert not a.flags.owndata  # a view of its own mapping
    grown = (_resident_kb() - before) / 1024
    assert grown > 0.9 * n_mb, f"only {grown:.0f} of {n_mb} MB resident before any write"
    view = a[100:200]
    del a
    gc.collect()
    assert _resident_kb() - before > 0.9 * n_mb * 1024  # a view keeps it
    view[:] = 1
    del view
    gc.collect()
    assert (_resident_kb() - before) / 1024 < 0.1 * n_mb  # unmapped with its last view
