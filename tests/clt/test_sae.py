"""Residual-stream sparse autoencoders (`cltrace train --kind sae`): a TranscoderConfig whose
output point is its input point, trained, sharded, resumed and evaluated by the transcoder code.

References and tolerances (float32, `highest` matmul precision from conftest):
- a perfect SAE (features +x and -x under ReLU, decoders +I and -I: recon(x) = x exactly) spliced
  in gives the original logits (atol 1e-4), NMSE ~ 0, KL ~ 0, top-1 agreement 1;
- the splice replaces the residual stream before layer l's MLP: an SAE whose reconstruction is
  x + c at layer l only against an independent computation (x + c run through layer l's MLP by
  the model's building blocks, then the remaining blocks as a truncated model; atol 1e-4);
- training lowers NMSE (measured ~0.94 -> ~0.10 in 150 steps on the tiny model), a 2 x 4 mesh of
  8 simulated devices equals one device (relative 1e-5, as for transcoders), and SIGKILL then
  resume gives the uninterrupted run's parameters (atol 1e-6).
An SAE on some layers (`--layers 1 3` of a 4-layer tiny model):
- its training activations are the model's resid_mid at exactly those layers from a full forward
  pass (atol 1e-5), computed by running blocks 0..max(layers) only;
- it trains (NMSE ~0.94 -> ~0.09), a whole sharded run equals one device (relative 1e-5),
  SIGKILL then resume is exact (atol 1e-6);
- eval equals the all-layer SAE with the same dictionaries spliced at the same layers
  (`splice_layers`; rel 1e-5), and its NMSE a float64 numpy computation (rel 1e-4).
Its training is not compared with an all-layer run restricted to those layers: the two differ
(initialisation draws every layer from one key and scales decoders by 1/sqrt(n_layers); gradient
clipping is by the global norm over all layers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clt import sharding as shd
from clt.configs import ConfigError, to_dict
from clt.evaluate import EvalConfig, evaluate
from clt.lm import LoadedModel, forward
from clt.lm.model import mlp, norm
from clt.splice import SplicedTranscoder
from clt.train import TrainConfig, compile_step, init_state, place_state, train
from clt.transcoder import Norms, TranscoderConfig, TranscoderParams, load
from tests.clt.test_train import _metrics
from tests.clt.test_train import _tc as _train_tc
from tests.clt.tiny_train import tiny_model, write_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _sae_cfg(model, **kw) -> TranscoderConfig:
    return TranscoderConfig(d_model=model.cfg.d_model, n_layers=model.cfg.n_layers,
                            n_features=2 * model.cfg.d_model, max_reach=1,
                            input_point="resid_mid", output_point="resid_mid", **kw)


def _perfect_sae(model, activation="relu") -> tuple[TranscoderConfig, TranscoderParams]:
    """recon(x) = relu(x) - relu(-x) = x: features e_i and -e_i, decoders back."""
    L, D = model.cfg.n_layers, model.cfg.d_model
    cfg = _sae_cfg(model, activation=activation)
    eye = jnp.eye(D)
    W_enc = jnp.broadcast_to(jnp.concatenate([eye, -eye], 1), (L, D, 2 * D))
    W_dec = tuple(jnp.concatenate([eye, -eye], 0)[:, None, :] for _ in range(L))
    return cfg, TranscoderParams(W_enc=W_enc, b_enc=jnp.zeros((L, 2 * D)),
                                 log_threshold=jnp.full((L, 2 * D), -30.0), W_dec=W_dec,
                                 b_dec=jnp.zeros((L, D)))


def _tokens(n=4, T=12, seed=0):
    toks = np.random.default_rng(seed).integers(3, 60, size=(n, T))
    toks[:, 0] = 1
    return toks


# --- configuration -------------------------------------------------------------------------------
def test_kind_sae_is_a_configuration_of_the_transcoder():
    tc = TrainConfig.make(kind="sae", n_features=64)
    arch = tc.architecture()
    assert (arch.input_point, arch.output_point, arch.max_reach, arch.skip) == \
        ("resid_mid", "resid_mid", 1, False)
    assert arch.is_sae and arch.kind == "sae"
    assert TrainConfig.make(n_features=64, max_reach=1).architecture().kind == "plt"
    with pytest.raises(ConfigError, match="kind sae reads and reconstructs the residual"):
        TrainConfig.make(kind="sae", input_point="mlp_in")
    with pytest.raises(ConfigError, match="one dictionary per layer and no skip"):
        TrainConfig.make(kind="sae", max_reach=3)
    with pytest.raises(ConfigError, match="one dictionary per layer and no skip"):
        TrainConfig.make(kind="sae", skip=True)
    with pytest.raises(ConfigError, match="an SAE reconstructs what it reads"):
        TranscoderConfig(d_model=4, n_layers=2, n_features=8, max_reach=1, input_point="mlp_in",
                         output_point="resid_mid")
    # The saved config round-trips (resume compares it).
    assert TrainConfig.make(**to_dict(tc)) == tc


# --- splice and evaluation ------------------------------------------------------------------------
def test_perfect_sae_spliced_is_the_model(model):
    cfg, params = _perfect_sae(model)
    toks = jnp.asarray(_tokens())
    ref, _ = forward(model.params, model.cfg, toks)
    got, _ = forward(model.params, model.cfg, toks, mlp_hook=SplicedTranscoder(cfg),
                     hook_params=params)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    r = evaluate(model, cfg, params, _tokens(6), batch_size=4, progress=False)
    assert max(r.nmse_per_layer) < 1e-8, r.nmse_per_layer
    assert abs(r.kl) < 1e-6 and r.top1_agreement == 1.0 and abs(r.delta_ce) < 1e-5
    assert r.l0_total > 0  # features do fire: the reconstruction is theirs, not a bias


def _truncated(model: LoadedModel, first: int):
    """The model's blocks first.. alone (their residual input given as input_embeds)."""
    cfg = model.cfg.replace(n_layers=model.cfg.n_layers - first)
    layers = jax.tree.map(lambda a: a[first:], model.params.layers)
    return dataclasses.replace(model.params, layers=layers), cfg


