"""Training loses nothing and mixes nothing: a run killed while caching activations recovers, a
run directory is locked, `--no-resume` moves an old run aside, NaN never becomes the last good
state, a checkpoint is called saved only once it is, and a full disk while writing a checkpoint,
a metrics row or the export leaves no partial file and gives one line."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from clt.configs import ConfigError, to_dict
from clt.train import NonFiniteError, TrainConfig, train
from clt.transcoder import load
from tests.clt.tiny_train import tiny_model, write_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt", n_docs=80)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(autouse=True)
def _caches(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path_factory.mktemp("cache")))


def _tc(corpus, out, **kw) -> TrainConfig:
    base = {"model": "tiny", "data": str(corpus), "context_length": 16, "n_features": 32,
            "steps": 6, "batch_tokens": 64, "round_contexts": 8, "lr": 3e-3, "warmup_steps": 2,
            "out": str(out), "checkpoint_every": 2, "log_every": 1, "mesh_data": 1,
            "async_checkpoints": False}
    base.update(kw)
    return TrainConfig.make(**base)


def _same_params(a: Path, b: Path) -> bool:
    """Equal up to float32 rounding (a resumed run reruns the same steps)."""
    (_, pa), (_, pb) = load(a), load(b)
    return all(np.allclose(x, y, rtol=0, atol=1e-6)
               for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))


def saved_steps(directory: Path) -> list[int]:
    """The complete checkpoints: orbax renames a step's directory to its number when whole."""
    return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


def _steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# --- a run killed while writing its activation cache --------------------------------------------
CACHE_KILL_DRIVER = """
import io, json, os, signal, sys
import numpy as np
from clt.train import TrainConfig, train
from tests.clt.tiny_train import tiny_model
real, calls = np.savez, []
def savez(file, **kw):  # the second round's write: half the bytes reach the disk, then SIGKILL
    calls.append(1)
    if len(calls) == 2:
        buf = io.BytesIO()
        real(buf, **kw)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(file, "write"):
            file.write(half)
            file.flush()
        else:
            with open(file, "wb") as f:
                f.write(half)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(file, **kw)
np.savez = savez
train(TrainConfig.make(**json.loads(sys.argv[1])), model=tiny_model(), progress=False)
"""


def test_killed_while_caching_activations_the_next_run_recovers(corpus, model, tmp_path,
                                                                 capsys):
    ref = train(_tc(corpus, tmp_path / "ref", checkpoint_every=100), model=model,
                progress=False)
    cache = tmp_path / "cache"
    tc = _tc(corpus, tmp_path / "run", checkpoint_every=100, cache_activations=str(cache))
    driver = tmp_path / "driver.py"
    driver.write_text(CACHE_KILL_DRIVER)
    proc = subprocess.run([sys.executable, str(driver), json.dumps(to_dict(tc))], env=_env(),
                          cwd=ROOT, capture_output=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr.decode()[-3000:]
    # Round 1 was being written: its half is in a temporary file, never under the round's name.
    assert sorted(p.name for p in cache.glob("round_*")) == ["round_000000.npz"]
    assert len(list(cache.glob(".round_000001.npz.*.tmp"))) == 1
    # And a round file truncated by an older version (which wrote in place) is found too.
    r0 = cache / "round_000000.npz"
    r0.write_bytes(r0.read_bytes()[:1000])
    capsys.readouterr()
    path = train(tc, model=model, progress=False)
    err = capsys.readouterr().err
    assert "left unfinished by a killed run" in err
    assert "discarded the unreadable activation cache file" in err and "round_000000" in err
    assert "took over the lock" in err  # the killed process's
    assert not list(cache.glob(".*.tmp"))
    assert _same_params(path, ref)  # regenerated rounds: the same training as without a cache
    # Another run's settings are refused, not mixed in.
    with pytest.raises(ConfigError, match="holds activations made with other settings.*seed"):
        train(_tc(corpus, tmp_path / "other", seed=3, cache_activations=str(cache)),
              model=model, progress=False)


# --- one run directory, one trainer --------------------------------------------------------------
LOCK_DRIVER = """
import json, sys, time
from clt.train import TrainConfig, train
from tests.clt.tiny_train import tiny_model
def on_step(step):
    if step == 1:
        print("training", flush=True)
        time.sleep(600)
train(TrainConfig.make(**json.loads(sys.argv[1])), model=tiny_model(), progress=False,
      on_step=on_step)
"""


def test_a_second_trainer_on_one_directory_refuses_naming_the_first(corpus, model, tmp_path,
                                                                     capsys, monkeypatch):
    tc = _tc(corpus, tmp_path / "run")
    driver = tmp_path / "driver.py"
    driver.write_text(LOCK_DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), json.dumps(to_dict(tc))], env=_env(),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline().decode()
        assert line.strip() == "training", proc.stderr.read().decode()[-3000:]

        def no_model(*a, **k):
            raise AssertionError("the model was loaded before the lock was checked")

        with monkeypatch.context() as m:
            m.setattr("clt.lm.loading.load_model", no_model)
            with pytest.raises(ConfigError, match=f"in use: process {proc.pid} is training"):
                train(tc, progress=False)
            with pytest.raises(ConfigError, match=f"process {proc.pid}"):
                train(tc, resume=False, progress=False)  # nor moves its files aside
        assert (tmp_path / "run" / "config.json").exists()
        assert not list(tmp_path.glob("run.replaced-*"))
    finally:
        proc.kill()
        proc.wait()
    # The killed trainer's lock (its pid, no process) is taken over.
    assert str(proc.pid) in (tmp_path / "run" / ".lock").read_text()
    capsys.readouterr()
    train(tc, model=model, progress=False)
    assert f"took over the lock of {tmp_path / 'run'} from process {proc.pid}" in \
        capsys.readouterr().err
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released


