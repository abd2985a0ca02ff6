"""Data-parallel activations: processes of a `jax.distributed` job each generate only their share
of every round (`clt.data`, shares) and assemble the global batch from their own rows.

Two processes on localhost (4 CPU devices each, gloo collectives) generate disjoint contexts whose
union is the round's contexts; their global batch is the one-process batch of the same layout,
their norms are identical, and their step equals the one-process step; a two-process run stopped
and resumed equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from clt.configs import to_dict
from clt.data import ActivationStream, DataPosition, open_contexts
from clt.train import TrainConfig
from clt.transcoder import load
from tests.clt.test_train import _free_port
from tests.clt.tiny_train import tiny_model, write_corpus

ROOT = Path(__file__).resolve().parents[2]

PREAMBLE = """
import json, os, sys
pid, port = int(sys.argv[1]), sys.argv[2]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.environ['DEVICES']}"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
import numpy as np
from tests.clt.tiny_train import tiny_model
"""

STEP_DRIVER = PREAMBLE + """
from jax.experimental import multihost_utils
from clt import sharding as shd
from clt.data import ActivationStream, estimate_norms, open_contexts
from clt.train import _to_global, compile_step, init_state, place_state
from tests.clt.test_data_parallel import step_setup
corpus, out = sys.argv[3], sys.argv[4]
model = tiny_model()
kw, cfg, tc = step_setup()
mine = ActivationStream(model, open_contexts(corpus, model.tokenizer, 16), shares=2, share=pid,
                        **kw)
norms = estimate_norms(mine, rounds=2)  # all-gathered sums of both processes' shares
it = mine.batches()
batches = [next(it) for _ in range(2)]
mesh = shd.make_mesh(2, 4)
bs = shd.batch_sharding(mesh)
state = place_state(init_state(cfg, tc, norms), cfg, tc, mesh)
step, losses = compile_step(cfg, tc, mesh), []
for _, x, y in batches:  # the global batch from each process's rows
    state, m = step(state, _to_global(x, bs, 2), _to_global(y, bs, 2))
    losses.append(float(m["loss"]))
