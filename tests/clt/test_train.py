"""Training: it learns, lambda controls L0, sharded equals unsharded (one and two processes),
kill-and-resume is exact, NaNs stop cleanly, mismatched configs are refused before compute."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from clt import sharding as shd
from clt.configs import ConfigError
from clt.train import (
    NonFiniteError, TrainConfig, compile_step, init_state, place_state, restore_checkpoint, train,
)
from clt.transcoder import Norms, TranscoderConfig, load
from tests.clt.tiny_train import tiny_model, write_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _tc(corpus, out, **kw) -> TrainConfig:
    base = dict(model="tiny", data=str(corpus), context_length=32, n_features=64, steps=150,
                batch_tokens=256, round_contexts=32, lr=3e-3, warmup_steps=10, out=str(out),
                checkpoint_every=50, log_every=10, sparsity_coef=1e-3, mesh_data=1,
                async_checkpoints=False)
    base.update(kw)
    return TrainConfig.make(**base)


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_nmse(corpus, model, tmp_path):
    path = train(_tc(corpus, tmp_path / "run"), model=model, progress=False)
    rows = _metrics(tmp_path / "run")
    first, last = rows[0]["nmse"], rows[-1]["nmse"]
    # Measured: ~0.74 at step 10 and ~0.21 at step 150 (float32, CPU).
    assert last < 0.5 * first and last < 0.35, (first, last)
    cfg, params = load(path)
    assert cfg.n_features == 64 and cfg.d_model == model.cfg.d_model
    info = json.loads((path / "info.json").read_text())
    assert info["train_config"]["steps"] == 150 and info["final_metrics"]["step"] == 150


def test_jumprelu_l0_falls_as_lambda_rises(corpus, model, tmp_path):
    l0 = {}
    for lam in (1e-4, 3e-2):
        out = tmp_path / f"lam{lam}"
        train(_tc(corpus, out, sparsity_coef=lam, sparsity_ramp=0.3, steps=120), model=model,
              progress=False)
        l0[lam] = _metrics(out)[-1]["l0"]
    # Measured: total L0 (3 layers) ~90 at 1e-4 and ~25 at 3e-2.
    assert l0[3e-2] < 0.6 * l0[1e-4], l0


def _state_and_batch(n_features=64):
    cfg = TranscoderConfig(d_model=8, n_layers=3, n_features=n_features, skip=True)
    tc = TrainConfig.make(n_features=n_features, skip=True, batch_tokens=32, lr=1e-2,
                          warmup_steps=0)
    k = jax.random.split(jax.random.key(3), 2)
    x, y = jax.random.normal(k[0], (32, 3, 8)), jax.random.normal(k[1], (32, 3, 8))
    return cfg, tc, init_state(cfg, tc, Norms.identity(3, 8)), x, y


def _max_rel(a_tree, b_tree) -> float:
    """Largest per-tensor relative difference max|a - b| / max|b| (elementwise ratios would
    divide float32 rounding noise by entries that are near zero)."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
    return worst


