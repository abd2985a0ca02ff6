"""Neuron graphs: the model's own MLP neurons as the graph's features, no transcoder needed
(`cltrace trace PROMPT --neurons`; the paper's "neurons vs features" baseline).

Each MLP is linearised at the prompt, as attention patterns and norm scales are: the nonlinear
factor of every hidden unit is frozen at its value, so the unit's activation is linear in the
MLP's (normalised) input, and the MLP's output is the sum of its units' writes. The rule for each
family (`neuron_factors`):

* gated (SwiGLU, GeGLU: Llama, Qwen, Gemma): h_i = act(g_i) * u_i with g = W_gate n, u = W_in n
  (+ b_in). The gate act(g_i) is frozen: h_i = act(g_i) * (W_in n + b_in)_i, linear in n.
* non-gated (GELU: GPT-2): h_i = act(z_i), z = W_in n + b_in. The ratio r_i = act(z_i) / z_i is
  frozen (act'(0) where z_i = 0): h_i = r_i * (W_in n + b_in)_i.
* a norm after the MLP (Gemma's post-MLP RMSNorm, its scale s_p frozen) multiplies every unit's
  write at position p by s_p: the node's activation is s_p * h_i, its decoder row W_out[i] * w
  (w: that norm's weight, offset included).

So a neuron node (layer l, position p, unit i) has activation a = s_p h_i, reads the MLP input
n (`TranscoderConfig.input_point = "mlp_in"`) through the vector s_p * f_i * W_in[:, i] (f_i its
frozen factor: the tracer's target vector) and writes a * dec_i into layer l's MLP slot only (a
per-layer transcoder whose decoder is W_out). Biases (b_in's share and b_out) are constants, as
a transcoder's biases are. The replacement model is exact by construction: the MLP slot holds
every unit's write plus the bias.

Which units are nodes: all non-zero units are too many (d_mlp per layer and position), so the
`top_k` units of each layer and position with the largest writes |a| * |dec_i| are nodes, and
the rest of that MLP's output (the other units and the bias) is folded into that layer and
position's error node, which a neuron graph names "other neurons": the graph stays exact, and
with every unit kept (`top_k` = 0) the error nodes hold only the bias and float rounding, so the
completeness score is 1 up to them.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from clt.lm.config import ModelConfig
from clt.lm.model import activation
from clt.lm.params import LMParams
from clt.transcoder import TranscoderConfig, TranscoderParams

_ACT_AT_ZERO = {"gelu": 0.5, "gelu_tanh": 0.5, "silu": 0.5, "relu": 0.0}  # act(z)/z as z -> 0


def _decoder_rows(params: LMParams, cfg: ModelConfig) -> Float[Array, "layer d_mlp d_model"]:
    W = params.layers.W_out
    if cfg.post_mlp_norm:
        W = W * (params.layers.post_mlp_norm_w + cfg.norm_offset)[:, None, :]
    return W


def neuron_transcoder(params: LMParams, cfg: ModelConfig
                      ) -> tuple[TranscoderConfig, TranscoderParams]:
    """The MLP neurons as a per-layer transcoder reading the MLP input: W_enc = W_in (each
    node's vector is then scaled by its frozen factor: `neuron_factors`), W_dec = W_out (times a
    post-MLP norm's weight), no bias (it is folded into the error nodes)."""
    L, D, M = cfg.n_layers, cfg.d_model, cfg.d_mlp
    tc_cfg = TranscoderConfig(d_model=D, n_layers=L, n_features=M, max_reach=1,
                              activation="relu", input_point="mlp_in",
                              model_name=f"{cfg.name} MLP neurons")
    dec = _decoder_rows(params, cfg)
    tc_params = TranscoderParams(
        W_enc=params.layers.W_in, b_enc=jnp.zeros((L, M), dec.dtype),
        log_threshold=jnp.zeros((L, M), jnp.float32),
        W_dec=tuple(dec[s][:, None, :] for s in range(L)), b_dec=jnp.zeros((L, D), dec.dtype))
    return tc_cfg, tc_params


@partial(jax.jit, static_argnames=("cfg",))
def neuron_factors(params: LMParams, cfg: ModelConfig,
                   mlp_in: Float[Array, "layer pos d_model"],
                   post_scale: Float[Array, "layer pos"] | None):
    """(activations a [pos, layer, d_mlp], factors [pos, layer, d_mlp]) of every unit on the
    prompt: a = s_p h_i, and a unit's gradient with respect to the MLP input is
    factor * W_in[:, i] (module docstring)."""
    lp = params.layers
    up = jnp.einsum("lpd,ldm->lpm", mlp_in, lp.W_in)
    if lp.b_in is not None:
        up = up + lp.b_in[:, None, :]
    if cfg.mlp == "gated":
        factor = activation(cfg.activation, jnp.einsum("lpd,ldm->lpm", mlp_in, lp.W_gate))
        hidden = factor * up
    else:
        hidden = activation(cfg.activation, up)
        at_zero = _ACT_AT_ZERO.get(cfg.activation, 0.0)
        safe = jnp.where(up == 0, 1.0, up)
        factor = jnp.where(up == 0, at_zero, hidden / safe)
    if post_scale is not None:
        hidden = hidden * post_scale[..., None]
        factor = factor * post_scale[..., None]
    return jnp.swapaxes(hidden, 0, 1), jnp.swapaxes(factor, 0, 1)


def select(acts: Float[Array, "pos layer d_mlp"], dec_norms: Float[Array, "layer d_mlp"],
           top_k: int) -> Float[Array, "pos layer d_mlp"]:
    """The activations of the node units (the `top_k` largest writes |a| |dec| of each layer and
    position; every non-zero unit when top_k is 0 or at least d_mlp), the others zero."""
    if top_k <= 0 or top_k >= acts.shape[-1]:
        return acts
    size = jnp.abs(acts) * dec_norms[None]
    kth = jax.lax.top_k(size, top_k)[0][..., -1:]
    return jnp.where(size >= kth, acts, 0.0)


def build_acts(params: LMParams, cfg: ModelConfig, cap, top_k: int):
    """(node activations [pos, layer, d_mlp], factors, recon [layer, pos, d_model]) from a
    forward capture holding mlp_in (and post_mlp_norm_scale when the model has that norm)."""
    mlp_in = cap.mlp_in[:, 0]
    post = cap.post_mlp_norm_scale[:, 0] if cfg.post_mlp_norm else None
    acts, factors = neuron_factors(params, cfg, mlp_in, post)
    dec = _decoder_rows(params, cfg)
    chosen = select(acts, jnp.linalg.norm(dec, axis=-1), top_k)
    recon = jnp.einsum("plm,lmd->lpd", chosen, dec)
    return chosen, factors, recon


def is_neuron_config(tc_cfg: TranscoderConfig) -> bool:
    return tc_cfg.model_name.endswith(" MLP neurons")


__all__ = ["build_acts", "is_neuron_config", "neuron_factors", "neuron_transcoder", "select"]

