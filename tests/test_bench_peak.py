"""`scripts/bench_trace.py`'s trace-only peak memory (`reset_peak`): the peak counted again from
what the process holds, so a case's `trace_peak_rss_gb` leaves out the harness's own peak."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from attribution.hostmem import trim_heap
from scripts.bench_trace import _peak_gb, reset_peak


def test_reset_peak_counts_from_what_is_held_now():
    gc.collect()
    big = np.ones(400 << 20, np.uint8)  # 0.39 GiB, written: resident
    high = _peak_gb()
    del big
    trim_heap()
    if not reset_peak():
        pytest.skip("no /proc/self/clear_refs to reset the peak with")
    low = _peak_gb()
    assert low < high - 0.3  # the freed array's peak is gone
    small = np.ones(100 << 20, np.uint8)  # 0.1 GiB more than now is the new peak
    assert _peak_gb() >= low + 0.09
    assert _peak_gb() < high - 0.2
    del small
