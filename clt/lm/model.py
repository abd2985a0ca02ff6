"""The forward pass of every supported decoder-only transformer, with typed activation capture.

`forward(params, cfg, tokens, capture=..., frozen=...)` returns logits and a `Capture`: the
activations asked for, stacked over layers. Attention patterns and normalisation scales can be
substituted (`frozen=`), which is how the local replacement model of "Circuit Tracing" (Ameisen et
al., 2025) freezes them. The same layer body serves generation with a KV cache (`forward_cached`).

A block is (Gemma's extra norms marked *):
    h = norm_attn(x);  a = attn(h);  a = post_attn_norm(a)*;  x = x + a        (resid_mid = x)
    h = norm_mlp(x);   m = mlp(h);   m = post_mlp_norm(m)*;   x = x + m
Norm scales are the per-position factors 1/rms(x) (RMSNorm) or 1/std(x) (LayerNorm), so that
norm(x) = (x - mean?) * scale * (w + offset) (+ b).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

from clt.lm.config import ModelConfig
from clt.lm.params import LayerParams, Leaf, LMParams

# Activations stacked over layers, and the two that are not.
LAYER_FIELDS = (
    "resid_pre", "resid_mid", "mlp_in", "mlp_out", "attn_out", "attn_pattern",
    "attn_norm_scale", "post_attn_norm_scale", "mlp_norm_scale", "post_mlp_norm_scale",
    "q_norm_scale", "k_norm_scale",
)
FINAL_FIELDS = ("resid_final", "final_norm_scale")
# What the replacement model may substitute: everything nonlinear that is not an MLP.
FREEZABLE = (
    "attn_pattern", "attn_norm_scale", "post_attn_norm_scale", "mlp_norm_scale",
    "post_mlp_norm_scale", "q_norm_scale", "k_norm_scale", "final_norm_scale",
)
ALL = LAYER_FIELDS + FINAL_FIELDS
# What `forward(frozen=...)` accepts: the above, plus given MLP outputs (the MLP is then not run:
# the replacement model substitutes transcoder reconstruction + error there).
SUBSTITUTABLE = FREEZABLE + ("mlp_out",)


class InputError(ValueError):
    """Bad model input (too long, wrong shape); the message says what to change."""


@jax.tree_util.register_dataclass
@dataclass
class Capture:
    """Activations of one forward pass. Fields not asked for are None.

    Per-layer fields have a leading `layer` axis; `resid_pre[l]` is the residual stream entering
    block l, `resid_mid[l]` the residual before block l's MLP (the transcoder input point),
    `mlp_in[l]` the MLP input after its norm, `mlp_out[l]` / `attn_out[l]` what the MLP / attention
    add to the residual (after Gemma's post-norms). `resid_final` enters the final norm.
    """

    resid_pre: Leaf | None = None  # [layer batch pos d_model]
    resid_mid: Leaf | None = None  # [layer batch pos d_model]
    mlp_in: Leaf | None = None  # [layer batch pos d_model]
    mlp_out: Leaf | None = None  # [layer batch pos d_model]
    attn_out: Leaf | None = None  # [layer batch pos d_model]
    attn_pattern: Leaf | None = None  # [layer batch head qpos kpos]
    attn_norm_scale: Leaf | None = None  # [layer batch pos]
    post_attn_norm_scale: Leaf | None = None  # [layer batch pos]
    mlp_norm_scale: Leaf | None = None  # [layer batch pos]
    post_mlp_norm_scale: Leaf | None = None  # [layer batch pos]
    q_norm_scale: Leaf | None = None  # [layer batch pos head]
    k_norm_scale: Leaf | None = None  # [layer batch pos kv_head]
    resid_final: Leaf | None = None  # [batch pos d_model]
    final_norm_scale: Leaf | None = None  # [batch pos]

    def frozen_part(self) -> Capture:
        """Only the fields `forward(frozen=...)` substitutes (patterns and norm scales)."""
        return Capture(**{f: getattr(self, f) for f in FREEZABLE})

    def asked(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self) if getattr(self, f.name) is not None)


def normalize_capture(capture: Iterable[str] | str) -> tuple[str, ...]:
    names = (capture,) if isinstance(capture, str) else tuple(capture)
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        raise InputError(f"unknown capture field(s) {unknown}; choose from {list(ALL)}")
    return tuple(sorted(set(names)))


# --- building blocks (pure functions) ------------------------------------------------------------
def norm(x, w, b, cfg: ModelConfig, scale=None):
    """Normalise over the last axis in float32 (or float64); returns (output in x's dtype, scale).

    If `scale` is given it replaces the computed 1/rms or 1/std (frozen normalisation). The mean
    subtraction of LayerNorm is linear, so it is always recomputed from x.
    """
    # At least float32 (bf16 inputs), float64 under x64 so reference checks stay exact.
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if cfg.norm == "layernorm":
        x32 = x32 - x32.mean(-1, keepdims=True)
    if scale is None:
        scale = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + cfg.norm_eps)
    y = x32 * scale[..., None] * (w.astype(x32.dtype) + cfg.norm_offset)
    if b is not None:
        y = y + b.astype(x32.dtype)
    return y.astype(x.dtype), scale


def activation(name: str, x):
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.relu(x)


def mlp(lp: LayerParams, cfg: ModelConfig, h: Float[Array, "*b d_model"], edit_hidden=None
        ) -> Float[Array, "*b d_model"]:
    """The MLP of one layer (`lp` holds that layer's weights, no layer axis). `edit_hidden`, if
    given, changes the hidden units [*b, d_mlp] before the down-projection (neuron edits)."""
    up = h @ lp.W_in
    if lp.b_in is not None:
        up = up + lp.b_in
    if cfg.mlp == "gated":
        hidden = activation(cfg.activation, h @ lp.W_gate) * up
    else:
        hidden = activation(cfg.activation, up)
    if edit_hidden is not None:
        hidden = edit_hidden(hidden)
    out = hidden @ lp.W_out
    return out if lp.b_out is None else out + lp.b_out


def rope_inv_freq(cfg: ModelConfig, local: bool) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim/2], with Llama-3 or linear scaling on global layers."""
    theta = cfg.rope_theta_local if (local and cfg.rope_theta_local) else cfg.rope_theta
    dim = cfg.head_dim
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    if local or cfg.rope_scaling == "none":
        return inv.astype(np.float32)
    f = cfg.rope_factor
    if cfg.rope_scaling == "linear":
        return (inv / f).astype(np.float32)
    # Llama-3.1: long wavelengths scaled by 1/f, short kept, a smooth ramp between.
    old = cfg.rope_original_max_position
    low_wl, high_wl = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wl, inv / f, inv)
    smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / f + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope_tables(cfg: ModelConfig, positions, local: bool):
    inv = jnp.asarray(rope_inv_freq(cfg, local))
    ang = positions.astype(jnp.float32)[..., None] * inv  # [b, t, hd/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def _apply_rope(x, cos, sin):
    """Rotate-half (NeoX / Hugging Face) convention; x [b, t, h, hd], cos/sin [b, t, hd]."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rot * sin


def _masks(cfg: ModelConfig, q_idx, k_idx, key_mask):
    """Boolean [b, 1, t, s] masks for full and sliding layers from sequence indices."""
    causal = k_idx[None, :] <= q_idx[:, None]
    full = causal[None, None] & key_mask[:, None, None, :]
    if not cfg.sliding_window:
        return full, full
    inside = (q_idx[:, None] - k_idx[None, :]) < cfg.sliding_window
    return full, full & inside[None, None]


def attn_input(lp: LayerParams, cfg: ModelConfig, x, scale=None):
    """The attention's normalised input (`norm` with the layer's weights); returns (h, scale)."""
    return norm(x, lp.attn_norm_w, lp.attn_norm_b, cfg, scale)


def mlp_input(lp: LayerParams, cfg: ModelConfig, x, scale=None):
    """The MLP's normalised input (`norm` of the residual after attention with the layer's
    weights); returns (h, scale)."""
    return norm(x, lp.mlp_norm_w, lp.mlp_norm_b, cfg, scale)


def attn_values(lp: LayerParams, h: Float[Array, "*b d_model"]
                ) -> Float[Array, "*b kv_head head_dim"]:
    """The attention's values of normalised inputs h."""
    v = jnp.einsum("...d,dhk->...hk", h, lp.W_V)
    return v if lp.b_V is None else v + lp.b_V