@pytest.mark.parametrize("splice", ["all", "one", "sae_on_some"])
def test_sae_splice_replaces_the_residual_before_that_layers_mlp(model, splice):
    """Reconstruction x + c at layer 1 (exact elsewhere) against a hand computation; spliced at
    every layer, at layer 1 only, or an SAE on layers 1 and 2 only (its dictionary 0 at model
    layer 1)."""
    cfg, params = _perfect_sae(model)
    c = jax.random.normal(jax.random.key(1), (model.cfg.d_model,))
    params = dataclasses.replace(params, b_dec=params.b_dec.at[1].set(c))
    toks = jnp.asarray(_tokens(2))
    layers = (1,) if splice == "one" else None
    if splice == "sae_on_some":
        cfg, params = _restricted(cfg, params, (1, 2))
    got, _ = forward(model.params, model.cfg, toks, mlp_hook=SplicedTranscoder(cfg, layers=layers),
                     hook_params=params)
    # Independent: resid_mid of layer 1 from the model, + c, layer 1's MLP by the building blocks,
    # then blocks 2.. as a model of their own.
    _, cap = forward(model.params, model.cfg, toks, capture=("resid_mid",))
    lp = jax.tree.map(lambda a: a[1], model.params.layers)
    r = cap.resid_mid[1] + c
    h, _ = norm(r, lp.mlp_norm_w, lp.mlp_norm_b, model.cfg)
    resid_next = r + mlp(lp, model.cfg, h)
    tparams, tcfg = _truncated(model, 2)
    ref, _ = forward(tparams, tcfg, toks, input_embeds=resid_next)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    unspliced, _ = forward(model.params, model.cfg, toks)
    assert float(jnp.abs(unspliced - ref).max()) > 1e-2  # the shift matters


