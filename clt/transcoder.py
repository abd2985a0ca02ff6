"""Cross-layer transcoders (CLT), per-layer transcoders (PLT) and their activation functions.

A transcoder with `n_features` features per layer reads, at every layer s, the model's activation
at its input point (the residual stream before layer s's MLP, or the MLP's normalised input) and
writes the MLP outputs. In a CLT ("Circuit Tracing", Ameisen et al. 2025) features of layer s
write, through one decoder per target layer, the MLP outputs of layers s..L-1; the decoders are
ragged: `W_dec[s]` has shape `[n_features, n_targets(s), d_model]` with `n_targets(s) = L - s`. A
PLT is the same code with `max_reach = 1` (each layer writes only its own MLP output); a windowed
CLT reaches the next `max_reach` layers. An optional linear skip `W_skip` maps each layer's input
straight to its output.

Everything here is a pure function of (`TranscoderParams`, inputs). Parameters act on raw model
activations; training works in a normalised space and folds the constants in (`fold_norms`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import typing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from clt.configs import ConfigError, doc, from_dict, to_dict

Activation = Literal["jumprelu", "relu", "topk", "batchtopk"]
InputPoint = Literal["resid_mid", "mlp_in"]
OutputPoint = Literal["mlp_out", "resid_mid"]


@dataclass(frozen=True)
class TranscoderConfig:
    """Architecture of a transcoder; saved as `config.json` beside every checkpoint."""

    d_model: int = doc("Width of the model's residual stream (input and output width); 0 in a "
                       "training config: the model's (`for_model`).", default=0)
    n_layers: int = doc("Number of layers of dictionaries: the model's layers (all of them), or "
                        "an SAE's `layers` when it covers only some; 0 in a training config: "
                        "the model's.", default=0)
    n_features: int = doc("Features per layer.", default=2048)
    max_reach: int | None = doc(
        "How many layers a feature writes to, starting at its own: 1 is a per-layer transcoder "
        "(PLT), None a full cross-layer transcoder (CLT), k a windowed CLT.", default=None)
    activation: Activation = doc(
        "jumprelu (learned per-feature threshold, straight-through gradients), relu, topk (k "
        "largest per token and layer) or batchtopk (k per token on average over a batch; a "
        "threshold estimated in training replaces it at inference).", default="jumprelu")
    k: int = doc("Active features per token and layer for topk / batchtopk.", default=64)
    skip: bool = doc("Add a linear skip connection W_skip from each layer's input to its output.",
                     default=False)
    input_point: InputPoint = doc(
        "Where features read: 'resid_mid' (residual stream before the MLP's norm) or 'mlp_in' "
        "(the MLP's normalised input).", default="resid_mid")
    output_point: OutputPoint = doc(
        "What the decoders reconstruct: 'mlp_out' (the MLP output as added to the residual "
        "stream: a transcoder) or 'resid_mid' (the residual stream the features read: a sparse "
        "autoencoder, input point = output point).", default="mlp_out")
    model_name: str = doc("The model this transcoder was trained on (informational).",
                          default="")
    layers: tuple[int, ...] = doc(
        "The model layers an SAE's dictionaries cover, increasing: dictionary l reads and "
        "rebuilds the residual stream before model layer layers[l]'s MLP. Empty: every layer, "
        "dictionary l at model layer l (a transcoder always).", default=())
    schema_version: int = doc("Version of this config's JSON layout.", default=1)

    def __post_init__(self):
        for name in ("n_features", "k"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TranscoderConfig.{name} must be positive, "
                                  f"got {getattr(self, name)}")
        if self.d_model < 0 or self.n_layers < 0 or (self.d_model == 0) != (self.n_layers == 0):
            raise ConfigError("TranscoderConfig.d_model and n_layers must both be positive (or "
                              f"both 0: the model's), got {self.d_model} and {self.n_layers}")
        if self.max_reach is not None and self.max_reach <= 0:
            raise ConfigError(f"TranscoderConfig.max_reach must be positive or None, "
                              f"got {self.max_reach}")
        if self.activation in ("topk", "batchtopk") and self.k > self.n_features:
            raise ConfigError(f"k={self.k} exceeds n_features={self.n_features}")
        if self.output_point != "mlp_out":
            # A sparse autoencoder: one dictionary per layer reconstructing what it reads.
            if self.input_point != self.output_point:
                raise ConfigError(
                    f"an SAE reconstructs what it reads: input_point must equal output_point "
                    f"({self.output_point!r}), got input_point={self.input_point!r}")
            if self.max_reach != 1 or self.skip:
                raise ConfigError(
                    "an SAE (output_point == input_point) has one dictionary per layer and no "
                    f"skip: max_reach must be 1 and skip false, got max_reach={self.max_reach}, "
                    f"skip={self.skip}")
        if not isinstance(self.layers, tuple):
            raise ConfigError(f"TranscoderConfig.layers must be a tuple of model layer indices, "
                              f"got {self.layers!r}")
        if self.layers:
            check_layers("TranscoderConfig.layers", self.layers)
            if not self.is_sae:
                raise ConfigError("TranscoderConfig.layers is for an SAE (output_point == "
                                  "input_point); a transcoder covers every layer")
            if self.n_layers not in (0, len(self.layers)):
                raise ConfigError(f"TranscoderConfig.n_layers must be len(layers) = "
                                  f"{len(self.layers)} (one dictionary per layer listed), got "
                                  f"{self.n_layers}")

    @property
    def is_sae(self) -> bool:
        """A sparse autoencoder: the decoders reconstruct the activation the features read (the
        residual stream), so splicing it in replaces that activation, not an MLP."""
        return self.output_point == self.input_point

    @property
    def kind(self) -> str:
        return "sae" if self.is_sae else "plt" if self.max_reach == 1 else "clt"

    def for_model(self, model_cfg) -> TranscoderConfig:
        """This architecture on `model_cfg`'s model: its width, depth (or the number of its
        `layers`) and name."""
        return dataclasses.replace(self, d_model=model_cfg.d_model,
                                   n_layers=len(self.layers) or model_cfg.n_layers,
                                   model_name=model_cfg.name)

    # The map between dictionary indices (the params' layer axis) and model layers lives here
    # and only here: `model_layers` one way, `layer_index` the other.
    @property
    def model_layers(self) -> tuple[int, ...]:
        """The model layer of every dictionary: model_layers[l] is where dictionary l reads
        (and, for an SAE, rebuilds)."""
        return self.layers or tuple(range(self.n_layers))

    def layer_index(self, layer: int) -> int:
        """The dictionary index of model layer `layer`; a one-line ConfigError when no
        dictionary covers it."""
        if not self.layers:
            if not 0 <= layer < self.n_layers:
                raise ConfigError(f"layer {layer} out of range: the transcoder has layers "
                                  f"0..{self.n_layers - 1}")
            return layer
        if layer not in self.layers:
            raise ConfigError(f"layer {layer} is not covered: this SAE has dictionaries at "
                              f"model layers {', '.join(map(str, self.layers))} only")
        return self.layers.index(layer)

    def read(self, resid_mid, mlp_in):
        """What the features read, of the two activations they may read (`input_point`): the
        one place that choice is made."""
        return resid_mid if self.input_point == "resid_mid" else mlp_in

    def n_targets(self, s: int) -> int:
        """Number of layers written by the features of layer s."""
        rest = self.n_layers - s
        return rest if self.max_reach is None else min(rest, self.max_reach)

    def sources(self, t: int) -> range:
        """Source layers whose features write to layer t."""
        lo = 0 if self.max_reach is None else max(0, t - self.max_reach + 1)
        return range(lo, t + 1)

    @property
    def n_params(self) -> int:
        F, D, L = self.n_features, self.d_model, self.n_layers
        dec = sum(self.n_targets(s) for s in range(L)) * F * D
        return L * (D * F + 2 * F + D) + dec + (L * D * D if self.skip else 0)

    def to_json(self) -> str:
        return json.dumps({"kind": "transcoder", "config": to_dict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> TranscoderConfig:
        payload = json.loads(text)
        if payload.get("kind") != "transcoder":
            raise ConfigError(f"not a transcoder config (kind={payload.get('kind')!r})")
        return from_dict(cls, payload["config"])

    def replace(self, **changes) -> TranscoderConfig:
        return dataclasses.replace(self, **changes)


@typing.no_type_check  # shapes for readers; not checked at run time: see clt.lm.params PARAMS_NOTE
@jax.tree_util.register_dataclass
@dataclass
class TranscoderParams:
    """Transcoder weights acting on raw model activations (the field's names: circuit-tracer).

    `threshold` is the JumpReLU threshold (also used by batchtopk at inference); it is stored as a
    logarithm in training (`log_threshold`) so that it stays positive.
    """

    W_enc: Float[Array, "layer d_model feature"]
    b_enc: Float[Array, "layer feature"]
    log_threshold: Float[Array, "layer feature"]  # float32
    W_dec: tuple[Float[Array, "feature target d_model"], ...]  # source layer s: n_targets(s)
    b_dec: Float[Array, "layer d_model"]  # bias of each target layer's reconstruction
    W_skip: Float[Array, "layer d_model d_model"] | None = None

    @property
    def threshold(self) -> Float[Array, "layer feature"]:
        return jnp.exp(self.log_threshold)


@typing.no_type_check  # as TranscoderParams
@jax.tree_util.register_dataclass
@dataclass
class Norms:
    """Per-layer normalisation constants estimated from data: x_norm = (x - mean) / scale."""

    in_mean: Float[Array, "layer d_model"]
    in_scale: Float[Array, " layer"]
    out_mean: Float[Array, "layer d_model"]
    out_scale: Float[Array, " layer"]

    @staticmethod
    def identity(n_layers: int, d_model: int) -> Norms:
        z, o = jnp.zeros((n_layers, d_model)), jnp.ones((n_layers,))
        return Norms(z, o, z, o)


def init_params(cfg: TranscoderConfig, key: jax.Array, threshold: float = 0.03,
                dtype=jnp.float32) -> TranscoderParams:
    """Initialisation of "Circuit Tracing": W_enc ~ U(±1/sqrt(n_features)), W_dec ~
    U(±1/sqrt(n_layers * d_model)), zero biases, JumpReLU threshold `threshold` (0.03 there)."""
    F, D, L = cfg.n_features, cfg.d_model, cfg.n_layers
    k_enc, *k_dec = jax.random.split(key, L + 1)
    b_enc_bound, dec_bound = 1 / np.sqrt(F), 1 / np.sqrt(L * D)
    W_enc = jax.random.uniform(k_enc, (L, D, F), dtype, -b_enc_bound, b_enc_bound)
    W_dec = tuple(jax.random.uniform(k_dec[s], (F, cfg.n_targets(s), D), dtype, -dec_bound,
                                     dec_bound) for s in range(L))
    return TranscoderParams(
        W_enc=W_enc, b_enc=jnp.zeros((L, F), dtype),
        log_threshold=jnp.full((L, F), np.log(threshold), jnp.float32),
        W_dec=W_dec, b_dec=jnp.zeros((L, D), dtype),
        W_skip=jnp.zeros((L, D, D), dtype) if cfg.skip else None)


def param_shapes(cfg: TranscoderConfig) -> TranscoderParams:
    """TranscoderParams of ShapeDtypeStruct, without allocating (shape checks, sharding specs)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def check_params(cfg: TranscoderConfig, params: TranscoderParams, source: str = "transcoder"):
    """Raise ConfigError naming the first tensor whose shape disagrees with the config."""
    want = param_shapes(cfg)
    for path, w, g in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                          jax.tree.leaves(want), jax.tree.leaves(params)):
        if tuple(w.shape) != tuple(g.shape):
            name = jax.tree_util.keystr(path[0])
            raise ConfigError(f"{source}: tensor {name} has shape {tuple(g.shape)}, the config "
                              f"expects {tuple(w.shape)}")
    if len(jax.tree.leaves(want)) != len(jax.tree.leaves(params)):
        raise ConfigError(f"{source}: W_skip presence disagrees with the config (skip={cfg.skip})")