def attention(lp: LayerParams, cfg: ModelConfig, h, cos, sin, mask, frozen: dict, caps: dict,
              asked: tuple[str, ...], kv_cache=None, offset=None, value_delta=None):
    """Attention of one layer. Returns (output [b, t, d_model], new kv cache or None).

    `value_delta` [b, t, kv_heads, head_dim], if given, is added to the values: a zero one lets
    a VJP read the gradient at the values (`attribution.trace`'s sweep)."""
    B, T, _ = h.shape
    q = jnp.einsum("btd,dhk->bthk", h, lp.W_Q)
    k = jnp.einsum("btd,dhk->bthk", h, lp.W_K)
    v = attn_values(lp, h)
    if lp.b_Q is not None:
        q, k = q + lp.b_Q, k + lp.b_K
    if value_delta is not None:
        v = v + value_delta.astype(v.dtype)
    if cfg.qk_norm:
        q, qs = norm(q, lp.q_norm_w, None, cfg, frozen.get("q_norm_scale"))
        k, ks = norm(k, lp.k_norm_w, None, cfg, frozen.get("k_norm_scale"))
        caps["q_norm_scale"], caps["k_norm_scale"] = qs, ks
    if cfg.positional == "rope":
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    new_cache = None
    if kv_cache is not None:
        kc, vc = kv_cache
        kc = jax.lax.dynamic_update_slice(kc, k.astype(kc.dtype), (0, offset, 0, 0))
        vc = jax.lax.dynamic_update_slice(vc, v.astype(vc.dtype), (0, offset, 0, 0))
        k, v, new_cache = kc, vc, (kc, vc)
    G = cfg.n_heads // cfg.n_kv_heads
    if "attn_pattern" in frozen:
        pattern = frozen["attn_pattern"].astype(h.dtype)
    else:
        qg = q.reshape(B, T, cfg.n_kv_heads, G, cfg.head_dim)
        scores = jnp.einsum("btngk,bsnk->bngts", qg, k).astype(jnp.float32) * cfg.scale
        scores = scores.reshape(B, cfg.n_heads, T, k.shape[1])
        if cfg.attn_softcap:
            scores = cfg.attn_softcap * jnp.tanh(scores / cfg.attn_softcap)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        pattern = jax.nn.softmax(scores, axis=-1).astype(h.dtype)
    if "attn_pattern" in asked:
        caps["attn_pattern"] = pattern
    pg = pattern.reshape(B, cfg.n_kv_heads, G, T, k.shape[1])
    z = jnp.einsum("bngts,bsnk->btngk", pg, v).reshape(B, T, cfg.n_heads, cfg.head_dim)
    out = jnp.einsum("bthk,hkd->btd", z, lp.W_O)
    if lp.b_O is not None:
        out = out + lp.b_O
    return out, new_cache


