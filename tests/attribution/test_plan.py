"""The trace planner (`attribution.plan`, `cltrace trace --plan`): the work it counts is the
work a trace does (rows, batches, position prefixes, counted by wrapping the tracer's row maker
during real traces), it writes nothing, and auto mode streams when the dense graph would not fit
in memory. Its time and memory predictions are checked against measured runs by
`scripts/bench_plan.py` (not timed here)."""

from __future__ import annotations

import dataclasses
import importlib

import jax.numpy as jnp
import numpy as np
import pytest

from attribution.plan import Measured, plan_modes
from attribution.trace import TraceConfig, setup_trace, trace_tokens
from clt.lm import load_model
from cltrace.cli import main
from tests.attribution.helpers import random_transcoder

trace_mod = importlib.import_module("attribution.trace")  # the package exports trace()
stream_mod = importlib.import_module("attribution.stream")
IDS = [5, 9, 3, 17, 22, 8, 40, 11, 2, 30]


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    m = load_model(tiny_dirs("llama"))
    cfg, p = random_transcoder(m.cfg, 16)
    p = dataclasses.replace(p, log_threshold=jnp.full_like(p.log_threshold, np.log(0.05)))
    return m, cfg, p


class _Counter:
    """Wraps `_RowMaker.__call__`: the batches a trace makes and their position prefixes."""

    def __init__(self, monkeypatch):
        self.calls, self.prefixes, self.rows = 0, set(), 0
        real = trace_mod._RowMaker.__call__

        def counted(maker, layer, pos, vec, host=True, padded=False, features=None):
            self.calls += 1
            self.rows += len(layer)
            self.prefixes.add(maker.prefix_length(np.asarray(pos)))
            return real(maker, layer, pos, vec, host, padded, features)

        monkeypatch.setattr(trace_mod._RowMaker, "__call__", counted)


FAKE = Measured(base_gb=1.0, batch_seconds=0.5, compile_seconds=2.0,
                host_seconds_per_element=1e-9)


@pytest.mark.parametrize("mode,fields", [
    ("dense", {"adjacency": "dense"}),
    ("stream", {"adjacency": "stream", "stream_features": 20}),
    ("capped", {"max_feature_nodes": 24, "update_interval": 2}),
])
def test_plan_counts_the_work_of_the_trace(tiny, monkeypatch, mode, fields):
    m, cfg, p = tiny
    config = TraceConfig(prompt="x", batch_size=8, position_bucket=4, **fields)
    st = setup_trace(m.params, m.cfg, cfg, p, IDS, config)
    assert st.n_all > 40  # enough features for several batches per layer
    plan = {q.mode: q for q in plan_modes(st, config, m.cfg.n_layers, FAKE)}[mode]
    assert plan.chosen
    counter = _Counter(monkeypatch)
    g = trace_tokens(m.params, m.cfg, cfg, p, IDS, config)
    assert plan.rows == counter.rows
    assert plan.batches == counter.calls
    assert plan.compilations == len(counter.prefixes)
    assert plan.features_kept == g.ranges.feature.stop
    # Time: compilation per prefix + each batch's scaled cost; memory above the base.
    assert plan.seconds >= FAKE.compile_seconds * plan.compilations
    assert plan.peak_gb >= FAKE.base_gb and plan.disk_mb > 0