def check_layers(name: str, layers: tuple[int, ...]) -> None:
    """`layers` names model layers, each once, in increasing order (one-line ConfigError naming
    the field `name`)."""
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layers)
    if not ok or any(b <= a for a, b in itertools.pairwise(layers)):
        raise ConfigError(f"{name} must be model layer indices >= 0, each once, in increasing "
                          f"order (e.g. 3 7), got {list(layers)}")


def check_model(cfg: TranscoderConfig, model_cfg) -> None:
    """Refuse a transcoder built for a different model, with a message naming the mismatch."""
    if cfg.layers:  # an SAE on some layers: they must exist in this model
        if cfg.d_model != model_cfg.d_model or cfg.layers[-1] >= model_cfg.n_layers:
            raise ConfigError(
                f"transcoder/model mismatch: the SAE has d_model={cfg.d_model} and covers "
                f"model layers {', '.join(map(str, cfg.layers))} but model '{model_cfg.name}' "
                f"has d_model={model_cfg.d_model}, layers 0..{model_cfg.n_layers - 1}; use an "
                "SAE trained for this model")
        return
    if cfg.d_model != model_cfg.d_model or cfg.n_layers != model_cfg.n_layers:
        raise ConfigError(
            f"transcoder/model mismatch: transcoder has d_model={cfg.d_model}, "
            f"n_layers={cfg.n_layers} but model '{model_cfg.name}' has d_model="
            f"{model_cfg.d_model}, n_layers={model_cfg.n_layers}; use a transcoder trained "
            f"for this model")