def block(lp: LayerParams, cfg: ModelConfig, x, cos, sin, mask, frozen: dict,
          asked: tuple[str, ...], kv_cache=None, offset=None, mlp_fn=None, value_delta=None):
    """One transformer block. Returns (new residual, captures dict, new kv cache).

    `mlp_fn(resid_mid, mlp_in)`, if given, replaces the MLP (and its post-norm): it returns what
    is added to the residual stream. A `frozen["mlp_out"]` replaces both.
    """
    caps: dict = {"resid_pre": x}
    h, s = attn_input(lp, cfg, x, frozen.get("attn_norm_scale"))
    caps["attn_norm_scale"] = s
    a, new_cache = attention(lp, cfg, h, cos, sin, mask, frozen, caps, asked, kv_cache, offset,
                             value_delta)
    if cfg.post_attn_norm:
        a, caps["post_attn_norm_scale"] = norm(a, lp.post_attn_norm_w, None, cfg,
                                               frozen.get("post_attn_norm_scale"))
    caps["attn_out"] = a
    x = x + a
    caps["resid_mid"] = x
    h, caps["mlp_norm_scale"] = mlp_input(lp, cfg, x, frozen.get("mlp_norm_scale"))
    caps["mlp_in"] = h
    if "mlp_out" in frozen:
        m = frozen["mlp_out"].astype(x.dtype)
    elif mlp_fn is not None:
        m = mlp_fn(x, h).astype(x.dtype)
    else:
        m = mlp(lp, cfg, h)
        if cfg.post_mlp_norm:
            m, caps["post_mlp_norm_scale"] = norm(m, lp.post_mlp_norm_w, None, cfg,
                                                  frozen.get("post_mlp_norm_scale"))
    caps["mlp_out"] = m
    return x + m, {k: v for k, v in caps.items() if k in asked}, new_cache


