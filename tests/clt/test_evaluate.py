"""Transcoder evaluation: the spliced model against independent references, metrics against numpy.

References and tolerances (float32 throughout, `highest` matmul precision from conftest):
- spliced hook: its output at every layer equals `transcoder.decode(encode(x))` of the spliced
  model's own captured inputs (atol 1e-5);
- an exact transcoder (a ReLU MLP copied into a PLT, with and without a skip connection, and as
  a CLT with zero cross-layer decoders) gives the original logits (atol 1e-4), NMSE ~ 0, KL ~ 0,
  top-1 agreement 1 and delta CE ~ 0;
- NMSE, L0, dead/dense fractions, KL, top-1 and CE against a float64 numpy recomputation on the
  same captured activations and logits (rtol 1e-4; counts exactly, once no pre-activation lies
  within 1e-4 of its threshold), for several batch sizes (accumulation across batches is exact).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clt.configs import ConfigError
from clt.evaluate import EvalResult, SplicedTranscoder, evaluate
from clt.lm import LoadedModel, forward, load_model
from clt.transcoder import TranscoderConfig, TranscoderParams, decode, encode, init_params
from tests.clt.hf_tiny import make_tiny

SEQ = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for family in ("llama", "gemma2", "gpt2"):
        d = tmp_path_factory.mktemp(family)
        make_tiny(family, d)
        out[family] = load_model(str(d))
    return out


def _contexts(n, seed=0):
    toks = np.random.default_rng(seed).integers(3, 128, size=(n, SEQ))
    toks[:, 0] = 1  # BOS
    return toks


def _random_tc(model, seed=0, **kw) -> tuple[TranscoderConfig, TranscoderParams]:
    """A random transcoder with spread-out biases, so that some features are rare, some common."""
    cfg = TranscoderConfig(d_model=model.cfg.d_model, n_layers=model.cfg.n_layers,
                           n_features=kw.pop("n_features", 32), **kw)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    p = init_params(cfg, k1)
    L, F = cfg.n_layers, cfg.n_features
    p = dataclasses.replace(
        p, W_enc=p.W_enc * 3, b_enc=jax.random.normal(k2, (L, F)),
        b_dec=0.1 * jax.random.normal(k3, (L, cfg.d_model)),
        W_skip=None if p.W_skip is None else 0.05 * jax.random.normal(k3, p.W_skip.shape))
    return cfg, p


def _stack_inputs(cap, point):
    return jnp.moveaxis(getattr(cap, point), 0, 2)  # [layer b t d] -> [b t layer d]


TC_VARIANTS = [
    dict(),  # full CLT, jumprelu, resid_mid
    dict(max_reach=1, activation="relu"),  # PLT
    dict(max_reach=2, skip=True, input_point="mlp_in"),  # windowed CLT with skip
    dict(activation="topk", k=4, input_point="mlp_in"),
]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("variant", range(len(TC_VARIANTS)))
def test_spliced_hook_matches_decode_of_its_own_inputs(models, family, variant):
    """At every layer the hook returns decode(encode(x)) of the spliced model's own inputs x:
    valid because a layer's reconstruction depends only on the inputs of layers <= it."""
    model = models[family]
    tc_cfg, tc = _random_tc(model, **TC_VARIANTS[variant])
    tokens = _contexts(2)
    logits, _ = forward(model.params, model.cfg, tokens)
    spl, cap = forward(model.params, model.cfg, tokens, capture=("resid_mid", "mlp_in", "mlp_out"),
                       mlp_hook=SplicedTranscoder(tc_cfg), hook_params=tc)
    x = _stack_inputs(cap, tc_cfg.input_point)
    ref = decode(tc_cfg, tc, encode(tc_cfg, tc, x), x)
    np.testing.assert_allclose(_stack_inputs(cap, "mlp_out"), ref, atol=1e-5)
    assert np.abs(np.asarray(spl - logits)).max() > 1e-3  # the splice changes something


def _relu_gpt2(models) -> LoadedModel:
    m = models["gpt2"]  # plain MLP with biases, no post-norm; ReLU makes it a transcoder
    return LoadedModel(m.cfg.replace(activation="relu"), m.params, None, m.source)