def test_eval_splice_layers_and_refusals(model):
    cfg, params = _perfect_sae(model)
    params = dataclasses.replace(params, b_dec=params.b_dec.at[1].set(0.5))
    toks = _tokens(4)
    at0 = evaluate(model, cfg, params, toks, progress=False, splice_layers=(0,))
    at1 = evaluate(model, cfg, params, toks, progress=False, splice_layers=(1,))
    assert at0.kl < 1e-6 and at1.kl > 1e-4 and at1.spliced_layers == [1]
    assert at0.nmse_per_layer[1] == at1.nmse_per_layer[1] > 0  # NMSE covers every layer
    with pytest.raises(ConfigError, match="out of range 0..2"):
        evaluate(model, cfg, params, toks, progress=False, splice_layers=(3,))
    clt = TranscoderConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, n_features=8)
    with pytest.raises(ConfigError, match="needs a per-layer dictionary"):
        SplicedTranscoder(clt, layers=(0,))
    with pytest.raises(ConfigError, match="splice_layers must be layer indices"):
        EvalConfig(transcoder="x", splice_layers=(-1,))


# --- training -------------------------------------------------------------------------------------
def _tc(corpus, out, **kw) -> TrainConfig:
    """The transcoder tests' tiny training run, as an SAE."""
    return _train_tc(corpus, out, **{"kind": "sae", **kw})


def test_sae_training_lowers_nmse(corpus, model, tmp_path):
    path = train(_tc(corpus, tmp_path / "run"), model=model, progress=False)
    rows = _metrics(tmp_path / "run")
    first, last = rows[0]["nmse"], rows[-1]["nmse"]
    # Measured: ~0.94 at step 10, ~0.10 at step 150 (float32, CPU).
    assert last < 0.3 * first and last < 0.2, (first, last)
    cfg, params = load(path)
    assert cfg.is_sae and cfg.n_features == 64
    # The exported SAE (norms folded) reconstructs the residual stream it reads: eval agrees.
    toks = _tokens(4, 32)
    r = evaluate(model, cfg, params, toks, progress=False)
    assert r.nmse_mean < 0.3, r.nmse_per_layer


def test_sae_sharded_step_equals_unsharded():
    """Mesh data=2 x feature=4 over 8 simulated CPU devices vs one device, two steps; y = x."""
    assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 host devices"
    tc = TrainConfig.make(kind="sae", n_features=64, batch_tokens=32, lr=1e-2, warmup_steps=0)
    cfg = tc.architecture().replace(d_model=8, n_layers=3)
    x = jax.random.normal(jax.random.key(3), (32, 3, 8))
    state = init_state(cfg, tc, Norms.identity(3, 8))
    results = []
    for data, feature in ((1, 1), (2, 4)):
        mesh = shd.make_mesh(data, feature)
        step = compile_step(cfg, tc, mesh)
        s = place_state(state, cfg, tc, mesh)
        for _ in range(2):
            s, m = step(s, x, x)
        results.append((s, m))
    (one, m1), (eight, m8) = results
    assert len({str(sh.index) for sh in eight.params.W_enc.addressable_shards}) == 4
    for a, b in zip(jax.tree.leaves(eight.params), jax.tree.leaves(one.params)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(b)), 1e-30)
    np.testing.assert_allclose(m8["nmse"], m1["nmse"], rtol=1e-5)


KILL_DRIVER = """
import json, os, signal, sys
from clt.train import TrainConfig, train
from tests.clt.tiny_train import tiny_model
cfg = TrainConfig.make(**json.loads(sys.argv[1]))
kill_at = int(sys.argv[2])
def on_step(step):
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
train(cfg, model=tiny_model(), progress=False, on_step=on_step)
"""


def test_sae_sigkill_then_resume_matches_uninterrupted_run(corpus, model, tmp_path):
    kw = {"steps": 24, "checkpoint_every": 8, "log_every": 4, "batch_tokens": 128,
          "round_contexts": 8}
    ref = train(_tc(corpus, tmp_path / "ref", **kw), model=model, progress=False)
    driver = tmp_path / "kill.py"
    driver.write_text(KILL_DRIVER)
    tc = _tc(corpus, tmp_path / "killed", **kw)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(driver), json.dumps(to_dict(tc)), "13"], env=env,
                          cwd=ROOT, capture_output=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    resumed = train(tc, model=model, progress=False)
    cfg, a = load(resumed)
    _, b = load(ref)
    assert cfg.is_sae
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