# --- --no-resume over an existing run -------------------------------------------------------------
def test_no_resume_moves_the_old_run_aside_and_never_mixes(corpus, model, tmp_path, capsys):
    ref = train(_tc(corpus, tmp_path / "ref", seed=1), model=model, progress=False)
    out = tmp_path / "run"
    train(_tc(corpus, out, seed=0), model=model, progress=False)  # an old, finished run
    seed1 = _tc(corpus, out, seed=1)

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        train(seed1, resume=False, progress=False, on_step=interrupt, model=model)
    io = capsys.readouterr()
    aside = next(tmp_path.glob("run.replaced-*"))
    assert f"the previous run in {out} was moved to {aside}" in io.err
    assert f"checkpoint 3 saved in {out}" in io.out
    # The old run is whole, aside; the run directory holds only the new run.
    assert json.loads((aside / "config.json").read_text())["config"]["seed"] == 0
    assert saved_steps(aside / "checkpoints")[-1] == 6 and (aside / "transcoder").is_dir()
    assert saved_steps(out / "checkpoints") == [2, 3] and not (out / "transcoder").exists()
    assert _steps(out) == [1, 2, 3]
    # Run again: it resumes the seed-1 run and exports what an uninterrupted seed-1 run does.
    path = train(seed1, progress=False, model=model)
    assert json.loads((path / "info.json").read_text())["train_config"]["seed"] == 1
    assert _same_params(path, ref)
    assert _steps(out) == [1, 2, 3, 4, 5, 6]


# --- NaN / inf ------------------------------------------------------------------------------------
def test_nan_never_becomes_the_last_good_state(corpus, model, tmp_path, monkeypatch):
    """From step 4 on the learning rate is NaN: the loss and the gradients of step 4 are finite,
    so only the step size shows it, and the step is refused before it touches the state."""
    from clt import sharding as shd
    from clt import train as train_mod

    real = train_mod.learning_rate

    def nan_after_3(train_cfg):
        return lambda count: jax.numpy.where(count >= 3, jax.numpy.nan, real(train_cfg)(count))

    monkeypatch.setattr(train_mod, "learning_rate", nan_after_3)
    tc = _tc(corpus, tmp_path / "run", checkpoint_every=100)
    with pytest.raises(NonFiniteError, match="step 4: the learning rate is NaN/inf.*"
                                             "saved as checkpoint 3"):
        train(tc, model=model, progress=False)
    mngr = train_mod._manager(tmp_path / "run", 3)
    assert saved_steps(tmp_path / "run" / "checkpoints") == [3]
    state, _, _ = train_mod.restore_checkpoint(mngr, tc.transcoder_config(model.cfg), tc,
                                               shd.make_mesh(1, 1))
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(state.params))
    # A non-finite state is never saved, nor exported.
    bad = dataclasses.replace(state, params=jax.tree.map(lambda a: a * np.nan, state.params))
    with pytest.raises(NonFiniteError, match="not saved"):
        train_mod.save_checkpoint(mngr, bad, train_mod.DataPosition())
    with pytest.raises(NonFiniteError, match="not exported"):
        train_mod.export_params(tc.transcoder_config(model.cfg), bad)