def test_plan_flag_prints_every_mode_and_writes_nothing(tmp_path, monkeypatch, capsys):
    m = load_model("smollm2-135m")
    tc_cfg, p = random_transcoder(m.cfg, 8, max_reach=1)
    p = dataclasses.replace(p, log_threshold=jnp.full_like(p.log_threshold, np.log(0.5)))
    from clt.transcoder import save

    save(tmp_path / "tc", tc_cfg, p)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rc = main(["trace", "The capital of France is", "--model", "smollm2-135m", "--transcoder",
               str(tmp_path / "tc"), "--plan", "--no-progress", "--max-adjacency-gb", "1e-6"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for mode in ("dense", "stream", "capped"):
        assert f"│ {mode}" in out
    assert "refused" in out  # 1e-6 GB: the dense graph is over it, and so is the stored one
    assert list(work.iterdir()) == []


def test_auto_streams_when_the_dense_graph_would_not_fit(monkeypatch):
    config = TraceConfig(prompt="x")
    args = {"n_all": 5000, "cap": 5000, "n_src": 5300, "n_err": 290, "T": 10, "n_logit": 10}
    assert not stream_mod.use_stream(config, **args)
    n = 5000 + 290 + 10 + 10
    monkeypatch.setattr(stream_mod, "available_bytes",
                        lambda: n * n * stream_mod.DENSE_BYTES / 0.9 * 0.99)
    assert stream_mod.use_stream(config, **args)
    assert not stream_mod.use_stream(dataclasses.replace(config, adjacency="dense"), **args)


def test_capped_plan_replays_the_visits_first_batches(tiny, monkeypatch):
    """With the measured targets' rows (a real `measure`), the capped plan's batches are the
    greedy visit's: its first update_interval batches are the trace's own (same layers and
    positions, in order), and it counts every row and batch the trace makes."""
    from attribution.plan import _visit_batches, measure

    m, cfg, p = tiny
    config = TraceConfig(prompt="x", batch_size=8, position_bucket=4, max_feature_nodes=40,
                         update_interval=2, max_n_logits=5)  # one batch holds every target
    st = setup_trace(m.params, m.cfg, cfg, p, IDS, config)
    measured = measure(st, m.cfg.n_layers)
    assert measured.logit_rows is not None and measured.logit_rows.shape[1] == st.n_src
    plan = {q.mode: q for q in plan_modes(st, config, m.cfg.n_layers, measured)}["capped"]
    seen = []
    real = trace_mod._RowMaker.__call__

    def recorded(maker, layer, pos, vec, host=True, padded=False, features=None):
        seen.append((np.asarray(layer).copy(), np.asarray(pos).copy()))
        return real(maker, layer, pos, vec, host, padded, features)

    monkeypatch.setattr(trace_mod._RowMaker, "__call__", recorded)
    trace_tokens(m.params, m.cfg, cfg, p, IDS, config)
    visit = _visit_batches(st, measured, m.cfg.n_layers, 40, 16)
    n_logit_batches = -(-st.n_logit // 8)
    assert plan.batches == len(seen) == len(visit) + n_logit_batches
    assert plan.rows == sum(len(layer) for layer, _ in seen)
    for b, (layer, pos) in zip(visit[:2], seen[n_logit_batches:n_logit_batches + 2]):
        np.testing.assert_array_equal(st.active.layer[b], layer)
        np.testing.assert_array_equal(st.active.pos[b], pos)


def test_batch_time_is_the_line_through_the_two_measured_batches():
    """A fixed part per batch plus one per FLOP, through (low_flops, low_seconds) and
    (full_flops, batch_seconds); scaled by arithmetic alone when only the full batch was timed."""

    class Make:
        @staticmethod
        def flops(P, layer):
            return float(P * (layer + 1))

    two = Measured(base_gb=1.0, batch_seconds=1.0, compile_seconds=0.0,
                   host_seconds_per_element=0.0, full_flops=100.0, low_seconds=0.3,
                   low_flops=20.0)
    # rate 0.7 / 80 per FLOP, fixed 1 - 100 * rate = 0.125 s
    assert two.batch(Make, 10, 1) == pytest.approx(0.3)  # 20 FLOPs: the low batch itself
    assert two.batch(Make, 10, 5) == pytest.approx(0.125 + 60 * 0.7 / 80)
    assert two.batch(Make, 10, 9) == pytest.approx(1.0)
    one = dataclasses.replace(two, low_seconds=0.0, low_flops=0.0)
    assert one.batch(Make, 10, 5) == pytest.approx(0.6)
    # A noisy low batch slower than the full one: no negative rate, every batch the full one's.
    noisy = dataclasses.replace(two, low_seconds=1.5)
    assert noisy.batch(Make, 10, 1) == pytest.approx(1.0)


@pytest.mark.parametrize("precision", ["default", "highest"])
def test_every_program_of_a_trace_runs_at_its_matmul_precision(tiny, monkeypatch, precision):
    """TraceConfig.matmul_precision holds for the forward pass and every batch of rows (jax's
    own default is TensorFloat-32 on recent NVIDIA GPUs); the caller's setting is restored."""
    import jax

    m, cfg, p = tiny
    seen = []
    rep = importlib.import_module("attribution.replacement")
    for owner, name in ((rep, "build"), (trace_mod._RowMaker, "__call__")):
        real = getattr(owner, name)

        def spy(*a, _real=real, **k):
            seen.append(jax.config.jax_default_matmul_precision)
            return _real(*a, **k)

        monkeypatch.setattr(owner, name, spy)
    before = jax.config.jax_default_matmul_precision
    for fields in ({"adjacency": "dense"}, {"adjacency": "stream", "stream_features": 20}):
        config = TraceConfig(prompt="x", batch_size=8, matmul_precision=precision, **fields)
        trace_tokens(m.params, m.cfg, cfg, p, IDS, config)
    assert len(seen) > 4 and set(seen) == {precision}
    assert jax.config.jax_default_matmul_precision == before