full = multihost_utils.process_allgather((state.params, state.opt_state), tiled=True)
np.savez(f"{out}/p{pid}.npz", ctx0=mine.share_contexts(0, pid),
         ctx1=mine.share_contexts(1, pid), x=np.asarray(batches[0][1]),
         y=np.asarray(batches[0][2]), generated=mine.tokens_generated, losses=losses,
         **{f"norm{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(norms))},
         **{f"state{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(full))})
"""


def step_setup():
    """The stream settings and the transcoder of the step test (2 shares of 4 contexts x 15
    valid tokens: one batch of 64 a round)."""
    from clt.transcoder import TranscoderConfig

    kw = {"input_point": "mlp_in", "batch_tokens": 64, "round_contexts": 8}
    cfg = TranscoderConfig(d_model=32, n_layers=3, n_features=64, skip=True)
    tc = TrainConfig.make(n_features=64, skip=True, batch_tokens=64, lr=1e-2, warmup_steps=0)
    return kw, cfg, tc


TRAIN_DRIVER = PREAMBLE + """
import time
from clt.train import TrainConfig, train
model = tiny_model()
for cfg, stop in json.loads(sys.argv[3]):  # runs one after the other, in these processes
    def on_step(step):
        if step == stop:  # both processes: the checkpoint of this step is saved collectively
            raise KeyboardInterrupt
    t0 = time.perf_counter()
    try:
        train(TrainConfig.make(**cfg), model=model, progress=False, on_step=on_step)
    except KeyboardInterrupt:
        print("stopped at", stop)
    print(f"run took {time.perf_counter() - t0:.1f} s", flush=True)
"""


@pytest.mark.parametrize("owners, data, want", [
    ([0, 0, 0, 0, 1, 1, 1, 1], 2, {0: (0, 2), 1: (1, 2)}),  # 2 x 4: a row each
    ([0, 0, 0, 0, 1, 1, 1, 1], 8, {0: (0, 2), 1: (1, 2)}),  # 8 x 1: 4 rows each
    ([1, 1, 0, 0], 2, {0: (1, 2), 1: (0, 2)}),  # process 1 holds the first rows
    ([0, 0, 0, 0, 1, 1, 1, 1], 1, {0: None, 1: None}),  # 1 x 8: both on the one row
    ([0, 1, 0, 1], 4, {0: None, 1: None}),  # interleaved rows
    ([0, 0, 0, 0], 2, {0: None, 1: None}),  # process 1 holds no device of the mesh
])
def test_which_rows_of_a_batch_each_process_supplies(monkeypatch, owners, data, want):
    from dataclasses import dataclass

    from clt import sharding as shd

    @dataclass(frozen=True)
    class Device:  # what data_share reads of a device
        id: int
        process_index: int

    devices = np.empty(len(owners), object)
    devices[:] = [Device(i, p) for i, p in enumerate(owners)]
    mesh = jax.sharding.Mesh(devices.reshape(data, -1), ("data", "feature"))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for pid in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        assert shd.data_share(mesh) == want[pid]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt", n_docs=80)


@pytest.fixture(autouse=True)
def _caches(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path_factory.mktemp("cache")))


def _two_processes(driver: str, tmp_path: Path, *args: str, devices: int = 4,
                   timeout: int = 240) -> list[str]:
    """Run `driver` as processes 0 and 1 of a jax.distributed job, with `devices` CPU devices
    each; their outputs."""
    path = tmp_path / f"driver{_free_port()}.py"
    path.write_text(driver)
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEVICES": str(devices)}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(path), str(i), port, *args], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out.decode())
            assert p.returncode == 0, outs[-1][-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def test_two_processes_generate_disjoint_shares_and_step_like_one(corpus, tmp_path):
    """The reference is this process (no jax.distributed, 8 CPU devices) with the same layout
    (2 shares) and mesh (2 x 4). Against one device the sharded step differs by float32
    reduction order, which Adam's first steps can magnify up to lr on an entry whose gradient
    is near 0 (g / (|g| + 1e-8)): the loss is compared there; sharded equals unsharded is
    tests/clt/test_train.py's test."""
    from clt import sharding as shd
    from clt.data import estimate_norms
    from clt.train import compile_step, init_state, place_state
    from tests.clt.test_train import _max_rel

    _two_processes(STEP_DRIVER, tmp_path, str(corpus), str(tmp_path))
    got = [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]
    model = tiny_model()
    contexts = open_contexts(str(corpus), model.tokenizer, 16)
    kw, cfg, tc = step_setup()
    for r in range(2):
        parts = [g[f"ctx{r}"] for g in got]
        assert not {tuple(c) for c in parts[0]} & {tuple(c) for c in parts[1]}
        # The union, in process order, is the round's contexts: those one process generates.
        whole = ActivationStream(model, contexts, **kw).share_contexts(r, 0)
        np.testing.assert_array_equal(np.concatenate(parts), whole)
        np.testing.assert_array_equal(whole, contexts.take(8 * r, 8))
    # Each process ran the model over its own 4 contexts of each round only (rounds 0 and 1 for
    # the norms, again for the two batches), half of what one process does.
    assert [int(g["generated"]) for g in got] == [4 * 4 * 16] * 2
    one = ActivationStream(model, contexts, shares=2, **kw)
    norms = estimate_norms(one, rounds=2)
    it = one.batches()
    batches = [next(it) for _ in range(2)]
    assert [b[0] for b in batches] == [DataPosition(1, 0, 2), DataPosition(2, 0, 2)]
    # Both processes' norms are this process's, bit for bit (all-gathered sums).
    for g in got:
        for i, a in enumerate(jax.tree.leaves(norms)):
            np.testing.assert_array_equal(g[f"norm{i}"], a)
    # Their rows of the first batch, in process order, are this process's batch.
    for k, name in ((1, "x"), (2, "y")):
        np.testing.assert_array_equal(np.concatenate([g[name] for g in got]), batches[0][k])
    losses = {}
    for mesh in (shd.make_mesh(2, 4), shd.make_mesh(1, 1)):
        state, step, losses[mesh.size] = place_state(init_state(cfg, tc, norms), cfg, tc,
                                                     mesh), compile_step(cfg, tc, mesh), []
        for _, x, y in batches:
            state, m = step(state, x, y)
            losses[mesh.size].append(float(m["loss"]))
        if mesh.size == 8:
            leaves = jax.tree.leaves((state.params, state.opt_state))
            for g in got:
                two = [g[f"state{i}"] for i in range(len(leaves))]
                assert _max_rel(two, leaves) <= 1e-5
                np.testing.assert_allclose(g["losses"], losses[8], rtol=1e-6)
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)


def test_two_process_run_stopped_and_resumed_equals_uninterrupted(corpus, tmp_path):
    """3 batches per round (2 shares of 4 contexts x 15 tokens, 16 tokens each per batch):
    stopped at step 7, inside round 2. The stopped run caches its activations (one file per
    share) and prefetches; the resumed half replays the cache. Mesh 4 x 1 over 2 devices a
    process: each process's rows of a batch are split over its two devices."""
    base = {"model": "tiny", "data": str(corpus), "context_length": 16, "n_features": 32,
            "steps": 10, "batch_tokens": 32, "round_contexts": 8, "lr": 3e-3, "warmup_steps": 2,
            "checkpoint_every": 100, "log_every": 1, "mesh_data": 4, "mesh_feature": 1,
            "async_checkpoints": False}
    ref = TrainConfig.make(**base, out=str(tmp_path / "ref"))
    cache = tmp_path / "acts"
    cfg = TrainConfig.make(**base, out=str(tmp_path / "run"), cache_activations=str(cache),
                           prefetch="on")
    # The uninterrupted run, then the run stopped at step 7, in one pair of processes.
    outs = _two_processes(TRAIN_DRIVER, tmp_path, json.dumps([[to_dict(ref), 0],
                                                              [to_dict(cfg), 7]]), devices=2)
    for i in range(2):
        assert f"activations: process {i} of 2 generates 4 of 8 contexts per round" in outs[i]
        assert "stopped at 7" in outs[i]
    from clt import sharding as shd
    from clt.train import _manager, restore_checkpoint

    _, pos, _ = restore_checkpoint(_manager(tmp_path / "run", 3), cfg.transcoder_config(
        tiny_model().cfg), cfg, shd.make_mesh(1, 1), step=7)
    assert pos == DataPosition(2, 1, shares=2)  # where each process resumes
    assert {p.name for p in cache.glob("round_000000*")} == {"round_000000.share0of2.npz",
                                                            "round_000000.share1of2.npz"}
    _two_processes(TRAIN_DRIVER, tmp_path, json.dumps([[to_dict(cfg), 0]]), devices=2)
    (_, a), (_, b) = load(tmp_path / "run" / "transcoder"), load(tmp_path / "ref" / "transcoder")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    steps = [json.loads(r)["step"] for r in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))