def embed(params: LMParams, cfg: ModelConfig, tokens, positions):
    x = params.embed[tokens]
    if cfg.embed_scale != 1.0:
        # Hugging Face multiplies by the scale cast to the weights' dtype.
        x = x * jnp.asarray(cfg.embed_scale, dtype=x.dtype)
    if params.pos_embed is not None:
        x = x + params.pos_embed[positions]
    return x


def unembed(params: LMParams, cfg: ModelConfig, resid, final_scale=None):
    """Final norm and logits (float32), soft-capped if the config says so."""
    h, scale = norm(resid, params.final_norm_w, params.final_norm_b, cfg, final_scale)
    return logits_of(params, cfg, h), scale


def logits_of(params: LMParams, cfg: ModelConfig, h):
    """Logits (float32) of final-normed hidden states h [..., d_model]: the unembedding, then
    the soft-cap where the config has one. The one place both are applied (`unembed`, the
    frozen-mode interventions, the logit lens)."""
    logits = (h @ params.W_U.astype(h.dtype)).astype(jnp.float32)
    if cfg.final_softcap:
        logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
    return logits


def _run_layers(params, cfg, x, positions, mask_full, mask_slide, frozen, asked, cache, offset,
                n_layers: int | None = None):
    """The blocks in a scan; with `n_layers`, only the first n_layers of them."""
    cos_g, sin_g = _rope_tables(cfg, positions, local=False)
    cos_l, sin_l = _rope_tables(cfg, positions, local=True)
    sliding = jnp.asarray(cfg.sliding_layers)
    layers = params.layers
    if n_layers is not None and n_layers < cfg.n_layers:
        layers = jax.tree.map(lambda a: a[:n_layers], layers)
        sliding = sliding[:n_layers]
    frozen_layers = {k: v for k, v in frozen.items() if k in LAYER_FIELDS}

    def body(x, xs):
        lp, is_sliding, fr, kv = xs
        cos = jnp.where(is_sliding, cos_l, cos_g)
        sin = jnp.where(is_sliding, sin_l, sin_g)
        mask = jnp.where(is_sliding, mask_slide, mask_full)
        x, caps, new_kv = block(lp, cfg, x, cos, sin, mask, fr, asked, kv, offset)
        return x, (caps, new_kv)

    x, (caps, new_cache) = jax.lax.scan(body, x, (layers, sliding, frozen_layers, cache))
    return x, caps, new_cache


def _mlp_added(lp: LayerParams, cfg: ModelConfig, h, edit_hidden=None):
    """The model's own MLP output as added to the residual (after Gemma's post-norm)."""
    m = mlp(lp, cfg, h, edit_hidden)
    if cfg.post_mlp_norm:
        m, _ = norm(m, lp.post_mlp_norm_w, None, cfg)
    return m


@dataclass(frozen=True)
class TrueMLP:
    """The model's own MLP of one layer as added to the residual, for `MLPHook.apply`: called
    on the MLP's normalised input h, or `of_resid(x)` on a residual stream x (the MLP's norm
    applied first, with its frozen scale if any): for hooks that replace the residual stream
    before the MLP, such as a spliced sparse autoencoder."""

    lp: LayerParams
    cfg: ModelConfig
    norm_scale: jax.Array | None = None  # frozen mlp_norm_scale of this layer, if any

    def __call__(self, h, edit_hidden=None):
        return _mlp_added(self.lp, self.cfg, h, edit_hidden)

    def of_resid(self, x):
        h, _ = norm(x, self.lp.mlp_norm_w, self.lp.mlp_norm_b, self.cfg, self.norm_scale)
        return self(h)


