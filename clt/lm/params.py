"""Parameter pytrees of the language model, stacked over layers, and their assembly from tensors.

Loaders (Hugging Face safetensors, GGUF) translate their own tensor names into the canonical names
below, in PyTorch's linear layout `[out, in]`; `assemble` checks every shape against the config and
builds the einsum-friendly, layer-stacked layout the forward pass uses. One assembly path means the
two loaders cannot drift apart.

Canonical names (per layer: prefix `layers.{i}.`):
  embed [vocab, d_model], pos_embed [max_position, d_model], final_norm_w/_b [d_model],
  unembed [vocab, d_model];
  attn_norm_w/_b, q/k/v [heads*head_dim, d_model], q_bias/k_bias/v_bias, o [d_model, heads*head_dim],
  o_bias, q_norm_w/k_norm_w [head_dim], post_attn_norm_w, mlp_norm_w/_b, gate/up [d_mlp, d_model],
  down [d_model, d_mlp], up_bias, down_bias, post_mlp_norm_w.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from clt.lm.config import ModelConfig

# Pytree leaves: jax Arrays, or placeholders such as ShapeDtypeStruct / PartitionSpec when the
# same container carries shapes or shardings, so fields are not type-checked as Array.
Leaf = Any
# PARAMS_NOTE: the parameter pytrees' fields carry jaxtyping shapes for readers and static
# checkers, but `typing.no_type_check` keeps the run-time checker (jaxtyping + beartype under
# pytest) off their fields: the same containers also hold ShapeDtypeStructs (eval_shape),
# PartitionSpecs (shardings), numpy arrays and None, and a checked __init__ rejects every one of
# them. Shapes are checked where parameters are used (jaxtyped function signatures,
# `clt.transcoder.check_params`, `WeightsError`).


class WeightsError(ValueError):
    """Weights missing or of the wrong shape for the config."""


@typing.no_type_check  # see PARAMS_NOTE
@jax.tree_util.register_dataclass
@dataclass
class LayerParams:
    """Weights of all blocks, each with a leading `layer` axis. Optional entries are None."""

    attn_norm_w: Float[Array, "layer d_model"]
    W_Q: Float[Array, "layer d_model head head_dim"]
    W_K: Float[Array, "layer d_model kv_head head_dim"]
    W_V: Float[Array, "layer d_model kv_head head_dim"]
    W_O: Float[Array, "layer head head_dim d_model"]
    mlp_norm_w: Float[Array, "layer d_model"]
    W_in: Float[Array, "layer d_model d_mlp"]
    W_out: Float[Array, "layer d_mlp d_model"]
    attn_norm_b: Float[Array, "layer d_model"] | None = None
    b_Q: Float[Array, "layer head head_dim"] | None = None
    b_K: Float[Array, "layer kv_head head_dim"] | None = None
    b_V: Float[Array, "layer kv_head head_dim"] | None = None
    b_O: Float[Array, "layer d_model"] | None = None
    q_norm_w: Float[Array, "layer head_dim"] | None = None
    k_norm_w: Float[Array, "layer head_dim"] | None = None
    post_attn_norm_w: Float[Array, "layer d_model"] | None = None
    mlp_norm_b: Float[Array, "layer d_model"] | None = None
    W_gate: Float[Array, "layer d_model d_mlp"] | None = None
    b_in: Float[Array, "layer d_mlp"] | None = None
    b_out: Float[Array, "layer d_model"] | None = None
    post_mlp_norm_w: Float[Array, "layer d_model"] | None = None


@typing.no_type_check  # see PARAMS_NOTE
@jax.tree_util.register_dataclass
@dataclass
class LMParams:
    embed: Float[Array, "vocab d_model"]
    layers: LayerParams
    final_norm_w: Float[Array, " d_model"]
    final_norm_b: Float[Array, " d_model"] | None = None
    pos_embed: Float[Array, "pos d_model"] | None = None
    unembed: Float[Array, "d_model vocab"] | None = None  # None: tied to embed

    @property
    def W_U(self) -> Float[Array, "d_model vocab"]:
        return self.embed.T if self.unembed is None else self.unembed


def cast_params(params: LMParams, dtype) -> LMParams:
    return jax.tree.map(lambda a: a.astype(dtype), params)


def assemble(cfg: ModelConfig, get: Callable[[str], Any], source: str) -> LMParams:
    """Build LMParams from canonical tensors. `get(name)` returns the array or None if absent."""
    H, KV, K, D, M = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_mlp

    def need(name: str, shape: tuple[int, ...]) -> np.ndarray | jax.Array:
        a = get(name)
        if a is None:
            raise WeightsError(f"{source}: tensor '{name}' is missing for this architecture")
        return _check(a, shape, name)

    def maybe(name: str, shape: tuple[int, ...], wanted: bool) -> np.ndarray | jax.Array | None:
        if not wanted:
            return None
        return need(name, shape)

    def _check(a, shape, name):
        if isinstance(a, np.ndarray):
            a = a.astype(np.float32, copy=False)
        if tuple(a.shape) != shape:
            raise WeightsError(f"{source}: tensor '{name}' has shape {a.shape}, config expects {shape}")
        return a

    ln = cfg.norm == "layernorm"
    per_layer: list[dict[str, np.ndarray | None]] = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        lay = {
            "attn_norm_w": need(p + "attn_norm_w", (D,)),
            "attn_norm_b": maybe(p + "attn_norm_b", (D,), ln),
            "W_Q": need(p + "q", (H * K, D)).T.reshape(D, H, K),
            "W_K": need(p + "k", (KV * K, D)).T.reshape(D, KV, K),
            "W_V": need(p + "v", (KV * K, D)).T.reshape(D, KV, K),
            "W_O": need(p + "o", (D, H * K)).T.reshape(H, K, D),
            "b_Q": _opt_reshape(maybe(p + "q_bias", (H * K,), cfg.qkv_bias), (H, K)),
            "b_K": _opt_reshape(maybe(p + "k_bias", (KV * K,), cfg.qkv_bias), (KV, K)),
            "b_V": _opt_reshape(maybe(p + "v_bias", (KV * K,), cfg.qkv_bias), (KV, K)),
            "b_O": maybe(p + "o_bias", (D,), cfg.out_bias),
            "q_norm_w": maybe(p + "q_norm_w", (K,), cfg.qk_norm),
            "k_norm_w": maybe(p + "k_norm_w", (K,), cfg.qk_norm),
            "post_attn_norm_w": maybe(p + "post_attn_norm_w", (D,), cfg.post_attn_norm),
            "mlp_norm_w": need(p + "mlp_norm_w", (D,)),
            "mlp_norm_b": maybe(p + "mlp_norm_b", (D,), ln),
            "W_gate": _opt_t(maybe(p + "gate", (M, D), cfg.mlp == "gated")),
            "W_in": need(p + "up", (M, D)).T,
            "W_out": need(p + "down", (D, M)).T,
            "b_in": maybe(p + "up_bias", (M,), cfg.mlp_bias),
            "b_out": maybe(p + "down_bias", (D,), cfg.mlp_bias),
            "post_mlp_norm_w": maybe(p + "post_mlp_norm_w", (D,), cfg.post_mlp_norm),
        }
        per_layer.append(lay)
    stacked = {
        k: (None if per_layer[0][k] is None else jnp.stack([lay[k] for lay in per_layer]))
        for k in per_layer[0]
    }
    unembed = None
    if not cfg.tie_embeddings:
        unembed = jnp.asarray(need("unembed", (cfg.vocab_size, D)).T)
    return LMParams(
        embed=jnp.asarray(need("embed", (cfg.vocab_size, D))),
        layers=LayerParams(**stacked),
        final_norm_w=jnp.asarray(need("final_norm_w", (D,))),
        final_norm_b=_opt_jnp(maybe("final_norm_b", (D,), ln)),
        pos_embed=_opt_jnp(maybe("pos_embed", (cfg.max_position, D), cfg.positional == "learned")),
        unembed=unembed,
    )


def flatten_params(params: LMParams) -> dict[str, np.ndarray]:
    """Every array of `params` by name (`embed`, `layers.W_Q`, ...; None entries left out):
    what `unflatten_params` reads back."""
    out = {}
    for f in dataclasses.fields(params):
        v = getattr(params, f.name)
        if f.name == "layers":
            out.update({f"layers.{g.name}": np.asarray(getattr(v, g.name))
                        for g in dataclasses.fields(v) if getattr(v, g.name) is not None})
        elif v is not None:
            out[f.name] = np.asarray(v)
    return out


def unflatten_params(flat: dict[str, np.ndarray]) -> LMParams:
    """LMParams (jax arrays) from `flatten_params`'s names; unknown names are refused."""
    known = ({f.name for f in dataclasses.fields(LMParams)} - {"layers"}) | {
        f"layers.{g.name}" for g in dataclasses.fields(LayerParams)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise WeightsError(f"unknown parameter names {unknown[:5]}")
    from clt.io import to_device  # (each a copy, no program lowered)

    layers = LayerParams(**{k.removeprefix("layers."): to_device(v)
                            for k, v in flat.items() if k.startswith("layers.")})
    return LMParams(layers=layers, **{k: to_device(v) for k, v in flat.items()
                                      if not k.startswith("layers.")})


def _opt_reshape(a, shape):
    return None if a is None else a.reshape(shape)


def _opt_t(a):
    return None if a is None else a.T


def _opt_jnp(a):
    return None if a is None else jnp.asarray(a)


def random_params(cfg: ModelConfig, key: jax.Array, scale: float = 0.02) -> LMParams:
    """Random weights with the config's shapes (benchmarks and shape tests; not a trained model)."""
    leaves, treedef = jax.tree.flatten(param_shapes(cfg))
    keys = jax.random.split(key, len(leaves))
    out = [scale * jax.random.normal(k, s.shape, jnp.float32) for k, s in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, out)


def param_shapes(cfg: ModelConfig) -> LMParams:
    """LMParams of jax.ShapeDtypeStruct for `cfg`, computed without allocating any weights."""
    return jax.eval_shape(lambda: assemble(cfg, _zeros_getter(cfg), "shapes"))


def _zeros_getter(cfg: ModelConfig):
    H, KV, K, D, M = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model, cfg.d_mlp
    shapes = {"q": (H * K, D), "k": (KV * K, D), "v": (KV * K, D), "o": (D, H * K),
              "q_bias": (H * K,), "k_bias": (KV * K,), "v_bias": (KV * K,), "q_norm_w": (K,),
              "k_norm_w": (K,), "gate": (M, D), "up": (M, D), "down": (D, M), "up_bias": (M,),
              "embed": (cfg.vocab_size, D), "unembed": (cfg.vocab_size, D),
              "pos_embed": (cfg.max_position, D)}

    def get(name: str):
        short = name.rsplit(".", 1)[-1]
        return jnp.zeros(shapes.get(short, (D,)), jnp.float32)

    return get


def param_count(params: LMParams) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


__all__ = [
    "LMParams",
    "LayerParams",
    "WeightsError",
    "assemble",
    "cast_params",
    "param_count",
    "param_shapes",
    "random_params",
]
