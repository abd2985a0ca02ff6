"""The sparse training step: same parameters as the dense step (every activation, PLT / windowed
CLT / CLT, with and without skip, both kernel sets, on 8 simulated devices), kernels against
naive loops (decoder and encoder gradients), support entries, overflow falling back to the dense
step, BatchTopK's threshold."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clt import sharding as shd
from clt import sparse as sp
from clt.train import Steps, TrainConfig, compile_step, init_state, place_state, train
from clt.transcoder import Norms, TranscoderConfig, activate, encode_pre, init_params, \
    kth_largest
from tests.clt.tiny_train import tiny_model, write_corpus

TOL = 1e-5  # per tensor: max |sparse - dense| / max |dense| (float32 rounding of sums)
# The numba kernels need two CPU threads (`sparse.cpu_kernels_available`); on a one-CPU machine
# only the XLA kernels are tested.
KERNELS = [k for k in sp.KERNELS if k != "cpu" or sp.cpu_kernels_available() is None]


def _max_rel(a_tree, b_tree) -> float:
    worst = 0.0
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
    return worst


def _setup(activation: str, reach, skip: bool, n_tok: int = 32, preact: float = 1e-2):
    L, D, F = 3, 8, 64
    cfg = TranscoderConfig(d_model=D, n_layers=L, n_features=F, max_reach=reach,
                           activation=activation, k=6, skip=skip)
    # A wide JumpReLU band and a threshold near the pre-activations: many inactive entries get
    # straight-through gradients, and the pre-activation loss is on.
    tc = TrainConfig.make(n_features=F, max_reach=reach, activation=activation, k=6, skip=skip,
                          batch_tokens=n_tok, lr=1e-2, warmup_steps=0, jumprelu_bandwidth=0.5,
                          threshold_init=0.3, sparsity_coef=1e-2, preact_coef=preact)
    k = jax.random.split(jax.random.key(3), 2)
    x, y = jax.random.normal(k[0], (n_tok, L, D)), jax.random.normal(k[1], (n_tok, L, D))
    return cfg, tc, init_state(cfg, tc, Norms.identity(L, D)), x, y


CASES = list(itertools.product(["jumprelu", "relu", "topk", "batchtopk"], [1, 2, None],
                               [False, True]))


# The encoder's gradient is taken over the entries only unless JumpReLU's pre-activation penalty
# reads every pre-activation: JumpReLU runs with that penalty (dense encoder gradient) and
# without it (entries; the straight-through band's entries included).
@pytest.mark.parametrize("activation,reach,skip,preact", [c + (1e-2,) for c in CASES] + [
    ("jumprelu", None, True, 0.0), ("jumprelu", 1, False, 0.0)])
def test_sparse_step_equals_dense(activation, reach, skip, preact):
    cfg, tc, state, x, y = _setup(activation, reach, skip, preact=preact)
    mesh = shd.make_mesh(1, 1)
    s0 = place_state(state, cfg, tc, mesh)
    ref, m_ref = compile_step(cfg, tc, mesh)(s0, x, y)
    # The step moves parameters far more than the tolerance (the comparison can fail).
    assert _max_rel(ref.params.W_dec, state.params.W_dec) > 100 * TOL
    for kernels in KERNELS:
        new, m = compile_step(cfg, tc, mesh, (cfg.n_features, kernels))(s0, x, y)
        assert not bool(m["overflow"])
        assert _max_rel(new.params, ref.params) <= TOL, kernels
        assert _max_rel(new.opt_state, ref.opt_state) <= TOL, kernels
        np.testing.assert_allclose(m["loss"], m_ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(m["l0"], m_ref["l0"], rtol=1e-6)
    if activation == "jumprelu":  # the band holds inactive entries with gradients
        assert float(m["support"]) > float(jnp.max(m["l0"])) + 1


@pytest.mark.parametrize("activation,reach,skip", [("jumprelu", None, True),
                                                   ("batchtopk", 1, False),
                                                   ("topk", 2, True)])
def test_sparse_step_on_8_devices_equals_dense_on_one(activation, reach, skip):
    """Mesh data=2 x feature=4 (XLA kernels), two steps, against the dense step on one device."""
    assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 host devices"
    cfg, tc, state, x, y = _setup(activation, reach, skip)
    one, mesh = shd.make_mesh(1, 1), shd.make_mesh(2, 4)
    ref, new = place_state(state, cfg, tc, one), place_state(state, cfg, tc, mesh)
    dense, sparse = compile_step(cfg, tc, one), compile_step(cfg, tc, mesh, (32, "xla"))
    for _ in range(2):
        ref, _ = dense(ref, x, y)
        new, m = sparse(new, x, y)
        assert not bool(m["overflow"])
    assert len({str(sh.index) for sh in new.params.W_enc.addressable_shards}) == 4
    assert _max_rel(new.params, ref.params) <= TOL
    assert _max_rel(new.opt_state, ref.opt_state) <= TOL


def _naive(vals, tok, feat, W, n_tok, g):
    """Loops over every source layer's entries in float64: forward, value gradient, weight
    gradient. Source layer s writes into target layers s .. s + W[s].shape[1] - 1."""
    L, D = len(W), W[0].shape[-1]
    out, gv = np.zeros((n_tok, L, D)), np.zeros(vals.shape)
    gW = [np.zeros(w.shape) for w in W]
    for s, w in enumerate(W):
        nt = w.shape[1]
        for e, (v, t, f) in enumerate(zip(vals[s], tok[s], feat[s])):
            if t >= n_tok:
                continue  # padding
            out[t, s:s + nt] += v * w[f]
            gv[s, e] = np.sum(w[f] * g[t, s:s + nt])
            gW[s][f] += v * g[t, s:s + nt]
    return out, gv, gW


# (kernels, cache tiles): "cpu" runs the decoder in XLA FFI handlers (`clt._sparse_ffi`, the
# tiles compiled in), "cpu-callback" through jax.pure_callback, where the tiles can be shrunk.
_BLOCKS = [(k, None) for k in KERNELS] + [("cpu-callback", None), ("cpu-callback", (4, 3)),
                                          ("cpu-callback", (1, 1))]


def _small_blocks(monkeypatch, blocks, kernels="cpu"):
    """The cpu kernels' cache tiles made smaller than the test's sizes, so entries fall into
    several feature blocks (forward, value gradient) and token blocks (weight gradients).
    kernels "cpu-callback": the cpu kernels through pure_callback (FFI handlers off). Returns
    the kernel set's name in `clt.sparse`."""
    from clt import _sparse_cpu, _sparse_ffi

    if kernels == "cpu-callback":
        monkeypatch.setattr(_sparse_ffi, "available", lambda: False)
    if blocks is not None:
        monkeypatch.setattr(_sparse_cpu, "FEATURE_BLOCK", blocks[0])
        monkeypatch.setattr(_sparse_cpu, "TOKEN_BLOCK", blocks[1])
    return kernels.removesuffix("-callback")


