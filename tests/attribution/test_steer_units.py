"""The unit of `cltrace steer --alpha` (`attribution.interventions.STEER_UNIT`): the vector added
after block LAYER is the unit direction times alpha times the mean residual norm after that block
over the prompt's positions (BOS excluded), whatever the raw vector's norm. Checked on a tiny
random model against the residual stream read off an independent forward pass."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from attribution import interventions as iv
from clt.configs import ConfigError
from clt.lm.model import forward
from cltrace.cli import main
from tests.clt.hf_tiny import make_tiny
from tests.clt.tiny_train import tiny_tokenizer

PROMPT = "w1 w2 w3 w4 w5"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from clt.lm import load_model

    d = tmp_path_factory.mktemp("tiny_llama_units")
    make_tiny("llama", d)
    tiny_tokenizer().backend.save(str(d / "tokenizer.json"))
    m = load_model(str(d), dtype=jnp.float32)
    ids = [m.cfg.bos_token_id] + m.tokenizer.encode(PROMPT, add_bos=False)
    return d, m, ids


def _resid_after(m, ids, layer, hook=None, hook_params=None):
    """Residual after block `layer` [pos, d_model], read independently of the module."""
    _, cap = forward(m.params, m.cfg, jnp.asarray([ids]), capture=("resid_pre", "resid_final"),
                     mlp_hook=hook, hook_params=hook_params)
    r = cap.resid_pre[layer + 1, 0] if layer + 1 < m.cfg.n_layers else cap.resid_final[0]
    return np.asarray(r, np.float64)


@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("raw_scale", [1e-3, 1.0, 250.0])
def test_added_norm_is_alpha_times_reference(tiny, layer, raw_scale):
    _, m, ids = tiny
    rng = np.random.default_rng(layer)
    v = rng.normal(size=m.cfg.d_model).astype(np.float32) * raw_scale
    plain = _resid_after(m, ids, layer)
    ref = float(np.linalg.norm(plain[1:], axis=-1).mean())  # BOS (position 0) excluded
    assert ids[0] == m.cfg.bos_token_id
    for alpha in (0.25, -0.7, 2.0):
        s = iv.steering_vector(m.params, m.cfg, ids, v, layer, alpha)
        np.testing.assert_allclose(s.reference_norm, ref, rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(s.vector), abs(alpha) * ref, rtol=1e-5)
        # Along v's direction (sign of alpha), whatever v's norm.
        cos = float(s.vector @ v) / (np.linalg.norm(s.vector) * np.linalg.norm(v))
        np.testing.assert_allclose(cos, np.sign(alpha), atol=1e-5)
        # What the model sees: the residual after the block moves by exactly that vector.
        moved = _resid_after(m, ids, layer, iv.SteerHook(layer, 1.0), jnp.asarray(s.vector))
        added = moved - plain
        np.testing.assert_allclose(np.linalg.norm(added, axis=-1), abs(alpha) * ref,
                                   rtol=1e-4)
        assert s.summary()["added_norm"] == pytest.approx(abs(alpha) * ref, rel=1e-5)


def test_same_alpha_same_push_whatever_the_raw_norm(tiny, tmp_path):
    """End to end: two vectors along one direction with norms 1000x apart steer identically."""
    d, m, _ = tiny
    rng = np.random.default_rng(3)
    v = rng.normal(size=m.cfg.d_model).astype(np.float32)
    results = []
    for scale in (0.05, 50.0):
        np.save(tmp_path / f"v{scale}.npy", v * scale)
        out = tmp_path / f"r{scale}.json"
        assert main(["steer", PROMPT, "--model", str(d), "--vector",
                     str(tmp_path / f"v{scale}.npy"), "--layer", "1", "--alpha", "0.5",
                     "--max-new-tokens", "3", "--out", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    a, b = results
    assert a["steering"]["raw_vector_norm"] == pytest.approx(
        b["steering"]["raw_vector_norm"] / 1000, rel=1e-5)
    for key in ("reference_norm", "added_norm"):
        assert a["steering"][key] == pytest.approx(b["steering"][key], rel=1e-5)
    assert a["steering"]["added_norm"] == pytest.approx(0.5 * a["steering"]["reference_norm"],
                                                        rel=1e-5)
    assert [t for t, _ in a["top_after"]] == [t for t, _ in b["top_after"]]
    np.testing.assert_allclose([p for _, p in a["top_after"]], [p for _, p in b["top_after"]],
                               rtol=1e-4, atol=1e-6)
    assert a["intervened"] == b["intervened"]


def test_steering_refuses_a_vector_without_direction(tiny):
    _, m, ids = tiny
    with pytest.raises(ConfigError, match="no direction"):
        iv.steering_vector(m.params, m.cfg, ids, np.zeros(m.cfg.d_model), 1, 0.5)
    with pytest.raises(ConfigError, match="finite"):
        iv.steering_vector(m.params, m.cfg, ids, np.ones(m.cfg.d_model), 1, float("nan"))
