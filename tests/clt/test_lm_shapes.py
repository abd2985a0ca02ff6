"""Real-size configs checked with jax.eval_shape: no weights, no memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from clt.lm import ALL, forward
from clt.lm.config import known_config
from clt.lm.params import param_shapes


@pytest.mark.parametrize("name,n_params", [("smollm2-135m", 134_515_008),
                                           ("gemma3-270m", 268_098_176)])
def test_real_size_shapes(name, n_params):
    cfg = known_config(name)
    shapes = param_shapes(cfg)
    total = sum(int(jnp.prod(jnp.asarray(s.shape))) for s in jax.tree.leaves(shapes))
    assert total == n_params  # published sizes: 135M and 270M (tied embeddings counted once)
    tokens = jax.ShapeDtypeStruct((2, 300), jnp.int32)
    logits, cap = jax.eval_shape(lambda p, t: forward(p, cfg, t, capture=ALL), shapes, tokens)
    assert logits.shape == (2, 300, cfg.vocab_size)
    assert cap.resid_mid.shape == (cfg.n_layers, 2, 300, cfg.d_model)
    assert cap.attn_pattern.shape == (cfg.n_layers, 2, cfg.n_heads, 300, 300)
    assert cap.final_norm_scale.shape == (2, 300)
