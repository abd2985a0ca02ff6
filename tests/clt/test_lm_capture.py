"""Captures are consistent with the forward pass; frozen substitution; KV cache; dtype; configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clt.configs import ConfigError
from clt.lm import ALL, ModelConfig, cast_params, forward, forward_cached, init_cache, load_model
from clt.lm.model import InputError, mlp, norm
from tests.clt.hf_tiny import FAMILIES, make_tiny

SEQ = 20


@pytest.fixture(scope="module", params=FAMILIES)
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    make_tiny(request.param, d)
    return load_model(str(d))


def _tokens(seed=0, batch=2):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 128, size=(batch, SEQ)))


def test_residual_stream_adds_up(model):
    _, cap = forward(model.params, model.cfg, _tokens(), capture=ALL)
    L = model.cfg.n_layers
    for layer in range(L):
        nxt = cap.resid_pre[layer + 1] if layer + 1 < L else cap.resid_final
        np.testing.assert_allclose(
            cap.resid_pre[layer] + cap.attn_out[layer] + cap.mlp_out[layer], nxt, atol=1e-5,
            err_msg=f"layer {layer}: resid_pre + attn_out + mlp_out != next residual")
        np.testing.assert_allclose(cap.resid_pre[layer] + cap.attn_out[layer],
                                   cap.resid_mid[layer], atol=1e-5)


def test_mlp_out_is_mlp_of_mlp_in(model):
    cfg, params = model.cfg, model.params
    _, cap = forward(params, cfg, _tokens(), capture=ALL)
    for layer in range(cfg.n_layers):
        lp = jax.tree.map(lambda a, i=layer: a[i], params.layers)
        out = mlp(lp, cfg, cap.mlp_in[layer])
        if cfg.post_mlp_norm:
            out, _ = norm(out, lp.post_mlp_norm_w, None, cfg)
        np.testing.assert_allclose(out, cap.mlp_out[layer], atol=1e-5)
        # mlp_in is the normed resid_mid, with the captured scale
        h, s = norm(cap.resid_mid[layer], lp.mlp_norm_w, lp.mlp_norm_b, cfg)
        np.testing.assert_allclose(h, cap.mlp_in[layer], atol=1e-5)
        np.testing.assert_allclose(s, cap.mlp_norm_scale[layer], rtol=1e-6)


def test_capture_only_what_is_asked(model):
    _, cap = forward(model.params, model.cfg, _tokens(), capture=("resid_mid",))
    assert cap.asked() == ("resid_mid",)
    assert cap.resid_mid.shape == (model.cfg.n_layers, 2, SEQ, model.cfg.d_model)
    with pytest.raises(InputError, match="unknown capture"):
        forward(model.params, model.cfg, _tokens(), capture=("resid_middle",))


def test_frozen_substitution(model):
    cfg, params = model.cfg, model.params
    tokens = _tokens()
    logits, cap = forward(params, cfg, tokens, capture=ALL)
    same, _ = forward(params, cfg, tokens, frozen=cap.frozen_part())
    np.testing.assert_allclose(same, logits, atol=1e-5)
    # Substituted values are used: halving the final norm scale changes the logits, and a
    # uniform causal pattern changes them too.
    half = cap.frozen_part()
    half.final_norm_scale = cap.final_norm_scale * 0.5
    changed, _ = forward(params, cfg, tokens, frozen=half)
    assert np.abs(np.asarray(changed - logits)).max() > 1e-3
    uniform = np.tril(np.ones((SEQ, SEQ), np.float32))
    uniform /= uniform.sum(-1, keepdims=True)
    pat = jnp.broadcast_to(uniform, cap.attn_pattern.shape)
    u_logits, u_cap = forward(params, cfg, tokens, frozen=type(cap)(attn_pattern=pat),
                              capture=("attn_pattern",))
    np.testing.assert_allclose(u_cap.attn_pattern, pat)
    assert np.abs(np.asarray(u_logits - logits)).max() > 1e-3


def test_frozen_model_is_linear_in_embeddings(model):
    """With patterns and every norm scale frozen, attention and norms are linear maps: the
    residual before the first MLP is linear in the token embeddings (the replacement model needs
    exactly this)."""
    cfg, params = model.cfg, model.params
    tokens = _tokens(batch=1)
    _, cap = forward(params, cfg, tokens, capture=ALL)
    frozen = cap.frozen_part()

    def first_resid_mid(embed):
        p = params.__class__(**{**params.__dict__, "embed": embed})
        _, c = forward(p, cfg, tokens, frozen=frozen, capture=("resid_mid",))
        return c.resid_mid[0]

    e = params.embed
    d = jax.random.normal(jax.random.key(0), e.shape) * 0.1
    lhs = first_resid_mid(e + 2.0 * d) - first_resid_mid(e)
    rhs = 2.0 * (first_resid_mid(e + d) - first_resid_mid(e))
    np.testing.assert_allclose(lhs, rhs, atol=1e-4)


def test_kv_cache_matches_full_forward(model):
    cfg, params = model.cfg, model.params
    tokens = _tokens(batch=1)
    full, _ = forward(params, cfg, tokens)
    cache = init_cache(cfg, 1, 32)
    mask = jnp.ones((1, 32), bool)
    first, cache = forward_cached(params, cfg, tokens[:, :7], 0, cache, mask)
    steps = [first]
    for t in range(7, SEQ):
        lg, cache = forward_cached(params, cfg, tokens[:, t:t + 1], t, cache, mask)
        steps.append(lg)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4)


def test_bfloat16_close_to_float32(model):
    tokens = _tokens()
    f32, _ = forward(model.params, model.cfg, tokens)
    b16, cap = forward(cast_params(model.params, jnp.bfloat16), model.cfg, tokens,
                       capture=("resid_mid",))
    assert cap.resid_mid.dtype == jnp.bfloat16 and b16.dtype == jnp.float32
    rel = np.abs(np.asarray(b16 - f32)).max() / np.abs(np.asarray(f32)).max()
    assert rel < 0.1, f"bf16 logits differ by {rel:.3f} of the logit range"


def test_prompt_longer_than_context(model):
    too_long = jnp.zeros((1, model.cfg.max_position + 1), jnp.int32)
    with pytest.raises(InputError, match="exceeds the model's context"):
        forward(model.params, model.cfg, too_long)


def test_config_json_roundtrip(model):
    assert ModelConfig.from_json(model.cfg.to_json()) == model.cfg
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        ModelConfig.from_json('{"vocab_size": 3, "bogus": 1}')
    with pytest.raises(ConfigError, match="must be a multiple"):
        model.cfg.replace(n_kv_heads=3)


def test_substituted_mlp_out_and_input_embeds_reproduce_logits(model):
    """Given MLP outputs and the embedded input, the forward pass is the same function: the
    replacement model of stage 2 relies on both substitutions."""
    from clt.lm import Capture

    tokens = _tokens(4)
    logits, cap = forward(model.params, model.cfg, tokens, capture=ALL)
    got, _ = forward(model.params, model.cfg, tokens, frozen=Capture(mlp_out=cap.mlp_out),
                     input_embeds=cap.resid_pre[0])
    np.testing.assert_allclose(got, logits, atol=1e-4)
    # A different MLP output changes the logits (the substitution is not ignored).
    other, _ = forward(model.params, model.cfg, tokens, frozen=Capture(mlp_out=cap.mlp_out * 0))
    assert float(jnp.abs(other - logits).max()) > 1e-3


def test_mlp_hook_unrolled_matches_scan(model):
    """An MLP hook that returns the model's own MLP output reproduces the scanned forward."""
    from clt.lm import MLPHook

    tokens = _tokens(5)
    logits, cap = forward(model.params, model.cfg, tokens, capture=("mlp_out", "resid_mid"))

    class Own(MLPHook):
        def apply(self, hook_params, layer, resid_mid, mlp_in, state, true_mlp):
            return hook_params[layer], state + 1

    got, cap2 = forward(model.params, model.cfg, tokens, capture=("resid_mid",), mlp_hook=Own(),
                        hook_params=cap.mlp_out)
    np.testing.assert_allclose(got, logits, atol=1e-4)
    np.testing.assert_allclose(cap2.resid_mid, cap.resid_mid, atol=1e-4)


def test_mlp_hook_true_mlp_is_the_added_mlp_output(model):
    """`true_mlp` given to hooks is the MLP output as added to the residual (Gemma post-norm
    included): a hook returning it reproduces the model."""
    from clt.lm import MLPHook

    tokens = _tokens(6)
    logits, _ = forward(model.params, model.cfg, tokens)

    class Own(MLPHook):
        def apply(self, hook_params, layer, resid_mid, mlp_in, state, true_mlp):
            return true_mlp(mlp_in), state

    got, _ = forward(model.params, model.cfg, tokens, mlp_hook=Own())
    np.testing.assert_allclose(got, logits, atol=1e-4)
