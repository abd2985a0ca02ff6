"""The transcoder definition against naive references: decode, folding, activations, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clt.configs import ConfigError
from clt.io import read_safetensors
from clt.lm import ModelConfig
from clt.transcoder import (
    Norms, TranscoderConfig, activate, batchtopk_mask, check_model, decode, decoder_norms,
    encode_pre, fold_norms, forward, init_params, jumprelu, load, save, topk_mask,
    unfold_norms,
)

L, D, F = 4, 8, 16
VARIANTS = {
    "clt": dict(),
    "plt": dict(max_reach=1),
    "window2": dict(max_reach=2),
    "clt_skip": dict(skip=True),
}


def _setup(variant: str, activation="jumprelu", seed=0):
    cfg = TranscoderConfig(d_model=D, n_layers=L, n_features=F, activation=activation,
                           k=3, **VARIANTS[variant])
    p = init_params(cfg, jax.random.key(seed), threshold=0.05)
    keys = jax.random.split(jax.random.key(seed + 1), 4)
    p.b_enc = 0.1 * jax.random.normal(keys[0], p.b_enc.shape)
    p.b_dec = jax.random.normal(keys[1], p.b_dec.shape)
    if p.W_skip is not None:
        p.W_skip = 0.2 * jax.random.normal(keys[2], p.W_skip.shape)
    x = jax.random.normal(keys[3], (5, L, D))
    return cfg, p, x


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_matches_naive_loops(variant):
    cfg, p, x = _setup(variant)
    y, acts = forward(cfg, p, x)
    a = np.asarray(acts)
    want = np.broadcast_to(np.asarray(p.b_dec), (5, L, D)).copy()
    for t in range(L):
        for s in range(L):
            reach = L if cfg.max_reach is None else cfg.max_reach
            if s <= t < s + reach:
                want[:, t] += a[:, s] @ np.asarray(p.W_dec[s][:, t - s])
        if p.W_skip is not None:
            want[:, t] += np.asarray(x[:, t]) @ np.asarray(p.W_skip[t])
    np.testing.assert_allclose(y, want, atol=1e-5)
    assert [w.shape[1] for w in p.W_dec] == [cfg.n_targets(s) for s in range(L)]
    # Pre-activations are encoder rows dotted with the input.
    z = np.einsum("bld,ldf->blf", np.asarray(x), np.asarray(p.W_enc)) + np.asarray(p.b_enc)
    np.testing.assert_allclose(encode_pre(p, x), z, atol=1e-5)
    zj, th = np.asarray(encode_pre(p, x)), np.asarray(p.threshold)
    np.testing.assert_array_equal(a, np.where(zj > th, zj, 0.0))
    assert 0 < (a > 0).mean() < 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_folding_norms_gives_the_same_function(variant):
    cfg, p, x = _setup(variant)
    k = jax.random.split(jax.random.key(7), 2)
    norms = Norms(in_mean=jax.random.normal(k[0], (L, D)), in_scale=jnp.array([0.5, 1, 2, 4.0]),
                  out_mean=jax.random.normal(k[1], (L, D)), out_scale=jnp.array([3, 1, .2, 2.]))
    xn = (x - norms.in_mean) / norms.in_scale[:, None]
    yn, an = forward(cfg, p, xn)
    folded = fold_norms(cfg, p, norms)
    y, a = forward(cfg, folded, x)
    np.testing.assert_allclose(a, an, atol=1e-5)
    np.testing.assert_allclose(y, yn * norms.out_scale[:, None] + norms.out_mean, atol=1e-4)
    # Unfolding (continuing training from an exported transcoder) gives the parameters back.
    back = unfold_norms(cfg, folded, norms)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_decoder_norms():
    cfg, p, _ = _setup("clt")
    concat = np.sqrt(np.sum(np.asarray(p.W_dec[1]) ** 2, axis=(1, 2)))
    np.testing.assert_allclose(decoder_norms(cfg, p, "concat")[1], concat, rtol=1e-5)
    per = np.sqrt(np.sum(np.asarray(p.W_dec[1]) ** 2, axis=2)).sum(1)
    np.testing.assert_allclose(decoder_norms(cfg, p, "sum")[1], per, rtol=1e-5)


def test_jumprelu_straight_through_gradients():
    """Forward is z * H(z - t); d/dz is H(z - t) + t/eps * K and d/dt is -t/eps * K, with K the
    rectangle kernel of width eps around the threshold (Rajamanoharan et al. 2024)."""
    t = jnp.array([0.5, 0.5, 0.5, 0.5])
    z = jnp.array([0.0, 0.48, 0.52, 1.0])
    eps = 0.1
    np.testing.assert_allclose(jumprelu(z, t, eps), [0, 0, 0.52, 1.0], rtol=1e-6)
    gz, gt = jax.grad(lambda z, t: jumprelu(z, t, eps).sum(), argnums=(0, 1))(z, t)
    np.testing.assert_allclose(gz, [0, 0.5 / eps, 1 + 0.5 / eps, 1], rtol=1e-6)
    np.testing.assert_allclose(gt, [0, -0.5 / eps, -0.5 / eps, 0], rtol=1e-6)
    # Thresholds shared over a batch get summed gradients.
    gt2 = jax.grad(lambda t: jumprelu(jnp.stack([z, z]), t, eps).sum())(t)
    np.testing.assert_allclose(gt2, 2 * gt, rtol=1e-6)


def test_topk_and_batchtopk():
    z = jnp.array([[[3.0, -1, 2, 0.5, 1]], [[0.1, 0.2, 0.3, 5, 4]]])  # [batch 2, layer 1, 5]
    np.testing.assert_array_equal(topk_mask(z, 2)[0, 0], [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(topk_mask(z, 2)[1, 0], [0, 0, 0, 1, 1])
    mask, kth = batchtopk_mask(z, 2)  # the 4 largest over the batch: 5, 4, 3, 2
    np.testing.assert_array_equal(mask[0, 0], [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(mask[1, 0], [0, 0, 0, 1, 1])
    assert float(kth[0]) == 2.0
    cfg = TranscoderConfig(d_model=2, n_layers=1, n_features=5, activation="topk", k=2)
    p = init_params(cfg, jax.random.key(0))
    np.testing.assert_array_equal(activate(cfg, p, z)[0, 0], [3, 0, 2, 0, 0])


def test_save_load_roundtrip_and_errors(tmp_path):
    cfg, p, x = _setup("clt_skip")
    save(tmp_path / "tc", cfg, p)
    cfg2, p2 = load(tmp_path / "tc")
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    save(tmp_path / "half", cfg, p, dtype="bfloat16")
    _, p3 = load(tmp_path / "half")
    np.testing.assert_allclose(forward(cfg, p3, x)[0], forward(cfg, p, x)[0], atol=0.1)
    # Sharded: files capped in size, tensors split by layer, the same numbers back.
    sizes = {}
    for name, dtype in (("shards", None), ("shards16", "float16")):
        save(tmp_path / name, cfg, p, dtype=dtype, max_file_mb=0.004)
        files = sorted((tmp_path / name).glob("transcoder-*-of-*.safetensors"))
        assert len(files) >= 2 and not (tmp_path / name / "transcoder.safetensors").exists()
        assert max(f.stat().st_size for f in files) <= 0.004 * 2**20 + 4096  # + header
        sizes[name] = sum(f.stat().st_size for f in files)
    assert sizes["shards16"] < 0.6 * sizes["shards"]
    cfg4, p4 = load(tmp_path / "shards")
    assert cfg4 == cfg
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p4)):
        np.testing.assert_array_equal(a, b)
    _, p5 = load(tmp_path / "shards16")
    np.testing.assert_allclose(forward(cfg, p5, x)[0], forward(cfg, p, x)[0], atol=0.02)
    files[1].unlink()
    with pytest.raises(ConfigError, match="incomplete.*missing"):
        load(tmp_path / "shards16")
    with pytest.raises(ValueError, match="exceeds max_file_mb"):
        save(tmp_path / "tiny", cfg, p, max_file_mb=1e-5)
    (tmp_path / "tc" / "transcoder.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="corrupt"):
        load(tmp_path / "tc")
    (tmp_path / "tc" / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json is missing"):
        load(tmp_path / "tc")


def test_load_converts_as_xla_does_and_widens_on_the_host(tmp_path, lowered):
    """`load` gives each tensor as XLA converts the stored one (`jnp.asarray(...).astype`), bit
    for bit, for widening and narrowing loads; a load that only widens (float32 or float16
    files into float32) lowers no program but the threshold's log (eager ops lower one per
    shape: shapes no other test uses, so none is cached)."""
    cfg = TranscoderConfig(d_model=11, n_layers=3, n_features=37, skip=True)
    p = init_params(cfg, jax.random.key(3), threshold=0.05)
    for stored in ("float32", "float16", "bfloat16"):
        save(tmp_path / stored, cfg, p, dtype=stored)
        raw = read_safetensors(tmp_path / stored / "transcoder.safetensors")
        for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
            with lowered() as programs:
                _, q = load(tmp_path / stored, dtype=dtype)
            if stored != "bfloat16" and dtype == jnp.float32:
                assert len(programs) <= 1, (stored, len(programs))
            f32 = jnp.float32
            want = {"W_enc": _xla(raw["W_enc"], dtype), "b_enc": _xla(raw["b_enc"], f32),
                    "b_dec": _xla(raw["b_dec"], f32), "W_skip": _xla(raw["W_skip"], dtype),
                    "log_threshold": np.asarray(jnp.log(_xla(raw["threshold"], f32))),
                    **{f"W_dec.{s}": _xla(raw[f"W_dec.{s}"], dtype) for s in range(cfg.n_layers)}}
            for name, w in want.items():
                got = (np.asarray(q.W_dec[int(name[-1])]) if name.startswith("W_dec.")
                       else np.asarray(getattr(q, name)))
                assert got.dtype == w.dtype, (stored, dtype, name)
                np.testing.assert_array_equal(got, w, err_msg=f"{stored} -> {dtype}: {name}")


def _xla(a: np.ndarray, dtype) -> np.ndarray:
    """`a` converted to `dtype` by XLA (an eager op)."""
    return np.asarray(jnp.asarray(a).astype(dtype))


def test_config_validation_and_model_mismatch():
    with pytest.raises(ConfigError, match="n_features"):
        TranscoderConfig(d_model=4, n_layers=2, n_features=0)
    with pytest.raises(ConfigError, match="exceeds n_features"):
        TranscoderConfig(d_model=4, n_layers=2, n_features=4, activation="topk", k=8)
    cfg = TranscoderConfig(d_model=8, n_layers=3, n_features=4)
    model = ModelConfig(vocab_size=10, d_model=16, n_layers=3, n_heads=2, n_kv_heads=2,
                        head_dim=8, d_mlp=8, max_position=8, name="m")
    with pytest.raises(ConfigError, match="transcoder/model mismatch.*d_model=8"):
        check_model(cfg, model)
    with pytest.raises(ValueError, match="needs its input"):
        c, p, x = _setup("clt_skip")
        decode(c, p, forward(c, p, x)[1])