def test_sharded_step_equals_unsharded():
    """Mesh data=2 x feature=4 over 8 simulated CPU devices vs one device, two steps."""
    assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 host devices"
    cfg, tc, state, x, y = _state_and_batch()
    results = []
    for data, feature in ((1, 1), (2, 4)):
        mesh = shd.make_mesh(data, feature)
        step = compile_step(cfg, tc, mesh)
        s = place_state(state, cfg, tc, mesh)
        for _ in range(2):
            s, _ = step(s, x, y)
        results.append(s)
    sharded_w = results[1].params.W_enc
    assert sharded_w.sharding.spec == jax.sharding.PartitionSpec(None, None, "feature")
    assert len({str(sh.index) for sh in sharded_w.addressable_shards}) == 4
    assert _max_rel(results[1].params, results[0].params) <= 1e-5
    assert _max_rel(results[1].opt_state, results[0].opt_state) <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DIST_DRIVER = """
import os, sys
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
import numpy as np
from clt import sharding as shd
from clt.train import compile_step, place_state
from tests.clt.test_train import _state_and_batch
cfg, tc, state, x, y = _state_and_batch()
one = shd.make_mesh(1, 1, devices=jax.local_devices()[:1])
ref, _ = compile_step(cfg, tc, one)(place_state(state, cfg, tc, one), x, y)
mesh = shd.make_mesh(2, 4)
bs = shd.batch_sharding(mesh)
hx, hy = np.asarray(x), np.asarray(y)
gx = jax.make_array_from_callback(hx.shape, bs, lambda i: hx[i])
gy = jax.make_array_from_callback(hy.shape, bs, lambda i: hy[i])
new, _ = compile_step(cfg, tc, mesh)(place_state(state, cfg, tc, mesh), gx, gy)
worst, shards = 0.0, 0
for a, r in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
    r = np.asarray(r)
    scale = max(float(np.abs(r).max()), 1e-30)  # relative to the tensor's largest entry
    for sh in a.addressable_shards:
        d = np.abs(np.asarray(sh.data) - r[sh.index]).max() / scale
        worst, shards = max(worst, float(d)), shards + 1
open(out, "w").write(f"{worst} {shards} {len(jax.devices())} {len(jax.local_devices())}")
"""


def test_two_processes_with_jax_distributed_match_one_device(tmp_path):
    """Two processes on localhost (4 CPU devices each, gloo collectives) train one step on a
    2 x 4 mesh; each checks its shards against a single-device step."""
    driver = tmp_path / "driver.py"
    driver.write_text(DIST_DRIVER)
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(driver), str(i), port,
                               str(tmp_path / f"r{i}.txt")], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    for i in range(2):
        worst, shards, n_global, n_local = (tmp_path / f"r{i}.txt").read_text().split()
        assert (int(n_global), int(n_local)) == (8, 4)
        assert int(shards) > 0
        assert float(worst) <= 1e-5, f"process {i}: max relative difference {worst}"


KILL_DRIVER = """
import os, signal, sys
from clt.train import TrainConfig, train
from tests.clt.tiny_train import tiny_model
cfg = TrainConfig.make(**__import__("json").loads(sys.argv[1]))
kill_at = int(sys.argv[2])
def on_step(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no chance to save anything
train(cfg, model=tiny_model(), progress=False, on_step=on_step)
"""


def test_sigkill_then_resume_matches_uninterrupted_run(corpus, model, tmp_path):
    from clt.configs import to_dict

    kw = dict(steps=24, checkpoint_every=8, log_every=4, batch_tokens=128, round_contexts=8)
    ref = train(_tc(corpus, tmp_path / "ref", **kw), model=model, progress=False)
    driver = tmp_path / "kill.py"
    driver.write_text(KILL_DRIVER)
    tc = _tc(corpus, tmp_path / "killed", **kw)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(driver), json.dumps(to_dict(tc)), "13"], env=env,
                          cwd=ROOT, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    ckpts = sorted(int(p.name) for p in (tmp_path / "killed" / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert ckpts == [8], ckpts  # killed between checkpoints 8 and 16
    resumed = train(tc, model=model, progress=False)
    _, a = load(resumed)
    _, b = load(ref)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    steps = [r["step"] for r in _metrics(tmp_path / "killed")]
    assert steps[-1] == 24 and 12 in steps  # logged up to 12 before the kill, resumed after 8


def test_restore_onto_a_different_mesh(corpus, model, tmp_path):
    tc = _tc(corpus, tmp_path / "run", steps=6, checkpoint_every=3, mesh_data=2, mesh_feature=4)
    train(tc, model=model, progress=False)
    cfg = tc.transcoder_config(model.cfg)
    from clt.train import _manager

    mngr = _manager(tmp_path / "run", 3)
    s8, pos8, _ = restore_checkpoint(mngr, cfg, tc, shd.make_mesh(2, 4))
    s1, pos1, _ = restore_checkpoint(mngr, cfg, tc, shd.make_mesh(1, 1))
    assert pos8 == pos1 and int(s1.step) == 6
    assert s1.params.W_enc.sharding.mesh.devices.size == 1
    assert _max_rel(s1, s8) == 0.0


def test_nan_in_batch_stops_with_a_usable_checkpoint(corpus, model, tmp_path, monkeypatch):
    from clt.data import ActivationStream

    real = ActivationStream.batches

    def poisoned(self, start, **kw):
        for i, (pos, x, y) in enumerate(real(self, start, **kw)):
            yield pos, (x.at[0, 0, 0].set(np.nan) if i == 4 else x), y

    monkeypatch.setattr(ActivationStream, "batches", poisoned)
    tc = _tc(corpus, tmp_path / "run", steps=10, checkpoint_every=100)
    with pytest.raises(NonFiniteError, match="step 5: the batch holds NaN.*checkpoint 4"):
        train(tc, model=model, progress=False)
    from clt.train import _manager

    state, _, _ = restore_checkpoint(_manager(tmp_path / "run", 3), tc.transcoder_config(
        model.cfg), tc, shd.make_mesh(1, 1))
    assert int(state.step) == 4
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state.params))