def _exact_tc(model, how: str) -> tuple[TranscoderConfig, TranscoderParams]:
    """A transcoder reading mlp_in that computes the MLP exactly: relu(h W_in + b_in) W_out + b_out.

    'skip' uses relu(z) = z + relu(-z): skip h W_in W_out, bias b_in W_out + b_out, features
    relu(-(h W_in + b_in)) decoded by W_out. 'clt' writes zeros to later layers."""
    lp, L, D, M = model.params.layers, model.cfg.n_layers, model.cfg.d_model, model.cfg.d_mlp
    reach = None if how == "clt" else 1
    cfg = TranscoderConfig(d_model=D, n_layers=L, n_features=M, max_reach=reach,
                           activation="relu", input_point="mlp_in", skip=how == "skip")
    W_dec = tuple(jnp.zeros((M, cfg.n_targets(s), D)).at[:, 0].set(lp.W_out[s]) for s in range(L))
    sign = -1.0 if how == "skip" else 1.0
    b_dec = lp.b_out + (jnp.einsum("lm,lmd->ld", lp.b_in, lp.W_out) if how == "skip" else 0.0)
    p = TranscoderParams(W_enc=sign * lp.W_in, b_enc=sign * lp.b_in,
                         log_threshold=jnp.zeros((L, M)), W_dec=W_dec, b_dec=b_dec,
                         W_skip=jnp.einsum("ldm,lme->lde", lp.W_in, lp.W_out)
                         if how == "skip" else None)
    return cfg, p


@pytest.mark.parametrize("how", ["plt", "skip", "clt"])
def test_exact_transcoder_gives_the_original_model(models, how):
    model = _relu_gpt2(models)
    tc_cfg, tc = _exact_tc(model, how)
    tokens = _contexts(3, seed=1)
    logits, _ = forward(model.params, model.cfg, tokens)
    spl, _ = forward(model.params, model.cfg, tokens, mlp_hook=SplicedTranscoder(tc_cfg),
                     hook_params=tc)
    np.testing.assert_allclose(spl, logits, atol=1e-4)
    if how != "skip":
        return
    r = evaluate(model, tc_cfg, tc, tokens, batch_size=2, progress=False)
    assert max(r.nmse_per_layer) < 1e-8
    assert abs(r.kl) < 1e-6 and r.top1_agreement == 1.0
    assert abs(r.delta_ce) < 1e-5 and abs(r.ce_spliced - r.ce_original) < 1e-5
    assert r.n_tokens == 3 * (SEQ - 1) and r.n_predictions == 3 * (SEQ - 1)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _naive(model, tc_cfg, tc, contexts, drop_bos, dense_threshold):
    """float64 numpy metrics from the captured activations and both models' logits."""
    logits, cap = forward(model.params, model.cfg, contexts,
                          capture=(tc_cfg.input_point, "mlp_out"))
    spl, _ = forward(model.params, model.cfg, contexts, mlp_hook=SplicedTranscoder(tc_cfg),
                     hook_params=tc)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    first = 1 if drop_bos else 0
    x = f64(getattr(cap, tc_cfg.input_point))[:, :, first:]  # [layer b t d]
    y = f64(cap.mlp_out)[:, :, first:]
    L, F = tc_cfg.n_layers, tc_cfg.n_features
    th = np.exp(f64(tc.log_threshold))
    pre = [x[s] @ f64(tc.W_enc[s]) + f64(tc.b_enc[s]) for s in range(L)]
    margin = min(np.abs(pre[s] - th[s]).min() for s in range(L))
    assert margin > 1e-4, "construction: a pre-activation sits on its threshold"
    acts = [np.where(pre[s] > th[s], pre[s], 0.0) for s in range(L)]
    nmse, l0, counts = [], [], np.zeros((L, F))
    for t in range(L):
        rec = f64(tc.b_dec[t]) + sum(acts[s] @ f64(tc.W_dec[s][:, t - s])
                                     for s in tc_cfg.sources(t))
        if tc.W_skip is not None:
            rec = rec + x[t] @ f64(tc.W_skip[t])
        yt = y[t].reshape(-1, y.shape[-1])
        nmse.append(((rec.reshape(yt.shape) - yt) ** 2).sum() / ((yt - yt.mean(0)) ** 2).sum())
        counts[t] = (acts[t] != 0).reshape(-1, F).sum(0)
        l0.append(counts[t].sum() / yt.shape[0])
    n = x.shape[1] * x.shape[2]
    lp, lq = _log_softmax(f64(logits)[:, :-1]), _log_softmax(f64(spl)[:, :-1])
    tgt = np.asarray(contexts)[:, 1:, None]
    ce_o = -np.take_along_axis(lp, tgt, -1).mean()
    ce_s = -np.take_along_axis(lq, tgt, -1).mean()
    return dict(nmse_per_layer=nmse, l0_per_layer=l0, dead_fraction=(counts == 0).mean(),
                dense_fraction=(counts > dense_threshold * n).mean(), n_tokens=n,
                kl=(np.exp(lp) * (lp - lq)).sum(-1).mean(), ce_original=ce_o, ce_spliced=ce_s,
                top1_agreement=(lp.argmax(-1) == lq.argmax(-1)).mean())