def test_ffi_handlers_are_used_and_equal_the_callback_kernels():
    """The FFI handlers (decoder, encoder gradient, selection) are registered here and give
    the numpy kernels' results bit for bit, on a case spanning several feature blocks (2 x
    FEATURE_BLOCK features) and token blocks (TOKEN_BLOCK + 45 tokens), with padding entries;
    and both equal float64 loops."""
    from clt import _sparse_cpu, _sparse_ffi

    assert _sparse_ffi.available(), "jax refused the FFI handlers (see the warning)"
    rng = np.random.default_rng(1)
    L, n_tok, D, k = 3, _sparse_cpu.TOKEN_BLOCK + 45, 6, 7
    F = 2 * _sparse_cpu.FEATURE_BLOCK
    mask = np.zeros((L, n_tok, F), bool)
    for s in range(L):
        for t in range(n_tok):
            mask[s, t, rng.choice(F, rng.integers(0, k + 1), replace=False)] = True
    act = sp.select(jnp.asarray(mask), capacity=n_tok * k + 9, kernels="cpu")
    for got, want in zip(jax.tree.leaves(act), _sparse_cpu.select(mask, n_tok * k + 9)):
        np.testing.assert_array_equal(np.asarray(got), want)  # the selection's handler
    vals = jnp.asarray(rng.standard_normal(act.tok.shape), jnp.float32) * act.valid
    W = tuple(jnp.asarray(rng.standard_normal((F, L - s, D)), jnp.float32) for s in range(L))
    g = rng.standard_normal((n_tok, L, D)).astype(np.float32)
    out = jax.jit(_sparse_ffi.forward, static_argnums=4)(vals, act.feat, act.row_ptr, W, n_tok)
    gv, gW = jax.jit(_sparse_ffi.backward)(vals, act.feat, act.row_ptr, W, jnp.asarray(g))
    args = [np.asarray(a) for a in (vals, act.feat, act.row_ptr)]
    W_np = tuple(np.asarray(w) for w in W)
    ref_out = _sparse_cpu.forward(*args, W_np)
    ref_gv, ref_gW = _sparse_cpu.backward(*args, W_np, g)
    for got, want in zip((out, gv, *gW), (ref_out, ref_gv, *ref_gW)):
        np.testing.assert_array_equal(np.asarray(got), want)
    naive = _naive(args[0], np.asarray(act.tok), args[1], list(W_np), n_tok, g)
    for got, want in zip((out, gv, *gW), (naive[0], naive[1], *naive[2])):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # The encoder's gradient over the same entries (vals standing for the cotangents dz), in
    # W_enc's layout [L, D, F]: the handler, the numpy kernel and float64 loops.
    x = np.moveaxis(g, 1, 0).copy()  # [L, n_tok, D]
    dW, db = jax.jit(_sparse_ffi.encoder_grad, static_argnums=4)(vals, act.feat, act.row_ptr,
                                                                 jnp.asarray(x), F)
    ref_dW, ref_db = _sparse_cpu.encoder_grad(*args, x, F)
    np.testing.assert_array_equal(np.asarray(dW), ref_dW)
    np.testing.assert_array_equal(np.asarray(db), ref_db)
    want_W, want_b = np.zeros((L, D, F)), np.zeros((L, F))
    tok = np.asarray(act.tok)
    for s in range(L):
        for e in range(tok.shape[1]):
            if tok[s, e] < n_tok:
                f = args[1][s, e]
                want_W[s, :, f] += x[s, tok[s, e]].astype(np.float64) * args[0][s, e]
                want_b[s, f] += args[0][s, e]
    np.testing.assert_allclose(np.asarray(dW), want_W, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(db), want_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels,blocks", _BLOCKS)
def test_kernels_match_naive_loops(kernels, blocks, monkeypatch):
    """A ragged 3-layer decoder (3, 2, 1 target layers: a CLT), every layer's entries apart;
    with the cpu kernels' cache tiles as shipped and smaller than the sizes here."""
    kernels = _small_blocks(monkeypatch, blocks, kernels)
    rng = np.random.default_rng(0)
    L, n_tok, F, D, cap = 3, 7, 11, 5, 40
    mask = rng.random((L, n_tok, F)) < 0.3  # [layer, token, feature]
    mask[0, 2] = True  # a token with every feature, and one with none
    mask[0, 4] = False
    act = sp.select(jnp.asarray(mask), capacity=cap, kernels=kernels)
    np.testing.assert_array_equal(act.count, mask.sum((1, 2)))
    assert not bool(act.overflow)
    vals = jnp.asarray(rng.standard_normal((L, cap)), jnp.float32) * act.valid
    W = tuple(jnp.asarray(rng.standard_normal((F, L - s, D)), jnp.float32) for s in range(L))
    g = rng.standard_normal((n_tok, L, D)).astype(np.float32)
    out, vjp = jax.vjp(lambda v, w: sp.spmm(v, act.tok, act.feat, act.row_ptr, w, n_tok, kernels),
                       vals, W)
    gv, gW = vjp(jnp.asarray(g))
    ref = _naive(np.asarray(vals), np.asarray(act.tok), np.asarray(act.feat),
                 [np.asarray(w) for w in W], n_tok, g)
    for got, want in zip((out, gv, *gW), (ref[0], ref[1], *ref[2])):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels,blocks", _BLOCKS)
def test_encoder_gradient_over_entries_matches_naive_loops(kernels, blocks, monkeypatch):
    """dW_enc and db_enc from the entries alone equal loops over the entries (float64), and
    the encoder rows of features without entries are exactly 0."""
    kernels = _small_blocks(monkeypatch, blocks, kernels)
    rng = np.random.default_rng(2)
    L, n_tok, D, F, cap = 2, 6, 4, 9, 30
    mask = rng.random((L, n_tok, F)) < 0.3
    mask[1, :, 0] = False  # feature 0 of layer 1 has no entries
    act = sp.select(jnp.asarray(mask), capacity=cap, kernels=kernels)
    x = rng.standard_normal((L, n_tok, D)).astype(np.float32)
    W = jnp.asarray(rng.standard_normal((L, D, F)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((L, F)), jnp.float32)
    z = jnp.einsum("lnd,ldf->lnf", x, W) + b[:, None]
    dz = rng.standard_normal((L, cap)).astype(np.float32) * np.asarray(act.valid)
    params = init_params(TranscoderConfig(d_model=D, n_layers=L, n_features=F,
                                          activation="relu"), jax.random.key(0))

    def f(W, b):
        z_e = sp.encoder_entries(dataclasses.replace(params, W_enc=W, b_enc=b), sp.gather_entries(
            jax.lax.stop_gradient(z), act), jnp.asarray(x), act, kernels)
        return (z_e * dz).sum()

    gW, gb = jax.grad(f, argnums=(0, 1))(W, b)
    want_W, want_b = np.zeros((L, D, F)), np.zeros((L, F))
    for l in range(L):
        for e in range(int(act.count[l])):
            t, f_ = int(act.tok[l, e]), int(act.feat[l, e])
            want_W[l, :, f_] += x[l, t].astype(np.float64) * dz[l, e]
            want_b[l, f_] += dz[l, e]
    np.testing.assert_allclose(np.asarray(gW), want_W, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gb), want_b, rtol=1e-5, atol=1e-5)
    assert not np.asarray(gW[1, :, 0]).any() and float(gb[1, 0]) == 0.0


@pytest.mark.parametrize("kernels", KERNELS)
def test_select_lists_entries_token_major_with_padding(kernels):
    mask = np.zeros((2, 3, 4), bool)  # [layer, token, feature]
    mask[0, 0, [1, 3]] = mask[0, 2, 0] = True  # layer 0: token 0 -> 1, 3; token 2 -> 0
    mask[1] = True  # layer 1: 12 entries, over a capacity of 5
    act = sp.select(jnp.asarray(mask), capacity=5, kernels=kernels)
    np.testing.assert_array_equal(act.tok[0], [0, 0, 2, 3, 3])  # padding: tok = n_tokens
    np.testing.assert_array_equal(act.feat[0][:3], [1, 3, 0])
    np.testing.assert_array_equal(act.valid[0], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(act.row_ptr[0], [0, 2, 2, 3])
    np.testing.assert_array_equal(act.count, [3, 12])
    assert bool(act.overflow)
    z = jnp.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_array_equal(sp.gather_entries(z, act)[0][:3], [1, 3, 8])


@pytest.mark.parametrize("donate", [False, True])
def test_overflow_runs_the_batch_densely_and_grows_capacity(donate):
    """With donation the overflowing sparse step hands back the untouched state (its input's
    memory), and the dense rerun runs on that."""
    cfg, tc, state, x, y = _setup("relu", None, False)
    tc = tc.__class__(**{**tc.__dict__, "sparse": "on", "sparse_kernels": "xla"})
    mesh = shd.make_mesh(1, 1)
    ref, _ = compile_step(cfg, tc, mesh)(place_state(state, cfg, tc, mesh), x, y)
    s0 = place_state(state, cfg, tc, mesh)  # Norms.identity holds arrays twice: Steps copes
    steps = Steps(cfg, tc, mesh, donate=donate)
    steps.capacity = 2  # ReLU at init: ~half the 64 features are active
    new, m = steps(s0, x, y)
    assert all(a.is_deleted() for a in jax.tree.leaves(s0.params)) == donate
    assert steps.dense_reruns == 1 and m["sparse"] == 2
    assert _max_rel(new.params, ref.params) <= 1e-6  # the dense step's own result
    assert steps.capacity >= float(m["support"])  # grown to the support
    new2, m2 = steps(new, x, y)
    assert steps.dense_reruns == 1 and m2["sparse"] == steps.capacity


@pytest.mark.parametrize("kernels", KERNELS)
def test_kth_largest_equals_top_k(kernels):
    """Both kernel sets' k-th largest (bisection on the float bits; numba's radix select),
    jitted as the train step runs them, against lax.top_k. The third case's values share their
    high 16 bits, so the radix select's second pass decides them."""
    kth = sp._KERNELS[kernels].kth
    assert kernels != "xla" or kth is kth_largest
    rng = np.random.default_rng(1)
    rows = [rng.standard_normal((3, 500)), -np.abs(rng.standard_normal((2, 40))),
            rng.uniform(1.0, 1.001, (2, 300)), -rng.uniform(1.0, 1.001, (1, 300)),
            np.array([[0.0, -0.0, 1, 1, 1, -2, 3.5, 1e-30]])]
    for x in rows:
        x = jnp.asarray(x, jnp.float32)
        for k in (1, 2, 5, x.shape[1]):
            got = jax.jit(kth, static_argnums=1)(x, k)
            np.testing.assert_array_equal(got, jax.lax.top_k(x, k)[0][:, -1])


def test_batchtopk_threshold_follows_the_batch_cut(tmp_path):
    """Trained with BatchTopK, the inference rule (threshold) keeps ~k features per token."""
    corpus = write_corpus(tmp_path / "c.txt")
    model = tiny_model()
    tc = TrainConfig.make(model="tiny", data=str(corpus), context_length=32, n_features=64,
                          steps=60, batch_tokens=256, round_contexts=32, lr=3e-3,
                          warmup_steps=10, out=str(tmp_path / "run"), checkpoint_every=100,
                          log_every=10, activation="batchtopk", k=4, mesh_data=1,
                          async_checkpoints=False, sparse="on")
    from clt.transcoder import load

    cfg, params = load(train(tc, model=model, progress=False))
    from clt.data import ActivationStream, open_contexts

    stream = ActivationStream(model, open_contexts(str(corpus), model.tokenizer, 32),
                              input_point="resid_mid", batch_tokens=256, round_contexts=32)
    x, _, order, n = stream.round(5)
    a = activate(cfg, params, encode_pre(params, x[order[:n]]))
    l0 = float((a > 0).sum(-1).mean())
    assert 0.5 * cfg.k <= l0 <= 2 * cfg.k, l0


def test_kernel_choice_per_device(monkeypatch):
    """auto: numba on one CPU device with two CPU threads, nothing (dense) on one CPU thread or
    a CPU mesh; an explicit cpu choice that cannot run is one clear error."""
    from clt.configs import ConfigError
    from clt.train import kernels_for

    one, mesh = shd.make_mesh(1, 1), shd.make_mesh(2, 4)
    auto, cpu = TrainConfig(), TrainConfig.make(sparse_kernels="cpu")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert kernels_for(auto, one) == "cpu" and kernels_for(auto, mesh) is None
    assert kernels_for(TrainConfig.make(sparse_kernels="xla"), mesh) == "xla"
    with pytest.raises(ConfigError, match="one CPU device only"):
        kernels_for(cpu, mesh)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert kernels_for(auto, one) is None
    with pytest.raises(ConfigError, match="only one CPU.*use xla or auto"):
        kernels_for(cpu, one)