# --- an SAE on some layers (`--kind sae --layers 1 3`) -----------------------------------------------
SOME = (1, 3)  # model layers of the 4-layer tiny model (0 and 2 left alone)


@pytest.fixture(scope="module")
def model4():
    return tiny_model(n_layers=4)


def _restricted(cfg: TranscoderConfig, params: TranscoderParams, layers: tuple[int, ...]):
    """The all-layer SAE (cfg, params) cut down to `layers`: its dictionaries there, as an SAE on
    those layers (the reference for everything an SAE on some layers computes)."""
    idx = jnp.asarray(layers)
    sub = cfg.replace(n_layers=len(layers), layers=layers)
    return sub, TranscoderParams(
        W_enc=params.W_enc[idx], b_enc=params.b_enc[idx], log_threshold=params.log_threshold[idx],
        W_dec=tuple(params.W_dec[i] for i in layers), b_dec=params.b_dec[idx])


def _random_sae(model, seed=0) -> tuple[TranscoderConfig, TranscoderParams]:
    """An all-layer SAE with random weights whose features fire on the tiny model's residual."""
    from clt.transcoder import init_params

    cfg = _sae_cfg(model)
    params = init_params(cfg, jax.random.key(seed))
    return cfg, dataclasses.replace(params, W_enc=params.W_enc * 20.0,
                                    b_dec=0.1 * jax.random.normal(jax.random.key(seed + 1),
                                                                  params.b_dec.shape))


def test_layers_configuration_and_refusals(model4):
    tc = TrainConfig.make(kind="sae", layers=[1, 3], n_features=64)
    arch = tc.architecture()
    assert arch.layers == SOME and arch.is_sae
    cfg = tc.transcoder_config(model4.cfg)
    assert (cfg.n_layers, cfg.layers, cfg.model_layers) == (2, SOME, SOME)
    assert [cfg.layer_index(layer) for layer in SOME] == [0, 1]
    assert TranscoderConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig.make(**to_dict(tc)) == tc
    # Configs written before `layers` existed load as every layer.
    old = to_dict(TrainConfig.make(kind="sae", n_features=64))
    del old["layers"], old["transcoder"]["layers"]
    assert TrainConfig.make(**old).transcoder_config(model4.cfg).model_layers == (0, 1, 2, 3)
    nested = {"layers": [1], "output_point": "resid_mid", "max_reach": 1}
    for kw, msg in (
            ({"layers": [1]},
             "TrainConfig.layers is for --kind sae; a transcoder covers every layer"),
            ({"kind": "sae", "layers": [3, 1]},
             "TrainConfig.layers must be model layer indices >= 0, each once, in increasing"),
            ({"kind": "sae", "layers": [1, 1]}, "each once, in increasing order"),
            ({"kind": "sae", "layers": [-1]}, "TrainConfig.layers must be model layer"),
            ({"kind": "sae", "transcoder": {"layers": [1]}},
             "TranscoderConfig.layers is for an SAE"),
            ({"kind": "sae", "transcoder": nested}, "give an SAE's layers as TrainConfig.layers")):
        with pytest.raises(ConfigError, match=msg):
            TrainConfig.make(**kw)
    with pytest.raises(ConfigError, match=r"TrainConfig.layers \[1, 4\]: model 'tiny-llama' "
                       r"has layers 0..3"):
        TrainConfig.make(kind="sae", layers=[1, 4]).transcoder_config(model4.cfg)
    with pytest.raises(ConfigError, match="TranscoderConfig.layers is for an SAE"):
        TranscoderConfig(d_model=4, n_layers=2, n_features=8, layers=(0, 1))
    with pytest.raises(ConfigError, match=r"n_layers must be len\(layers\) = 2"):
        cfg.replace(n_layers=4)
    with pytest.raises(ConfigError, match="layer 2 is not covered: this SAE has dictionaries at "
                       "model layers 1, 3 only"):
        cfg.layer_index(2)
    from clt.transcoder import check_model

    with pytest.raises(ConfigError, match="transcoder/model mismatch: the SAE .* covers model "
                       "layers 1, 3 but model 'tiny-llama' has d_model=32, layers 0..2"):
        check_model(cfg, tiny_model(n_layers=3).cfg)


