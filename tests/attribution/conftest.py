"""Fixtures: tiny random models of each family (saved once per session), float64 mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import attribution.replacement
import clt.lm.model
import tests.attribution.helpers

from tests.clt.hf_tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    made = {}

    def get(family: str):
        if family not in made:
            d = tmp_path_factory.mktemp(f"tiny_{family}")
            make_tiny(family, d)
            made[family] = d
        return str(made[family])

    return get


def _norm64(x, w, b, cfg, scale=None):
    """clt.lm.model.norm computing in float64 for float64 inputs (it computes in float32 for any
    input, which limits float64 comparisons to ~1e-7 relative). Same semantics otherwise."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if cfg.norm == "layernorm":
        x32 = x32 - x32.mean(-1, keepdims=True)
    if scale is None:
        scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + cfg.norm_eps)
    y = x32 * scale[..., None] * (w.astype(x32.dtype) + cfg.norm_offset)
    if b is not None:
        y = y + b.astype(x32.dtype)
    return y.astype(x.dtype), scale


@pytest.fixture
def x64(monkeypatch):
    """Float64 for the duration of a test, restored afterwards, with norms computed in float64
    too (see _norm64), so that comparisons hold to ~1e-12."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    for mod in (clt.lm.model, attribution.replacement, tests.attribution.helpers):
        monkeypatch.setattr(mod, "norm", _norm64)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)
        monkeypatch.undo()
