"""Interventions: frozen mode reproduces the graph's edges, free mode is exact with no edit and is
the errors-only model with every feature zeroed; steering and difference of means; bad input."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from attribution import interventions as iv
from attribution import replacement as rep
from attribution.trace import TraceConfig, trace_tokens
from clt import transcoder as tcm
from clt.configs import ConfigError
from clt.lm import Capture, forward, load_model
from tests.attribution.helpers import calibrate, random_transcoder

IDS = [5, 9, 22, 7, 3, 100]


def _setup(tiny_dirs, family, reach, skip, dtype=jnp.float64, per=3.0):
    m = load_model(tiny_dirs(family), dtype=dtype)
    tc_cfg, tc_params = random_transcoder(m.cfg, 16, max_reach=reach, skip=skip, dtype=dtype)
    ids = [m.cfg.bos_token_id] + IDS
    tc_params = calibrate(m.params, m.cfg, tc_cfg, tc_params, ids, per)
    return m, tc_cfg, tc_params, ids


def _targets(m, tc_cfg, tc_params, graph, reads, hidden):
    """Every target's value in the graph's terms: feature pre-activations, logit directions."""
    r = graph.ranges
    pre = np.einsum("nd,ndf->nf", np.asarray(reads)[graph.feature_layer, graph.feature_pos],
                    np.asarray(tc_params.W_enc)[graph.feature_layer])
    feat = pre[np.arange(r.feature.stop), graph.feature_index]
    W_U = np.asarray(m.params.W_U)
    dirs = W_U[:, graph.logit_tokens] - W_U.mean(1, keepdims=True)
    return np.concatenate([feat, np.asarray(hidden)[-1] @ dirs])


@pytest.mark.parametrize("family,reach,skip", [("llama", 1, False), ("gemma2", None, True),
                                               ("gpt2", 2, True)])
def test_frozen_zeroing_a_feature_moves_every_target_by_minus_its_edge(tiny_dirs, x64, family,
                                                                      reach, skip):
    m, tc_cfg, tc_params, ids = _setup(tiny_dirs, family, reach, skip)
    graph = trace_tokens(m.params, m.cfg, tc_cfg, tc_params, ids[1:],
                         TraceConfig(prompt="t", dtype="float64", batch_size=16))
    rm, acts = rep.build(m.params, m.cfg, tc_cfg, tc_params, np.asarray(ids))
    base = _targets(m, tc_cfg, tc_params, graph, *iv.frozen_effects(
        m.params, m.cfg, tc_cfg, tc_params, rm, acts, ()))
    r = graph.ranges
    rows = np.r_[r.feature, r.logit]
    rng = np.random.default_rng(0)
    for s in rng.choice(r.feature.stop, size=min(6, r.feature.stop), replace=False):
        edit = iv.FeatureEdit(int(graph.feature_layer[s]), int(graph.feature_index[s]),
                              int(graph.feature_pos[s]), "set", 0.0)
        got = _targets(m, tc_cfg, tc_params, graph, *iv.frozen_effects(
            m.params, m.cfg, tc_cfg, tc_params, rm, acts, (edit,))) - base
        want = -graph.adjacency[rows, s]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * np.abs(want).max())
        # Scaling by 3 adds twice the edge (the edge is linear in the activation).
        edit3 = dataclasses.replace(edit, op="scale", value=3.0)
        got3 = _targets(m, tc_cfg, tc_params, graph, *iv.frozen_effects(
            m.params, m.cfg, tc_cfg, tc_params, rm, acts, (edit3,))) - base
        np.testing.assert_allclose(got3, -2 * want, rtol=1e-9, atol=1e-11 * np.abs(want).max())


@pytest.mark.parametrize("family,reach,skip", [("llama", None, False), ("gemma3", 1, True)])
def test_free_mode_identity_and_errors_only(tiny_dirs, family, reach, skip):
    m, tc_cfg, tc_params, ids = _setup(tiny_dirs, family, reach, skip, dtype=jnp.float32)
    rm, _ = rep.build(m.params, m.cfg, tc_cfg, tc_params, np.asarray(ids))
    logits, _ = forward(m.params, m.cfg, jnp.asarray([ids]))
    same = iv.free_logits(m.params, m.cfg, tc_cfg, tc_params, rm, ())
    np.testing.assert_allclose(same, logits[0], atol=1e-5)
    # An edit that changes nothing (scale by 1) is also the identity.
    noop = iv.free_logits(m.params, m.cfg, tc_cfg, tc_params, rm,
                          (iv.FeatureEdit(1, 3, None, "scale", 1.0),))
    np.testing.assert_allclose(noop, logits[0], atol=1e-5)
    # Every feature zeroed everywhere: each MLP is its bias + skip + the frozen error.
    zero = tuple(iv.FeatureEdit(layer, f, None, "set", 0.0)
                 for layer in range(tc_cfg.n_layers) for f in range(tc_cfg.n_features))
    got = iv.free_logits(m.params, m.cfg, tc_cfg, tc_params, rm, zero)
    if not skip:  # independent reference: the scanned forward with MLP outputs substituted
        errors_only = (tc_params.b_dec[:, None, :] + rm.error)[:, None]
        want, _ = forward(m.params, m.cfg, jnp.asarray([ids]),
                          frozen=Capture(mlp_out=errors_only))
        np.testing.assert_allclose(got, want[0], atol=1e-4)
    assert float(jnp.abs(got - logits[0]).max()) > 1e-3  # the features mattered
    # A single edit changes logits only from its position on (causality).
    one = iv.free_logits(m.params, m.cfg, tc_cfg, tc_params, rm,
                         (iv.FeatureEdit(0, 2, 4, "set", 5.0),))
    np.testing.assert_allclose(one[:4], logits[0, :4], atol=1e-5)
    assert float(jnp.abs(one[4:] - logits[0, 4:]).max()) > 1e-4


def test_generation_with_interventions(tiny_dirs):
    m, tc_cfg, tc_params, ids = _setup(tiny_dirs, "llama", None, False, dtype=jnp.float32)
    rm, _ = rep.build(m.params, m.cfg, tc_cfg, tc_params, np.asarray(ids))
    plain = iv.greedy_continue(
        lambda t: iv.free_logits(m.params, m.cfg, tc_cfg, tc_params, rm, (), tokens=t), ids, 6)
    # With no edit, generation equals the model's own greedy continuation.
    own = iv.greedy_continue(lambda t: forward(m.params, m.cfg, t[None])[0][0], ids, 6)
    assert plain == own and len(plain) == 6
    strong = (iv.FeatureEdit(tc_cfg.n_layers - 1, 0, 3, "set", 200.0, onwards=True),)
    steered = iv.greedy_continue(
        lambda t: iv.free_logits(m.params, m.cfg, tc_cfg, tc_params, rm, strong, tokens=t),
        ids, 6)
    assert steered != plain


def test_steering_and_difference_of_means(tiny_dirs):
    m, tc_cfg, tc_params, ids = _setup(tiny_dirs, "gemma2", None, False, dtype=jnp.float32)
    logits, _ = forward(m.params, m.cfg, jnp.asarray([ids]))
    v = iv.feature_direction(tc_cfg, tc_params, 0, 3, target_layer=1)
    np.testing.assert_array_equal(v, tc_params.W_dec[0][3, 1])
    same = iv.steered_logits(m.params, m.cfg, ids, v, layer=1, alpha=0.0)
    np.testing.assert_allclose(same, logits[0], atol=1e-5)
    moved = iv.steered_logits(m.params, m.cfg, ids, v, layer=1, alpha=50.0, from_pos=3)
    np.testing.assert_allclose(moved[:3], logits[0, :3], atol=1e-5)
    assert float(jnp.abs(moved[3:] - logits[0, 3:]).max()) > 1e-3
    # Steering after block l = adding alpha * v to the residual entering block l + 1.
    _, cap = forward(m.params, m.cfg, jnp.asarray([ids]), capture=("resid_pre",))
    _, cap2 = forward(m.params, m.cfg, jnp.asarray([ids]), capture=("resid_pre",),
                      mlp_hook=iv.SteerHook(0, 2.0), hook_params=v)
    np.testing.assert_allclose(cap2.resid_pre[1], cap.resid_pre[1] + 2.0 * v, atol=1e-5)
    # Difference of means against a hand computation.
    pos, neg = [ids[:4], ids[:6]], [ids[:3]]
    got = iv.diff_of_means(m.params, m.cfg, pos, neg, layer=1)
    last = []
    for t in pos + neg:
        _, c = forward(m.params, m.cfg, jnp.asarray([t]), capture=("resid_pre",))
        last.append(np.asarray(c.resid_pre[2, 0, -1]))
    np.testing.assert_allclose(got, (last[0] + last[1]) / 2 - last[2], atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])  # gemma2: logits soft-capped at 3
def test_logit_lens_last_layer_is_the_model(tiny_dirs, family):
    """The lens after the last block gives the model's own top-k tokens and probabilities
    (transformers' logits, soft-cap included); the soft-cap changes probabilities, not the
    argmax, so this compares probabilities."""
    import torch
    from transformers import AutoModelForCausalLM

    m, _, _, ids = _setup(tiny_dirs, family, 1, False, dtype=jnp.float32)
    top_ids, probs = iv.logit_lens(m.params, m.cfg, ids, k=3)
    assert top_ids.shape == (m.cfg.n_layers + 1, len(ids), 3)
    assert (family == "gemma2") == bool(m.cfg.final_softcap)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs(family), torch_dtype=torch.float32)
    with torch.no_grad():
        ref = torch.softmax(hf(torch.tensor([ids])).logits[0].float(), -1).numpy()
    # Probabilities at the lens's tokens, and the top-3 values (robust to near ties' order).
    np.testing.assert_allclose(probs[-1], np.take_along_axis(ref, top_ids[-1], -1), atol=1e-5)
    np.testing.assert_allclose(probs[-1], -np.sort(-ref, -1)[:, :3], atol=1e-5)
    assert (np.diff(probs, axis=-1) <= 0).all()


def test_parsing_and_bad_input():
    e = iv.parse_edit("3:17@5=0")
    assert e == iv.FeatureEdit(3, 17, 5, "set", 0.0, False)
    assert iv.parse_edit("2:4@7+=10") == iv.FeatureEdit(2, 4, 7, "set", 10.0, True)
    assert iv.parse_edit("2:4*2.5") == iv.FeatureEdit(2, 4, None, "scale", 2.5, False)
    assert iv.parse_edit("2:4@all+1").op == "add"
    with pytest.raises(ConfigError, match="cannot parse"):
        iv.parse_edit("layer3 feature 4")
    cfg = tcm.TranscoderConfig(d_model=4, n_layers=3, n_features=8)
    with pytest.raises(ConfigError, match="feature 8 does not exist"):
        iv.FeatureEdit(1, 8, 0).check(cfg)
    with pytest.raises(ConfigError, match="layer 3 out of range"):
        iv.FeatureEdit(3, 0, 0).check(cfg)
    with pytest.raises(ConfigError, match="position 9 out of range"):
        iv.FeatureEdit(0, 0, 9).check(cfg, n_pos=5)
