"""Exactness: the local replacement model reproduces the real model's logits; graph basics."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attribution.replacement import build, linear_forward, replacement_logits
from attribution.trace import TraceConfig, trace_tokens
from clt.lm import forward, load_model
from tests.attribution.helpers import calibrate, random_transcoder
from tests.clt.hf_tiny import FAMILIES

IDS = [1, 5, 9, 22, 7, 3, 100, 50, 11, 12, 17, 64]  # longer than the tiny sliding window (8)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("reach,skip,point", [(None, True, "mlp_in"), (1, False, "resid_mid")])
def test_replacement_reproduces_logits(tiny_dirs, family, reach, skip, point):
    m = load_model(tiny_dirs(family))
    tc_cfg, tc_params = random_transcoder(m.cfg, 32, max_reach=reach, skip=skip,
                                          input_point=point)
    tc_params = calibrate(m.params, m.cfg, tc_cfg, tc_params, IDS, 4.0)
    rm, acts = build(m.params, m.cfg, tc_cfg, tc_params, np.array(IDS))
    assert (acts > 0).sum() > 0
    want, _ = forward(m.params, m.cfg, jnp.asarray(IDS)[None])
    got = replacement_logits(rm, m.params, m.cfg, tc_cfg, tc_params)
    np.testing.assert_allclose(got, want[0], atol=1e-5, rtol=0)
    # The frozen linear model at the real inputs gives the real transcoder inputs and logits.
    reads, h = linear_forward(rm, m.params, m.cfg, tc_cfg, tc_params, rm.embeds, rm.mlp_sub)
    np.testing.assert_allclose(reads, rm.inputs, atol=1e-5)
    if not m.cfg.final_softcap:
        np.testing.assert_allclose(h @ m.params.W_U, want[0], atol=1e-5)


@pytest.mark.parametrize("reach,skip", [
    (1, False), pytest.param(None, True, marks=pytest.mark.slow)])  # the CLT compiles for ~40 s
def test_smollm2_replacement_is_exact(reach, skip):
    """The embedded SmolLM2-135M with a random PLT, or CLT with skip: logits to 1e-5 relative to
    their scale (|logits| reach ~31). Absolute 1e-5 is below this model's own float32 reproducibility:
    the same forward pass compiled as another XLA program (layers unrolled instead of scanned)
    already differs from it by ~5e-5."""
    m = load_model("smollm2-135m")
    ids = m.tokenizer.encode("The capital of France is", add_bos=True)
    tc_cfg, tc_params = random_transcoder(m.cfg, 64, max_reach=reach, skip=skip)
    tc_params = calibrate(m.params, m.cfg, tc_cfg, tc_params, ids, 8.0)
    rm, acts = build(m.params, m.cfg, tc_cfg, tc_params, np.array(ids))
    assert 2 <= float((acts[1:] > 0).sum(-1).mean()) <= 32
    want, _ = forward(m.params, m.cfg, jnp.asarray(ids)[None])
    got = replacement_logits(rm, m.params, m.cfg, tc_cfg, tc_params)
    np.testing.assert_allclose(got, want[0], atol=1e-5 * float(jnp.abs(want).max()), rtol=0)
    assert int(jnp.argmax(got[-1])) == m.tokenizer.token_to_id("ĠParis")


def test_logit_nodes(tiny_dirs):
    m = load_model(tiny_dirs("gemma2"))  # soft-capped logits
    tc_cfg, tc_params = random_transcoder(m.cfg, 16)
    g = trace_tokens(m.params, m.cfg, tc_cfg, tc_params, IDS[1:],
                     TraceConfig(prompt="t", max_n_logits=4, desired_logit_prob=0.99))
    logits, _ = forward(m.params, m.cfg, jnp.asarray(IDS)[None])
    p = np.array(jnp.exp(logits[0, -1] - jnp.max(logits[0, -1])), np.float64)
    p /= p.sum()
    top = np.argsort(-p)[:4]
    n = min(4, int(np.searchsorted(np.cumsum(p[top]), 0.99)) + 1)
    np.testing.assert_array_equal(g.logit_tokens, top[:n])
    np.testing.assert_allclose(g.logit_probs, p[top[:n]], rtol=1e-5)
    g2 = trace_tokens(m.params, m.cfg, tc_cfg, tc_params, IDS[1:],
                      TraceConfig(prompt="t", desired_logit_prob=1e-6))
    assert len(g2.logit_tokens) == 1