def test_mismatched_run_directory_is_refused_before_compute(corpus, model, tmp_path,
                                                            monkeypatch):
    tc = _tc(corpus, tmp_path / "run", steps=3)
    train(tc, model=model, progress=False)

    def no_compute(*a, **k):
        raise AssertionError("data was read before the config was checked")

    monkeypatch.setattr("clt.data.open_contexts", no_compute)
    with pytest.raises(ConfigError, match="transcoder/model mismatch.*n_layers=3"):
        train(tc, model=tiny_model(n_layers=4), progress=False)
    with pytest.raises(ConfigError, match="different n_features"):
        train(_tc(corpus, tmp_path / "run", steps=3, n_features=32), model=model, progress=False)
    with pytest.raises(ConfigError, match="not divisible by the mesh's feature axis"):
        train(_tc(corpus, tmp_path / "other", n_features=66, mesh_feature=4), model=model,
              progress=False)


def test_resume_continues_metrics_and_config_validation(corpus, model, tmp_path):
    with pytest.raises(ConfigError, match="sparsity_ramp"):
        _tc(corpus, tmp_path, sparsity_ramp=0.0)
    tc = _tc(corpus, tmp_path / "run", steps=4, log_every=2, checkpoint_every=2)
    train(tc, model=model, progress=False)
    train(_tc(corpus, tmp_path / "run", steps=8, log_every=2, checkpoint_every=2), model=model,
          progress=False)
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [2, 4, 6, 8]




@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigterm-in-step", "sigint-in-step"])
def test_interrupt_saves_a_checkpoint_to_resume_from(corpus, model, tmp_path, monkeypatch, how):
    """Ctrl-C (KeyboardInterrupt, here raised after step 5) or SIGTERM (a scheduler's
    preemption notice, sent to this process after step 5) saves the current step. A signal
    that comes while step 5 runs (its input state is donated: there is nothing to save until it
    returns) stops training when that step ends, and saves it."""
    import os
    import signal

    from clt import train as train_mod

    def interrupt(step):
        if step == 5 and how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif step == 5 and how == "ctrl-c":
            raise KeyboardInterrupt

    calls, real_call = [], train_mod.Steps.__call__

    def in_step(self, state, x, y):
        calls.append(1)
        if len(calls) == 5 and how.endswith("in-step"):
            os.kill(os.getpid(), signal.SIGTERM if how.startswith("sigterm") else signal.SIGINT)
        return real_call(self, state, x, y)

    monkeypatch.setattr(train_mod.Steps, "__call__", in_step)
    tc = _tc(corpus, tmp_path / "run", steps=8, checkpoint_every=100)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(tc, model=model, progress=False, on_step=interrupt)
    # The handlers are put back.
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    from clt.train import _manager

    assert _manager(tmp_path / "run", 3).latest_step() == 5
    monkeypatch.undo()
    train(tc, model=model, progress=False)
    assert [r["step"] for r in _metrics(tmp_path / "run")][-1] == 8