def test_sae_layers_capture_the_models_residual_at_those_layers(corpus, model4, tmp_path,
                                                                monkeypatch):
    """The training activations of an SAE on layers 1 and 3 are the model's residual streams
    before those layers' MLPs (independent: a full forward pass's resid_mid), and the model runs
    only up to the last of them."""
    from clt import data
    from clt.data import ActivationStream, open_contexts

    ran = []

    def spy(params, cfg, tokens, capture, n_layers=None):
        ran.append(n_layers)
        return real(params, cfg, tokens, capture, n_layers)

    real = data.activations
    monkeypatch.setattr(data, "activations", spy)
    data._capture.clear_cache()  # traced again: the spy sees how many blocks run
    contexts = open_contexts(str(corpus), model4.tokenizer, 16, cache_dir=tmp_path)
    kw = {"input_point": "resid_mid", "output_point": "resid_mid", "batch_tokens": 32,
          "round_contexts": 4, "model_batch": 4}
    for layers in (SOME, (0, 2)):
        stream = ActivationStream(model4, contexts, layers=layers, **kw)
        x, y, _, _ = stream.round(0)
        ctx = jnp.asarray(stream.share_contexts(0, 0))
        _, cap = forward(model4.params, model4.cfg, ctx, capture=("resid_mid",))
        ref = jnp.moveaxis(cap.resid_mid[jnp.asarray(layers)], 0, 2).reshape(-1, 2, 32)
        assert x.shape == (4 * 16, 2, 32)
        np.testing.assert_allclose(x, ref, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(x, y)
    assert ran == [4, 3], ran  # blocks 0..3 for layers 1, 3; blocks 0..2 for layers 0, 2
    data._capture.clear_cache()
    with pytest.raises(ConfigError, match=r"layers \[1, 4\]: the model has layers 0..3"):
        ActivationStream(model4, contexts, layers=(1, 4), **kw)


def test_sae_on_some_layers_trains_and_exports_them(corpus, model4, tmp_path):
    path = train(_tc(corpus, tmp_path / "run", layers=SOME), model=model4, progress=False)
    rows = _metrics(tmp_path / "run")
    first, last = rows[0]["nmse"], rows[-1]["nmse"]
    # Measured: ~0.94 at step 10, ~0.09 at step 150 (float32, CPU).
    assert last < 0.3 * first and last < 0.2, (first, last)
    assert len(rows[-1]["nmse_per_layer"]) == 2
    cfg, params = load(path)
    assert (cfg.is_sae, cfg.layers, cfg.n_layers, params.W_enc.shape[0]) == (True, SOME, 2, 2)
    assert json.loads((path / "config.json").read_text())["config"]["layers"] == [1, 3]
    r = evaluate(model4, cfg, params, _tokens(4, 32), progress=False)
    assert r.layers == [1, 3] and r.nmse_mean < 0.3, r.nmse_per_layer
    # Resuming with other layers, or starting from this SAE with other layers: refused.
    with pytest.raises(ConfigError, match="holds a run with different layers"):
        train(_tc(corpus, tmp_path / "run", layers=(1, 2)), model=model4, progress=False)
    with pytest.raises(ConfigError, match=r"init_from .* has a different layers \(layers=\(1, "
                       r"3\)\)"):
        train(_tc(corpus, tmp_path / "other", layers=(1, 2), init_from=str(path)), model=model4,
              progress=False)


def test_sae_on_some_layers_sharded_run_equals_one_device(corpus, model4, tmp_path):
    """The whole run (activations, norms, steps, export) on a 2 x 4 mesh of 8 simulated CPU
    devices vs one device, 6 steps. Tolerance: relative 1e-5 of each tensor's largest entry, as
    for transcoders (measured: 1.2e-7; float32 sums in another order)."""
    kw = {"layers": SOME, "steps": 6, "batch_tokens": 128, "round_contexts": 8, "sparse": "off",
          "checkpoint_every": 100}
    one = train(_tc(corpus, tmp_path / "one", **kw), model=model4, progress=False)
    eight = train(_tc(corpus, tmp_path / "eight", mesh_data=2, mesh_feature=4, **kw),
                  model=model4, progress=False, mesh=shd.make_mesh(2, 4))
    (_, a), (_, b) = load(eight), load(one)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.max(np.abs(x - y)) <= 1e-5 * max(np.max(np.abs(y)), 1e-30)


KILL_DRIVER_4 = KILL_DRIVER.replace("tiny_model()", "tiny_model(n_layers=4)")


def test_sae_on_some_layers_sigkill_then_resume(corpus, model4, tmp_path):
    kw = {"steps": 24, "checkpoint_every": 8, "log_every": 4, "batch_tokens": 128,
          "round_contexts": 8, "layers": SOME}
    ref = train(_tc(corpus, tmp_path / "ref", **kw), model=model4, progress=False)
    driver = tmp_path / "kill.py"
    driver.write_text(KILL_DRIVER_4)
    tc = _tc(corpus, tmp_path / "killed", **kw)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(driver), json.dumps(to_dict(tc)), "13"], env=env,
                          cwd=ROOT, capture_output=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    cfg, a = load(train(tc, model=model4, progress=False))
    _, b = load(ref)
    assert cfg.layers == SOME
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_eval_of_an_sae_on_some_layers(model4):
    """Against the all-layer SAE spliced at the same layers (`splice_layers`, itself checked by
    hand above) and a numpy NMSE of the residual streams at those layers."""
    full_cfg, full = _random_sae(model4)
    cfg, params = _restricted(full_cfg, full, SOME)
    toks = _tokens(6, 16)
    got = evaluate(model4, cfg, params, toks, batch_size=4, progress=False)
    ref = evaluate(model4, full_cfg, full, toks, batch_size=4, progress=False,
                   splice_layers=SOME)
    assert got.layers == [1, 3] and got.spliced_layers is None
    assert got.kl > 1e-4 and got.l0_total > 0  # the splice changes the model; features fire
    for name in ("kl", "top1_agreement", "ce_original", "ce_spliced", "delta_ce"):
        assert getattr(got, name) == pytest.approx(getattr(ref, name), rel=1e-5, abs=1e-7), name
    np.testing.assert_allclose(got.nmse_per_layer, np.asarray(ref.nmse_per_layer)[list(SOME)],
                               rtol=1e-5)
    np.testing.assert_allclose(got.l0_per_layer, np.asarray(ref.l0_per_layer)[list(SOME)],
                               rtol=1e-6)
    # NMSE by hand (float64 numpy JumpReLU), BOS dropped.
    _, cap = forward(model4.params, model4.cfg, jnp.asarray(toks), capture=("resid_mid",))
    for index, layer in enumerate(SOME):
        x = np.asarray(cap.resid_mid[layer][:, 1:], np.float64).reshape(-1, 32)
        z = x @ np.asarray(params.W_enc[index], np.float64) + np.asarray(params.b_enc[index])
        a = np.where(z > np.asarray(params.threshold[index], np.float64), z, 0.0)
        recon = a @ np.asarray(params.W_dec[index][:, 0], np.float64) + np.asarray(
            params.b_dec[index])
        nmse = np.sum((recon - x) ** 2) / np.sum((x - x.mean(0)) ** 2)
        assert got.nmse_per_layer[index] == pytest.approx(nmse, rel=1e-4)
    # One covered layer spliced; a layer it does not cover refused.
    at3 = evaluate(model4, cfg, params, toks, progress=False, splice_layers=(3,))
    ref3 = evaluate(model4, full_cfg, full, toks, progress=False, splice_layers=(3,))
    assert at3.kl == pytest.approx(ref3.kl, rel=1e-5) and at3.spliced_layers == [3]
    with pytest.raises(ConfigError, match=r"spliced layers \[2\] are not covered: this SAE has "
                       "dictionaries at model layers 1, 3 only"):
        evaluate(model4, cfg, params, toks, progress=False, splice_layers=(2,))