def _run_layers_unrolled(params, cfg, x, positions, mask_full, mask_slide, frozen, asked,
                         hook, hook_params):
    """The layers in a Python loop (static layer index), for MLP hooks whose state or weights
    differ per layer in shape, such as a cross-layer transcoder spliced in for the MLPs."""
    cos_g, sin_g = _rope_tables(cfg, positions, local=False)
    cos_l, sin_l = _rope_tables(cfg, positions, local=True)
    state = hook.init(hook_params, x)
    per_layer = []
    for i, is_sliding in enumerate(cfg.sliding_layers):
        lp = jax.tree.map(lambda a, i=i: a[i], params.layers)
        fr = {k: v[i] for k, v in frozen.items() if k in LAYER_FIELDS}
        cos, sin = (cos_l, sin_l) if is_sliding else (cos_g, sin_g)
        mask = mask_slide if is_sliding else mask_full
        box = {}

        def mlp_fn(resid_mid, mlp_in, i=i, lp=lp, box=box, fr=fr):
            out, box["state"] = hook.apply(hook_params, i, resid_mid, mlp_in, state,
                                           TrueMLP(lp, cfg, fr.get("mlp_norm_scale")))
            return out

        x, caps, _ = block(lp, cfg, x, cos, sin, mask, fr, asked, mlp_fn=mlp_fn)
        state = box.get("state", state)
        per_layer.append(caps)
    caps = {k: jnp.stack([c[k] for c in per_layer]) for k in per_layer[0]}
    return x, caps, state


@partial(jax.jit, static_argnames=("cfg", "capture", "hook"))
def _forward(params, cfg, tokens, attention_mask, positions, capture, frozen, input_embeds=None,
             hook=None, hook_params=None):
    B, T = tokens.shape
    idx = jnp.arange(T)
    mask_full, mask_slide = _masks(cfg, idx, idx, attention_mask.astype(bool))
    x = embed(params, cfg, tokens, positions) if input_embeds is None else input_embeds
    if hook is None:
        x, caps, _ = _run_layers(params, cfg, x, positions, mask_full, mask_slide, frozen,
                                 capture, None, None)
    else:
        x, caps, _ = _run_layers_unrolled(params, cfg, x, positions, mask_full, mask_slide,
                                          frozen, capture, hook, hook_params)
    logits, fscale = unembed(params, cfg, x, frozen.get("final_norm_scale"))
    caps = dict(caps)
    if "resid_final" in capture:
        caps["resid_final"] = x
    if "final_norm_scale" in capture:
        caps["final_norm_scale"] = fscale
    return logits, Capture(**caps)


@partial(jax.jit, static_argnames=("cfg", "capture", "n_layers"))
def activations(params: LMParams, cfg: ModelConfig, tokens: Int[ArrayLike, "batch pos"],
                capture: tuple[str, ...], n_layers: int | None = None) -> Capture:
    """The captures of the first `n_layers` blocks (default all) and nothing more: no later
    blocks, no final norm, no unembedding (what transcoder training reads; for SmolLM2 the
    unembedding is a fifth of the forward's FLOPs, for Gemma-3 more than the blocks)."""
    tokens = jnp.asarray(tokens)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), tokens.shape)
    mask_full, mask_slide = _masks(cfg, jnp.arange(T), jnp.arange(T), jnp.ones((B, T), bool))
    capture = normalize_capture(capture)
    bad = [c for c in capture if c not in LAYER_FIELDS]
    if bad:
        raise InputError(f"activations() captures per-layer fields only, not {bad}")
    _, caps, _ = _run_layers(params, cfg, embed(params, cfg, tokens, positions), positions,
                             mask_full, mask_slide, {}, capture, None, None, n_layers)
    return Capture(**caps)


