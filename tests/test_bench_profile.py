"""`scripts/bench_trace.py --profile`'s summary (`profile_summary`), on a hand-written profile
whose totals are known: it runs on a lent GPU machine, where nothing can be debugged."""

from __future__ import annotations

import pytest
from jax.profiler import ProfileData

from scripts.bench_trace import profile_summary

PS = 1_000_000_000  # picoseconds in a millisecond

XSPACE = f'''
planes {{
  id: 1 name: "/device:GPU:0"
  lines {{ id: 1 name: "Stream #13(Compute)"
    events {{ metadata_id: 1 offset_ps: 0 duration_ps: {3 * PS} }}
    events {{ metadata_id: 2 offset_ps: {3 * PS} duration_ps: {PS} }}
    events {{ metadata_id: 1 offset_ps: {5 * PS} duration_ps: {2 * PS} }} }}
  lines {{ id: 2 name: "Stream #14(MemcpyD2H)"
    events {{ metadata_id: 3 offset_ps: 0 duration_ps: {4 * PS} }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "gemm_fusion" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "scatter_add" }} }}
  event_metadata {{ key: 3 value {{ id: 3 name: "MemcpyD2H" }} }}
}}
planes {{
  id: 2 name: "/host:CPU"
  lines {{ id: 1 name: "python"
    events {{ metadata_id: 1 offset_ps: 0 duration_ps: {9 * PS} }}
    events {{ metadata_id: 2 offset_ps: 0 duration_ps: {4 * PS} }}
    events {{ metadata_id: 3 offset_ps: {PS} duration_ps: {2 * PS} }} }}
  lines {{ id: 2 name: "tf_XLAEigen/1"
    events {{ metadata_id: 4 offset_ps: 0 duration_ps: {5 * PS} }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "$trace.py:1102 trace_tokens" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "$fromnumeric.py:1 sum" }} }}
  event_metadata {{ key: 3 value {{ id: 3 name: "$tiling.py:236 cumulative" }} }}
  event_metadata {{ key: 4 value {{ id: 4 name: "ThreadpoolListener::StartRegion" }} }}
}}
'''


def test_profile_summary_totals_each_stream_and_this_projects_functions(tmp_path):
    run = tmp_path / "plugins" / "profile" / "2026_12_04"
    run.mkdir(parents=True)
    (run / "host.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace(XSPACE))
    s = profile_summary(str(tmp_path), wall=0.02)
    assert s["wall_s"] == 0.02
    compute = s["devices"]["/device:GPU:0 Stream #13(Compute)"]
    assert compute["events"] == 3 and compute["busy_s"] == pytest.approx(0.006)
    assert compute["top"] == [["gemm_fusion", 0.005], ["scatter_add", 0.001]]
    assert s["devices"]["/device:GPU:0 Stream #14(MemcpyD2H)"]["top"] == [["MemcpyD2H", 0.004]]
    # The host: this project's functions only (numpy's `sum` left out), largest first; threads'
    # busy time without the thread pools' markers.
    assert s["host"]["python_top"] == [["$trace.py:1102 trace_tokens", 0.009],
                                       ["$tiling.py:236 cumulative", 0.002]]
    assert s["host"]["threads_busy_s"] == {"python": 0.015}


def test_profile_summary_without_a_profile_says_so(tmp_path):
    assert "no .xplane.pb" in profile_summary(str(tmp_path), wall=1.0)["error"]


def test_compile_seconds_counts_the_part_inside_the_window():
    """`compile_seconds` (the rows' time spent compiling, from jax.monitoring's events, each
    reported at its end with its length): an event wholly inside counts whole, one straddling
    an edge only for its part inside, one outside not at all."""
    from scripts.bench_trace import compile_seconds

    events = [(3.0, 1.0),  # 2-3: inside
              (10.5, 1.0),  # 9.5-10.5: half inside
              (1.5, 1.0),  # 0.5-1.5: half inside
              (20.0, 2.0),  # 18-20: outside
              (0.5, 0.5)]  # 0-0.5: outside
    assert compile_seconds(events, 1.0, 10.0) == pytest.approx(1.0 + 0.5 + 0.5)
    assert compile_seconds([], 0.0, 1.0) == 0.0