def test_init_from_continues_an_exported_transcoder(corpus, model, tmp_path):
    """A run started from an exported transcoder (fresh optimizer) starts where it ended; an
    architecture mismatch is refused before any compute."""
    first = train(_tc(corpus, tmp_path / "a", steps=80), model=model, progress=False)
    end = _metrics(tmp_path / "a")[-1]["nmse"]
    train(_tc(corpus, tmp_path / "b", steps=10, lr=1e-8, warmup_steps=1, init_from=str(first)),
          model=model, progress=False)
    fresh_start = _metrics(tmp_path / "a")[0]["nmse"]
    got = _metrics(tmp_path / "b")[-1]["nmse"]
    # Measured: ~0.25 at the end of run a, ~0.75 at step 10 of a fresh run.
    assert abs(got - end) < 0.25 * end and got < 0.6 * fresh_start, (got, end, fresh_start)
    with pytest.raises(ConfigError, match="n_features"):
        train(_tc(corpus, tmp_path / "c", n_features=32, init_from=str(first)), model=model,
              progress=False)


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
@pytest.mark.parametrize("grad_clip", [0.0, 0.05, 100.0])
def test_fused_adam_equals_optax(grad_clip, kernels):
    """The step's one-pass Adam (adam_update: XLA's loops, or with kernels "cpu" the numba
    pass run in place as one FFI call) against optax's clip + adam + apply_updates, the
    reference it replaces, over 6 steps through warmup and cosine decay (clipping active at 0.05,
    inactive at 100, off at 0); a refused update (ok false) changes no bit of the state."""
    import optax

    from clt.train import adam_update, make_optimizer

    tc = TrainConfig.make(model="tiny", data="unused", n_features=8, batch_tokens=8, lr=3e-2,
                          warmup_steps=2, steps=6, grad_clip=grad_clip, beta1=0.8, beta2=0.99)
    rng = np.random.default_rng(0)
    params = {"a": jax.numpy.asarray(rng.normal(size=(3, 5)), jax.numpy.float32),
              "b": (jax.numpy.asarray(rng.normal(size=(7,)), jax.numpy.float32),)}
    tx = make_optimizer(tc)
    ref_p, ref_s = params, tx.init(params)
    p, s = params, tx.init(params)
    step = jax.jit(lambda p, g, s, ok: adam_update(p, g, s, tc, ok, kernels))
    if kernels == "cpu":  # the handler is in the program, once (not XLA's loops)
        from clt import _sparse_ffi

        assert _sparse_ffi.available()
        text = step.lower(params, params, tx.init(params), jax.numpy.bool_(True)).as_text()
        assert text.count(_sparse_ffi.ADAM) == 1
    for i in range(6):
        grads = jax.tree.map(lambda a: jax.numpy.asarray(rng.normal(size=a.shape) * 0.1,
                                                         jax.numpy.float32), params)
        upd, ref_s = tx.update(grads, ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, upd)
        p, s, ok, _ = step(p, grads, s, jax.numpy.bool_(True))
        assert bool(ok)
        for got, want in zip(jax.tree.leaves((p, s)), jax.tree.leaves((ref_p, ref_s))):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-6, atol=1e-7)
        assert jax.tree.structure(s) == jax.tree.structure(ref_s)  # checkpoint layout kept
    bad = jax.tree.map(lambda a: a * np.nan, grads)
    for g, flag in ((grads, False), (bad, True)):
        p2, s2, ok, _ = step(p, g, s, jax.numpy.bool_(flag))
        assert not bool(ok)
        for got, want in zip(jax.tree.leaves((p2, s2)), jax.tree.leaves((p, s))):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