@pytest.mark.parametrize("drop_bos", [True, False])
def test_metrics_match_numpy(models, drop_bos):
    model = models["llama"]
    tc_cfg, tc = _random_tc(model, seed=3, max_reach=2, skip=True)
    tc = dataclasses.replace(tc, b_enc=tc.b_enc.at[:, :4].add(-30.0))  # some dead features
    contexts = _contexts(7, seed=2)
    ref = _naive(model, tc_cfg, tc, contexts, drop_bos, dense_threshold=0.3)
    results = [evaluate(model, tc_cfg, tc, contexts, batch_size=b, drop_bos=drop_bos,
                        dense_threshold=0.3, progress=False) for b in (3, 7)]
    assert 0 < ref["dead_fraction"] < 0.5 and 0 < ref["dense_fraction"] < 1  # a real mix
    for r in results:
        assert r.n_tokens == ref["n_tokens"] and r.n_predictions == 7 * (SEQ - 1)
        np.testing.assert_allclose(r.nmse_per_layer, ref["nmse_per_layer"], rtol=1e-4)
        np.testing.assert_allclose(r.nmse_mean, np.mean(ref["nmse_per_layer"]), rtol=1e-4)
        np.testing.assert_allclose(r.l0_per_layer, ref["l0_per_layer"], rtol=1e-12)
        np.testing.assert_allclose(r.l0_total, np.sum(ref["l0_per_layer"]), rtol=1e-12)
        assert r.dead_fraction == ref["dead_fraction"]
        assert r.dense_fraction == ref["dense_fraction"]
        for k in ("kl", "ce_original", "ce_spliced", "top1_agreement"):
            np.testing.assert_allclose(getattr(r, k), ref[k], rtol=1e-4, err_msg=k)
        assert r.kl > 1e-3 and r.top1_agreement < 1
        np.testing.assert_allclose(r.delta_ce, r.ce_spliced - r.ce_original, rtol=1e-12)


def test_dead_and_dense_on_hand_set_biases(models):
    """Features 0-1 always on (b_enc = +100), the others never (b_enc = -100), every layer."""
    model = models["llama"]
    cfg = TranscoderConfig(d_model=model.cfg.d_model, n_layers=model.cfg.n_layers, n_features=8)
    p = init_params(cfg, jax.random.key(0))
    b = jnp.full((cfg.n_layers, 8), -100.0).at[:, :2].set(100.0)
    p = dataclasses.replace(p, W_enc=jnp.zeros_like(p.W_enc), b_enc=b)
    contexts = _contexts(4)
    r = evaluate(model, cfg, p, contexts, batch_size=4, progress=False)
    assert r.dead_fraction == 6 / 8 and r.dense_fraction == 2 / 8
    assert r.l0_per_layer == [2.0] * cfg.n_layers and r.l0_total == 2.0 * cfg.n_layers
    # Dense means active on strictly more than the threshold's fraction of tokens.
    r1 = evaluate(model, cfg, p, contexts, batch_size=4, dense_threshold=1.0, progress=False)
    assert r1.dense_fraction == 0.0 and r1.dead_fraction == 6 / 8


def test_result_json_and_table(models):
    from rich.console import Console

    model = models["llama"]
    tc_cfg, tc = _random_tc(model)
    r = evaluate(model, tc_cfg, tc, _contexts(2), batch_size=2, progress=False)
    assert isinstance(r, EvalResult)
    d = json.loads(json.dumps(r.to_dict()))
    assert len(d["nmse_per_layer"]) == model.cfg.n_layers and d["delta_ce"] == r.delta_ce
    console = Console(record=True, width=120)
    console.print(r.table())
    text = console.export_text()
    assert "NMSE per layer" in text and "ΔCE" in text and "top-1 agreement" in text


def test_bad_input(models):
    model = models["llama"]
    tc_cfg, tc = _random_tc(model)
    with pytest.raises(ConfigError, match="mismatch"):
        evaluate(model, tc_cfg.replace(d_model=32), tc, _contexts(2), progress=False)
    with pytest.raises(ValueError, match=r"\[n, T\]"):
        evaluate(model, tc_cfg, tc, _contexts(2)[0], progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate(model, tc_cfg, tc, _contexts(2)[:, :1], progress=False)