# --- activation functions ----------------------------------------------------------------------
def _rect(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, threshold, bandwidth: float = 1.0):
    """z * H(z - threshold), with the straight-through estimator of Rajamanoharan et al. (2024):
    the Heaviside step's derivative is replaced by a rectangle kernel of width `bandwidth`, so
    both the pre-activation and the threshold get gradients near the threshold."""
    return jnp.where(z > threshold, z, 0.0).astype(z.dtype)


def _jumprelu_fwd(z, threshold, bandwidth):
    return jumprelu(z, threshold, bandwidth), (z, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    z, threshold = res
    th = threshold.astype(jnp.float32)
    kernel = _rect((z.astype(jnp.float32) - th) / bandwidth) / bandwidth
    gz = g * ((z > threshold).astype(g.dtype) + (th * kernel).astype(g.dtype))
    gth = -(g.astype(jnp.float32) * th * kernel)
    gth = gth.reshape((-1,) + threshold.shape).sum(0) if gth.ndim > threshold.ndim else gth
    return gz, gth.astype(threshold.dtype)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


def topk_mask(z: Float[Array, "*b feature"], k: int) -> Float[Array, "*b feature"]:
    """1 where z is among the k largest entries of its last axis (and positive)."""
    kth = jax.lax.top_k(z, k)[0][..., -1:]
    return ((z >= kth) & (z > 0)).astype(z.dtype)


def batchtopk_mask(z: Float[Array, "batch layer feature"], k: int, layer_major: bool = False,
                   kth_fn=None):
    """Per layer, keep the k * batch largest pre-activations over the whole batch; also returns
    each layer's (k * batch)-th largest value. layer_major: z is [layer, batch, feature].
    kth_fn: the k-th-largest function (default `kth_largest`; the CPU training kernels pass
    theirs)."""
    kth_fn = kth_fn or kth_largest
    if layer_major:
        L, B, F = z.shape
        kth = kth_fn(z.reshape(L, B * F), k * B)  # [layer]
        return ((z >= kth[:, None, None]) & (z > 0)).astype(z.dtype), kth
    B, L, F = z.shape
    kth = kth_fn(jnp.moveaxis(z, 1, 0).reshape(L, B * F), k * B)  # [layer]
    return ((z >= kth[None, :, None]) & (z > 0)).astype(z.dtype), kth


def kth_largest(x: Float[Array, "*b n"], k: int) -> Float[Array, "*b"]:
    """The k-th largest entry of every row of x, exactly (what `lax.top_k(x, k)[0][..., -1]`
    gives), found bit by bit on the order-preserving unsigned view of float32: 32 counting
    passes over x instead of a sort (top_k over 2M entries per layer took most of a BatchTopK
    step on a CPU)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    neg = (bits >> 31) == 1
    key = jnp.where(neg, ~bits, bits | jnp.uint32(1 << 31))  # ascending with the float value

    def body(i, t):
        cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        enough = (key >= cand[..., None]).sum(-1) >= k
        return jnp.where(enough, cand, t)

    t = jax.lax.fori_loop(0, 32, body, jnp.zeros(x.shape[:-1], jnp.uint32))
    back = jnp.where((t >> 31) == 1, t & jnp.uint32(0x7FFFFFFF), ~t)
    return jax.lax.bitcast_convert_type(back, jnp.float32).astype(x.dtype)


def activate(cfg: TranscoderConfig, params: TranscoderParams, z, *, bandwidth: float = 1.0,
             training: bool = False, mask=None):
    """Feature activations from pre-activations z [..., layer, feature].

    batchtopk uses its batch rule only when `training` (z must then be [batch, layer, feature]);
    at inference it thresholds at the learned `threshold`, like JumpReLU (in training the
    threshold follows the batch rule's cut, `batchtopk_threshold`). `mask`: the topk/batchtopk
    mask when the caller has it already.
    """
    if cfg.activation == "relu":
        return jax.nn.relu(z)
    if cfg.activation == "topk":
        return z * jax.lax.stop_gradient(topk_mask(z, cfg.k) if mask is None else mask)
    if cfg.activation == "batchtopk" and training:
        mask = batchtopk_mask(z, cfg.k)[0] if mask is None else mask
        return z * jax.lax.stop_gradient(mask)
    th = params.threshold.astype(z.dtype)
    if cfg.activation == "jumprelu" and training:
        return jumprelu(z, th, bandwidth)
    return jnp.where(z > th, z, 0.0)


# --- encode / decode ---------------------------------------------------------------------------
def encode_pre(params: TranscoderParams, x: Float[Array, "*b layer d_model"],
               layer_major: bool = False) -> Float[Array, "*b layer feature"]:
    """Pre-activations of every layer's features from that layer's input. layer_major: x is
    [layer, *b, d_model] and so is the result (a batched matmul with its batch axis first, ~1.4x
    faster on a CPU than with the layer axis in the middle)."""
    if layer_major:
        b = params.b_enc.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (-1,))
        return jnp.einsum("l...d,ldf->l...f", x, params.W_enc.astype(x.dtype)) + b
    return jnp.einsum("...ld,ldf->...lf", x, params.W_enc.astype(x.dtype)) + params.b_enc


def encode(cfg: TranscoderConfig, params: TranscoderParams, x: Float[Array, "*b layer d_model"]
           ) -> Float[Array, "*b layer feature"]:
    """Feature activations (inference rule) from the inputs of every layer."""
    return activate(cfg, params, encode_pre(params, x))


def decode(cfg: TranscoderConfig, params: TranscoderParams,
           acts: Float[Array, "*b layer feature"],
           x: Float[Array, "*b layer d_model"] | None = None) -> Float[Array, "*b layer d_model"]:
    """Reconstructed MLP outputs of every layer: sum over source layers s <= t of
    acts[s] @ W_dec[s][:, t - s], plus b_dec[t], plus x[t] @ W_skip[t] when there is a skip."""
    out = jnp.zeros(acts.shape[:-2] + params.b_dec.shape, acts.dtype)
    for s in range(cfg.n_layers):
        out = out.at[..., s:s + cfg.n_targets(s), :].add(
            decoder_writes(cfg, params, s, acts[..., s, :]))
    return add_bias_and_skip(params, out, x)


def decoder_writes(cfg: TranscoderConfig, params: TranscoderParams, s: int,
                   acts: Float[Array, "*b feature"]) -> Float[Array, "*b target d_model"]:
    """What source layer s's features write into layers s..s+n_targets(s)-1: acts @ W_dec[s]
    (the one place decoder writes are computed; `decode` and `layer_step` sum them)."""
    n = cfg.n_targets(s)
    w = params.W_dec[s].astype(acts.dtype).reshape(cfg.n_features, n * cfg.d_model)
    return (acts @ w).reshape(acts.shape[:-1] + (n, cfg.d_model))


def add_bias_and_skip(params: TranscoderParams, writes: Float[Array, "*b layer d_model"],
                      x: Float[Array, "*b layer d_model"] | None = None
                      ) -> Float[Array, "*b layer d_model"]:
    """Reconstructions from the features' decoder writes: + b_dec[t], + x[t] @ W_skip[t] when
    there is a skip (the dense `decode` and the sparse training step both end here)."""
    out = writes + params.b_dec.astype(writes.dtype)
    if params.W_skip is not None:
        if x is None:
            raise ValueError("this transcoder has a skip connection: decode needs its input x")
        out = out + jnp.einsum("...ld,lde->...le", x, params.W_skip.astype(x.dtype))
    return out


def forward(cfg: TranscoderConfig, params: TranscoderParams, x: Float[Array, "*b layer d_model"]):
    """(reconstruction, activations) with the inference activation rule."""
    acts = encode(cfg, params, x)
    return decode(cfg, params, acts, x), acts


def init_pending(cfg: TranscoderConfig, params: TranscoderParams,
                 x: Float[Array, "*b d_model"]) -> tuple:
    """Pending reconstructions of every target layer, b_dec[t] before any feature writes, for
    `layer_step` (at least float32: a target layer sums the writes of many source layers)."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return tuple(jnp.broadcast_to(params.b_dec[t].astype(dtype), x.shape)
                 for t in range(cfg.n_layers))


def layer_step(cfg: TranscoderConfig, params: TranscoderParams, layer: int,
               x: Float[Array, "*b d_model"], pending: tuple, edit=None):
    """One source layer of a transcoder run layer by layer, as a spliced model needs it (its
    inputs at later layers depend on this layer's output): encode layer `layer` from its input x,
    optionally change the activations (`edit(acts) -> acts`), add their decoder writes to the
    pending outputs of layers layer..layer+n_targets-1, and return (acts, reconstruction of
    `layer`, pending). The reconstruction is the same sum as `decode` (+ the skip of x)."""
    # A one-layer view of the parameters, so that `encode` applies the inference rule.
    view = dataclasses.replace(params, W_enc=params.W_enc[layer:layer + 1],
                               b_enc=params.b_enc[layer:layer + 1],
                               log_threshold=params.log_threshold[layer:layer + 1])
    acts = encode(cfg, view, x[..., None, :])[..., 0, :]  # [*b feature]
    if edit is not None:
        acts = edit(acts)
    writes = decoder_writes(cfg, params, layer, acts)
    pending = list(pending)
    for j in range(cfg.n_targets(layer)):
        pending[layer + j] = pending[layer + j] + writes[..., j, :]
    out = pending[layer]
    if params.W_skip is not None:
        out = out + x @ params.W_skip[layer].astype(x.dtype)
    return acts, out, tuple(pending)


def decoder_norms(cfg: TranscoderConfig, params: TranscoderParams,
                  kind: Literal["concat", "sum"] = "concat") -> Float[Array, "layer feature"]:
    """Per-feature decoder norm: 'concat' is the L2 norm of the decoders concatenated over target
    layers (the paper's ||W_dec,i||); 'sum' adds the per-target-layer L2 norms."""
    rows = []
    for s in range(cfg.n_layers):
        sq = jnp.sum(jnp.square(params.W_dec[s].astype(jnp.float32)), axis=-1)  # [F, n]
        rows.append(jnp.sqrt(sq.sum(-1)) if kind == "concat" else jnp.sqrt(sq).sum(-1))
    return jnp.stack(rows)


def decoder_to_layer(cfg: TranscoderConfig, params: TranscoderParams, s: int, t: int):
    """W_dec of source layer s's features into target layer t: [feature, d_model]."""
    if not (s <= t < s + cfg.n_targets(s)):
        raise ValueError(f"features of layer {s} do not write to layer {t}")
    return params.W_dec[s][:, t - s]


# --- normalisation folding ---------------------------------------------------------------------
def fold_norms(cfg: TranscoderConfig, params: TranscoderParams, norms: Norms) -> TranscoderParams:
    """Parameters trained on normalised activations -> parameters acting on raw activations.

    Training sees x' = (x - in_mean) / in_scale and predicts y' = (y - out_mean) / out_scale. The
    folded transcoder gives the same pre-activations (so thresholds are unchanged) and y itself.
    """
    f32 = jnp.float32
    W_enc = params.W_enc / norms.in_scale[:, None, None]
    b_enc = params.b_enc - jnp.einsum("ld,ldf->lf", norms.in_mean, W_enc)
    W_dec = tuple(params.W_dec[s] * norms.out_scale[s:s + cfg.n_targets(s)][None, :, None]
                  for s in range(cfg.n_layers))
    b_dec = params.b_dec * norms.out_scale[:, None] + norms.out_mean
    W_skip = None
    if params.W_skip is not None:
        # y = out_scale * ((x - in_mean) / in_scale @ S) + ...: a linear map plus a bias.
        ratio = (norms.out_scale / norms.in_scale)[:, None, None]
        W_skip = params.W_skip * ratio
        b_dec = b_dec - jnp.einsum("ld,lde->le", norms.in_mean, W_skip)
    return TranscoderParams(W_enc=W_enc.astype(params.W_enc.dtype), b_enc=b_enc.astype(f32),
                            log_threshold=params.log_threshold, W_dec=W_dec, b_dec=b_dec,
                            W_skip=W_skip)


def unfold_norms(cfg: TranscoderConfig, params: TranscoderParams, norms: Norms
                 ) -> TranscoderParams:
    """The inverse of `fold_norms`: parameters acting on raw activations -> the same transcoder
    in the normalised space of `norms` (to continue training from an exported transcoder)."""
    f32 = jnp.float32
    W_skip = None
    b_dec = params.b_dec.astype(f32)
    if params.W_skip is not None:
        b_dec = b_dec + jnp.einsum("ld,lde->le", norms.in_mean, params.W_skip.astype(f32))
        W_skip = params.W_skip.astype(f32) / (norms.out_scale / norms.in_scale)[:, None, None]
    b_dec = (b_dec - norms.out_mean) / norms.out_scale[:, None]
    W_enc = params.W_enc.astype(f32)
    b_enc = params.b_enc.astype(f32) + jnp.einsum("ld,ldf->lf", norms.in_mean, W_enc)
    W_dec = tuple(params.W_dec[s].astype(f32)
                  / norms.out_scale[s:s + cfg.n_targets(s)][None, :, None]
                  for s in range(cfg.n_layers))
    return TranscoderParams(W_enc=W_enc * norms.in_scale[:, None, None], b_enc=b_enc,
                            log_threshold=params.log_threshold.astype(f32), W_dec=W_dec,
                            b_dec=b_dec, W_skip=W_skip)


# --- save / load (our own layout) --------------------------------------------------------------
INDEX = "transcoder.safetensors.index.json"


def save(path: str | Path, cfg: TranscoderConfig, params: TranscoderParams,
         dtype: str | None = None, extra: dict | None = None,
         max_file_mb: float | None = None) -> Path:
    """Write `config.json` + `transcoder.safetensors` (optionally cast to float16/bfloat16);
    `extra` (metrics, recipe) goes to `info.json`.

    With `max_file_mb`, tensors are split by layer and packed into `transcoder-00001-of-0000N.
    safetensors` files of at most that size, listed in `transcoder.safetensors.index.json`
    (tensor -> file, as Hugging Face shards are): for hosts and packages that cap file sizes.

    Every file is written atomically (`clt.io.atomic_write`): a kill or a full disk leaves each
    file whole (old or new), never half written; a failure is a one-line ConfigError. Files of
    an earlier layout (single file <-> shards) are removed once the new ones are written.
    """
    from clt.io import atomic_write

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory; choose another path")
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": params.W_enc, "b_enc": params.b_enc,
               "threshold": params.threshold, "b_dec": params.b_dec}
    for s, w in enumerate(params.W_dec):
        tensors[f"W_dec.{s}"] = w
    if params.W_skip is not None:
        tensors["W_skip"] = params.W_skip
    from safetensors.flax import save as to_bytes

    cast = {k: jnp.asarray(v, jnp.float32 if (dtype is None or k == "threshold") else dtype)
            for k, v in tensors.items()}
    if max_file_mb is None:
        atomic_write(path / "transcoder.safetensors", to_bytes(cast))
        (path / INDEX).unlink(missing_ok=True)  # the index would point a reader at old shards
        written = {"transcoder.safetensors"}
    else:
        written = _save_shards(path, cast, int(max_file_mb * 2**20))
    atomic_write(path / "config.json", cfg.to_json())
    if extra is not None:
        atomic_write(path / "info.json", json.dumps(extra, indent=2))
    for old in [path / "transcoder.safetensors", *path.glob("transcoder-*-of-*")]:
        if old.name not in written:
            old.unlink(missing_ok=True)
    return path