def test_a_checkpoint_is_called_saved_only_once_it_is(corpus, model, tmp_path, monkeypatch,
                                                      capsys):
    import orbax.checkpoint as ocp

    monkeypatch.setattr(ocp.CheckpointManager, "save", lambda self, *a, **k: False)  # lost

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_tc(corpus, tmp_path / "run"), model=model, progress=False, on_step=interrupt)
    out = capsys.readouterr().out
    assert "interrupted: checkpoint 3 was not saved" in out
    assert out.rstrip().endswith("no checkpoint is saved yet")
    assert "checkpoint 3 saved" not in out


# --- a full disk ---------------------------------------------------------------------------------
def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullDisk:
    """A binary file whose `fail_at`-th write puts half its bytes on disk, then fails with
    ENOSPC."""

    def __init__(self, f, counter: list, fail_at: int):
        self.f, self.counter, self.fail_at = f, counter, fail_at

    def write(self, data):
        self.counter.append(1)
        if len(self.counter) == self.fail_at:
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            raise _enospc()
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _cli_train(tc: TrainConfig, capsys, monkeypatch, model) -> tuple[int, list[str], str]:
    from cltrace.cli import main

    monkeypatch.setattr("clt.lm.loading.load_model", lambda name: model)
    args = ["train", "--no-progress", "--model", "tiny", "--data", tc.data, "--out", tc.out,
            "--context-length", "16", "--n-features", "32", "--steps", str(tc.steps),
            "--batch-tokens", "64", "--round-contexts", "8", "--warmup-steps", "2",
            "--checkpoint-every", str(tc.checkpoint_every), "--log-every", str(tc.log_every),
            "--mesh-data", "1"]
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    return rc, [ln for ln in err.splitlines() if "error:" in ln], err


def test_full_disk_at_a_checkpoint(corpus, model, tmp_path, capsys, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh

    real = jh.JsonCheckpointHandler._save_fn

    async def fill_at_4(self, x, directory):
        if x.get("step") == 4:
            raise _enospc()
        return await real(self, x, directory)

    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", fill_at_4)
    tc = _tc(corpus, tmp_path / "run")
    rc, errors, err = _cli_train(tc, capsys, monkeypatch, model)
    assert rc == 2 and len(errors) == 1, err
    assert "Traceback" not in err, err
    assert "No space left on device" in errors[0]
    assert "the last saved checkpoint is 2" in errors[0]
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["2"]  # no partial checkpoint 4
    monkeypatch.setattr(jh.JsonCheckpointHandler, "_save_fn", real)
    rc, errors, err = _cli_train(tc, capsys, monkeypatch, model)  # space again: it resumes
    assert rc == 0, err
    assert saved_steps(ckpt)[-1] == 6 and _steps(tmp_path / "run") == [1, 2, 3, 4, 5, 6]


def test_full_disk_at_a_metrics_row(corpus, model, tmp_path, capsys, monkeypatch):
    import builtins

    from clt import train_run

    counter: list = []

    def opener(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)  # noqa: SIM115 (the caller closes it)
        return _FullDisk(f, counter, 4) if str(path).endswith("metrics.jsonl") else f

    monkeypatch.setattr(train_run, "open", opener, raising=False)
    tc = _tc(corpus, tmp_path / "run")
    rc, errors, err = _cli_train(tc, capsys, monkeypatch, model)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "metrics.jsonl: No space left on device; the row of step 4 was not written" \
        in errors[0]
    assert "run the same command to resume from checkpoint 2" in errors[0]
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert text.endswith("\n") and _steps(tmp_path / "run") == [1, 2, 3]  # no half row


def test_full_disk_at_the_export(corpus, model, tmp_path, capsys, monkeypatch):
    import builtins

    from clt import io as clt_io

    counter: list = []

    def opener(path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)  # noqa: SIM115 (the caller closes it)
        return _FullDisk(f, counter, 1) if ".transcoder.safetensors." in str(path) else f

    monkeypatch.setattr(clt_io, "open", opener, raising=False)
    tc = _tc(corpus, tmp_path / "run")
    rc, errors, err = _cli_train(tc, capsys, monkeypatch, model)
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "transcoder.safetensors: No space left on device; nothing was written" in errors[0]
    assert [p.name for p in (tmp_path / "run" / "transcoder").iterdir()] == []  # no partial file
    assert saved_steps(tmp_path / "run" / "checkpoints")[-1] == 6  # the run itself is kept
    monkeypatch.setattr(clt_io, "open", builtins.open, raising=False)
    rc, errors, err = _cli_train(tc, capsys, monkeypatch, model)  # the same command exports
    assert rc == 0, err
    assert load(tmp_path / "run" / "transcoder")[0].n_features == 32