def forward(
    params: LMParams,
    cfg: ModelConfig,
    tokens: Int[ArrayLike, "batch pos"],
    *,
    attention_mask: Shaped[ArrayLike, "batch pos"] | None = None,
    positions: Int[ArrayLike, "batch pos"] | None = None,
    capture: Iterable[str] | str = (),
    frozen: Capture | None = None,
    input_embeds: Float[ArrayLike, "batch pos d_model"] | None = None,
    mlp_hook: MLPHook | None = None,
    hook_params=None,
) -> tuple[Float[Array, "batch pos vocab"], Capture]:
    """Logits and the activations named in `capture` (see `Capture`; `ALL` for everything).

    attention_mask: 1 for real tokens, 0 for padding keys (default all ones).
    positions: position ids (default 0..T-1).
    frozen: a Capture whose attention patterns / norm scales (and MLP outputs, `mlp_out`)
      replace the computed ones; see SUBSTITUTABLE.
    input_embeds: the residual stream entering block 0 (token embedding, scaled, plus learned
      positions), replacing the embedding of `tokens` (whose shape still gives [batch, pos]).
    mlp_hook, hook_params: replace every MLP by `mlp_hook.apply` (see `MLPHook`).
    The compute dtype is the parameters' dtype (see `cast_params`); logits are float32.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise InputError(f"tokens must be [batch, pos], got shape {tokens.shape}")
    T = tokens.shape[1]
    if T > cfg.max_position:
        raise InputError(
            f"sequence of {T} tokens exceeds the model's context of {cfg.max_position}; shorten it")
    if attention_mask is None:
        attention_mask = jnp.ones(tokens.shape, bool)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T), tokens.shape)
    frozen_dict = {}
    if frozen is not None:
        frozen_dict = {k: getattr(frozen, k) for k in SUBSTITUTABLE
                       if getattr(frozen, k) is not None}
    if input_embeds is not None:
        input_embeds = jnp.asarray(input_embeds)
        if input_embeds.shape != tokens.shape + (cfg.d_model,):
            raise InputError(f"input_embeds must be {tokens.shape + (cfg.d_model,)}, got "
                             f"{input_embeds.shape}")
    return _forward(params, cfg, tokens, attention_mask, positions, normalize_capture(capture),
                    frozen_dict, input_embeds, mlp_hook, hook_params)


class MLPHook:
    """Replaces every MLP in `forward(mlp_hook=...)`; layers then run unrolled.

    Subclasses are hashable, immutable descriptions (they are static jit arguments); their
    weights travel separately as `hook_params`. `init(hook_params, x)` gives the initial state
    (e.g. a CLT's pending writes to later layers) and `apply(hook_params, layer, resid_mid,
    mlp_in, state, true_mlp)` returns (what is added to the residual, new state); `true_mlp(h)`
    is the model's own MLP of that layer as added to the residual (after any post-norm), for
    hooks that keep some of it (`TrueMLP`; `true_mlp.of_resid(r)` runs it on a residual r, for
    hooks that replace the residual stream x by r: they return r - x + true_mlp.of_resid(r)).
    """

    def init(self, hook_params, x):
        return jnp.zeros(())

    def apply(self, hook_params, layer: int, resid_mid, mlp_in, state, true_mlp):
        raise NotImplementedError


# --- generation with a KV cache ------------------------------------------------------------------
def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32):
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def forward_cached(params: LMParams, cfg: ModelConfig, tokens, offset, cache, key_mask):
    """Logits for `tokens` [b, t] placed at sequence index `offset`, attending to the cache.

    key_mask [b, cache_len] marks valid (non-padding) cache slots. Returns (logits, new cache).
    """
    B, T = tokens.shape
    S = cache[0].shape[2]
    q_idx = offset + jnp.arange(T)
    mask_full, mask_slide = _masks(cfg, q_idx, jnp.arange(S), key_mask)
    positions = jnp.broadcast_to(q_idx, (B, T))
    x = embed(params, cfg, tokens, positions)
    x, _, new_cache = _run_layers(params, cfg, x, positions, mask_full, mask_slide, {}, (),
                                  cache, offset)
    logits, _ = unembed(params, cfg, x)
    return logits, new_cache