def _save_shards(path: Path, tensors: dict, limit: int) -> set[str]:
    """Write the shards and their index (each atomically); returns the names written."""
    from safetensors.flax import save as to_bytes

    from clt.io import atomic_write

    split: dict[str, jax.Array] = {}
    for k, v in tensors.items():  # [layer, ...] stacks are stored one layer per tensor
        if k in ("W_enc", "W_skip"):
            split.update({f"{k}.{layer}": v[layer] for layer in range(v.shape[0])})
        else:
            split[k] = v
    files: list[dict[str, jax.Array]] = [{}]
    used = 0
    for k, v in split.items():
        if v.nbytes > limit:
            raise ValueError(f"tensor {k} ({v.nbytes / 2**20:.1f} MB) exceeds max_file_mb")
        if used + v.nbytes > limit and files[-1]:
            files.append({})
            used = 0
        files[-1][k] = v
        used += v.nbytes
    names = [f"transcoder-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for name, group in zip(names, files):
        atomic_write(path / name, to_bytes(group))
    index = {"weight_map": {k: name for name, group in zip(names, files) for k in group},
             "metadata": {"total_size": int(sum(v.nbytes for v in split.values()))}}
    atomic_write(path / INDEX, json.dumps(index, indent=1))
    return {*names, INDEX}


def _load_tensors(path: Path) -> dict:
    """All tensors of a transcoder directory, single-file or sharded, on the host (read-only
    views of the files); layer-split stacks joined."""
    from clt.io import read_safetensors

    if (path / INDEX).exists():
        try:
            files = sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}/{INDEX} is corrupt ({e}); re-export it") from None
    else:
        files = ["transcoder.safetensors"]
    t: dict = {}
    for name in files:
        if not (path / name).exists():
            raise ConfigError(f"{path} is incomplete: {name} is missing; copy or re-export it")
        try:
            t.update(read_safetensors(path / name))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}/{name} is corrupt ({e}); re-export it") from None
    for k in ("W_enc", "W_skip"):
        parts = sorted((int(n.split(".")[1]), n) for n in t if n.startswith(k + "."))
        if parts and k not in t:
            t[k] = np.stack([t.pop(n) for _, n in parts])
    return t


def _on_device(a: np.ndarray, dtype) -> jax.Array:
    """A host array (a view of the file) on the device as `dtype`: converted on the host where
    that is exact (the same type, or a wider float; `clt.io.to_device`, no program lowered),
    else by XLA (as XLA rounds: one program per shape)."""
    from clt.io import to_device

    a, dtype = np.asarray(a), np.dtype(dtype)
    if a.dtype == dtype or (a.dtype.kind == dtype.kind == "f" and a.dtype.itemsize
                            < dtype.itemsize):
        return to_device(a, dtype)
    return jax.device_put(a).astype(dtype)


def load(path: str | Path, dtype=jnp.float32) -> tuple[TranscoderConfig, TranscoderParams]:
    """Read a transcoder written by `save`; clear errors for missing or inconsistent files."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(f"{path} is not a cltrace transcoder: config.json is missing")
    if not ((path / "transcoder.safetensors").exists() or (path / INDEX).exists()):
        raise ConfigError(f"{path} is not a cltrace transcoder: transcoder.safetensors is missing")
    cfg = TranscoderConfig.from_json((path / "config.json").read_text())
    t = _load_tensors(path)
    try:
        params = TranscoderParams(
            W_enc=_on_device(t["W_enc"], dtype), b_enc=_on_device(t["b_enc"], jnp.float32),
            log_threshold=jnp.log(_on_device(t["threshold"], jnp.float32)),
            W_dec=tuple(_on_device(t[f"W_dec.{s}"], dtype) for s in range(cfg.n_layers)),
            b_dec=_on_device(t["b_dec"], jnp.float32),
            W_skip=_on_device(t["W_skip"], dtype) if "W_skip" in t else None)
    except KeyError as e:
        raise ConfigError(f"{path} lacks tensor {e}; re-export it") from None
    check_params(cfg, params, str(path))
    return cfg, params


__all__ = [
    "Norms", "TranscoderConfig", "TranscoderParams", "activate", "add_bias_and_skip",
    "batchtopk_mask", "kth_largest",
    "check_layers", "check_model", "check_params", "decode", "decoder_norms", "decoder_to_layer",
    "decoder_writes",
    "encode",
    "encode_pre", "fold_norms", "forward", "init_params", "init_pending", "jumprelu",
    "layer_step", "load", "param_shapes", "unfold_norms",
    "save", "topk_mask",
]
