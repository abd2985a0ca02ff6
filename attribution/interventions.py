"""Testing what a graph claims: feature interventions, steering, generation and the logit lens.

A graph is a hypothesis; interventions test it ("Circuit Tracing", Ameisen et al., 2025, §"Validating
with interventions"; Templeton et al. 2024 for clamping). Two modes:

- **frozen**: attention patterns, normalisation scales and the error nodes of the local
  replacement model are held at their values on the prompt, and every feature other than the
  edited ones keeps its activation. An edit then changes each target only through direct edges:
  the change in a target's pre-activation equals (delta activation / activation) x the edge.
- **free**: the model recomputes everything downstream with the transcoder spliced in for every
  MLP and the error terms kept at their values on the prompt; features downstream of an edit
  respond to it, so indirect effects show. With no edit it is the original model exactly; with
  every feature zeroed it is the "errors only" model (each MLP = its bias, skip and error). At
  positions beyond the prompt (generation) there is no recorded error: there the MLP output is the
  model's own MLP plus the decoder writes of the edits (edited minus unedited features).

Steering adds alpha * v to the residual stream after a layer's block, v a feature's decoder
direction or a difference of mean residuals between two prompt sets (the "function vector" /
refusal-direction method, Todd et al. 2024, Arditi et al. 2024).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from attribution import replacement as rep
from clt import transcoder as tcm
from clt.configs import ConfigError, doc
from clt.lm.config import ModelConfig
from clt.lm.model import MLPHook, forward, logits_of, unembed
from clt.lm.params import LMParams
from clt.splice import SplicedTranscoder
from clt.transcoder import TranscoderConfig, TranscoderParams

Op = Literal["set", "scale", "add"]


@dataclass(frozen=True)
class FeatureEdit:
    """Change feature `feature` of layer `layer` at position `pos` (BOS = 0), or at every
    position from `pos` on when `onwards` (generated positions included), or everywhere when
    `pos` is None. `op`: set to value, scale by value, or add value (zero = set 0)."""

    layer: int
    feature: int
    pos: int | None
    op: Op = "set"
    value: float = 0.0
    onwards: bool = False

    def check(self, tc_cfg: TranscoderConfig, n_pos: int | None = None) -> None:
        if not 0 <= self.layer < tc_cfg.n_layers:
            raise ConfigError(f"layer {self.layer} out of range: the transcoder has layers "
                              f"0..{tc_cfg.n_layers - 1}")
        if not 0 <= self.feature < tc_cfg.n_features:
            raise ConfigError(f"feature {self.feature} does not exist: layer {self.layer} has "
                              f"features 0..{tc_cfg.n_features - 1}")
        if self.pos is not None and n_pos is not None and not 0 <= self.pos < n_pos:
            raise ConfigError(f"position {self.pos} out of range: the prompt has positions "
                              f"0..{n_pos - 1} (BOS = 0)")

    def apply(self, col, positions):
        """The edited activations of this feature, col [..., pos], at `positions` [pos]."""
        if self.pos is None:
            sel = jnp.ones(positions.shape, bool)
        else:
            sel = positions >= self.pos if self.onwards else positions == self.pos
        new = {"set": jnp.full_like(col, self.value), "scale": col * self.value,
               "add": col + self.value}[self.op]
        return jnp.where(sel, new, col)


_EDIT = re.compile(r"^\s*(\d+):(\d+)(?:@(all|\d+\+?|\d+:))?\s*([=*+])\s*([-+0-9.eE]+)\s*$")


def parse_edit(spec: str) -> FeatureEdit:
    """`L:F@POS=V` (set), `L:F@POS*V` (scale), `L:F@POS+V` (add). POS is a position (BOS = 0),
    `P+` or `P:` for P and every later position (generation included), or `all`; omitted = all."""
    m = _EDIT.match(spec)
    if not m:
        raise ConfigError(f"cannot parse intervention '{spec}'; write LAYER:FEATURE@POS=VALUE "
                          "(or *FACTOR, +DELTA; POS a number, P+ for P onwards, or all)")
    layer, feature, where, sym, value = m.groups()
    onwards = bool(where) and where[-1] in "+:"
    pos = None if where in (None, "all") else int(where.rstrip("+:"))
    op = {"=": "set", "*": "scale", "+": "add"}[sym]
    return FeatureEdit(int(layer), int(feature), pos, op, float(value), onwards)


# --- command configs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SteerConfig:
    """`cltrace steer`: feature edits, or a steering direction, on one prompt."""

    prompt: str = doc("The text to run.", positional=True)
    model: str = doc("Model name or path.", default="smollm2-135m")
    transcoder: str | None = doc(
        "Transcoder for feature edits (default: the one bundled for the model).", default=None)
    set: tuple[str, ...] = doc("Set a feature's activation (repeatable).", default=(),
                               repeat=True, metavar="L:F@POS=V")
    scale: tuple[str, ...] = doc("Scale a feature's activation (repeatable).", default=(),
                                 repeat=True, metavar="L:F@POS=V")
    add: tuple[str, ...] = doc("Add to a feature's activation (repeatable).", default=(),
                               repeat=True, metavar="L:F@POS=V")
    zero: tuple[str, ...] = doc("Zero a feature's activation (repeatable).", default=(),
                                repeat=True, metavar="L:F@POS")
    mode: Literal["free", "frozen"] = doc(
        "free: downstream features and attention recompute (errors kept); frozen: patterns, "
        "norms, errors and other features fixed (direct effects, = graph edges; next token "
        "only).", default="free")
    vector: str | None = doc("Steer with this direction (.npy [d_model]).", default=None)
    feature_direction: str | None = doc(
        "Steer along feature F of layer L's decoder into layer L.", default=None, metavar="L:F")
    layer: int | None = doc("Steering: after this block.", default=None)
    alpha: float = doc("Steering strength.", default=4.0)
    from_pos: int = doc("Steering: from this position on.", default=0)
    max_new_tokens: int = doc("Tokens to generate for the side-by-side continuations.",
                              default=20)
    k: int = doc("Top-k next tokens to show.", default=5)
    out: str | None = doc("Also write the comparison as JSON.", default=None)

    def __post_init__(self):
        if self.k <= 0 or self.max_new_tokens < 0:
            raise ConfigError("SteerConfig: --k must be positive and --max-new-tokens >= 0")

    def edit_specs(self) -> tuple[str, ...]:
        """Every edit as one `parse_edit` spec (L:F@POS=V, *FACTOR, +DELTA)."""
        return (tuple(self.set) + tuple(s.replace("=", "*", 1) for s in self.scale)
                + tuple(s.replace("=", "+", 1) for s in self.add)
                + tuple(s + "=0" for s in self.zero))


@dataclass(frozen=True)
class DirectionConfig:
    """`cltrace direction`: a difference-of-means steering vector."""

    positive: str = doc("Text file, one prompt per line.")
    negative: str = doc("Text file, one prompt per line.")
    layer: int = doc("Residual stream after this block.")
    out: str = doc("Output .npy file.", short="-o")
    model: str = doc("Model name or path.", default="smollm2-135m")
    position: Literal["last", "mean"] = doc("Which positions' residuals to average.",
                                            default="last")


@dataclass(frozen=True)
class LensConfig:
    """`cltrace lens`: the logit lens of a prompt."""

    prompt: str = doc("The text to run.", positional=True)
    model: str = doc("Model name or path.", default="smollm2-135m")
    k: int = doc("Top-k tokens per layer and position.", default=3)
    html: str | None = doc("Also write a heatmap page here.", default=None)
    every: int = doc("Show every n-th layer in the table.", default=1)

    def __post_init__(self):
        if self.k <= 0 or self.every <= 0:
            raise ConfigError("LensConfig: --k and --every must be positive")


# --- free mode -------------------------------------------------------------------------------------
def free_logits(params: LMParams, model_cfg: ModelConfig, tc_cfg: TranscoderConfig,
                tc_params: TranscoderParams, rm: rep.LocalReplacement,
                edits: tuple[FeatureEdit, ...], tokens=None) -> Float[Array, "pos vocab"]:
    """Logits of the free-mode intervened model on `tokens` (default: the prompt of `rm`; longer
    token sequences start with that prompt)."""
    tokens = rm.tokens if tokens is None else jnp.asarray(tokens, jnp.int32)
    for e in edits:
        e.check(tc_cfg)
    # The transcoder spliced in, features live and edited, errors frozen at the prompt and the
    # model's own MLP beyond it (generation).
    hook = SplicedTranscoder(tc_cfg, errors=True, edits=tuple(edits))
    hp = (tc_params, rm.mlp_out[:, None], rm.recon[:, None], jnp.arange(tokens.shape[0]))
    logits, _ = forward(params, model_cfg, tokens[None], mlp_hook=hook, hook_params=hp)
    return logits[0]


# --- frozen mode -----------------------------------------------------------------------------------
def frozen_effects(params: LMParams, model_cfg: ModelConfig, tc_cfg: TranscoderConfig,
                   tc_params: TranscoderParams, rm: rep.LocalReplacement, acts,
                   edits: tuple[FeatureEdit, ...]):
    """Transcoder inputs [layer, pos, d_model] and final hidden [pos, d_model] of the frozen
    linear model after the edits (acts [pos, layer, feature] of the prompt). Only direct effects:
    the edited features' decoder writes change, nothing else is recomputed."""
    n_pos = rm.tokens.shape[0]
    delta = jnp.zeros_like(acts)
    for e in edits:
        e.check(tc_cfg, n_pos)
        col = acts[:, e.layer, e.feature]
        delta = delta.at[:, e.layer, e.feature].add(e.apply(col, jnp.arange(n_pos)) - col)
    # The edited activations write through the decoders into the MLP slots they reach.
    writes = jnp.swapaxes(tcm.decode(tc_cfg, dataclasses.replace(
        tc_params, b_dec=jnp.zeros_like(tc_params.b_dec), W_skip=None), delta), 0, 1)
    return rep.linear_forward(rm, params, model_cfg, tc_cfg, tc_params, rm.embeds,
                              rm.mlp_sub + writes)


def frozen_logits(params, model_cfg, tc_cfg, tc_params, rm, acts, edits):
    """Logits [pos, vocab] of the frozen-mode intervened model."""
    _, hidden = frozen_effects(params, model_cfg, tc_cfg, tc_params, rm, acts, edits)
    return logits_of(params, model_cfg, hidden)


# --- steering --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SteerHook(MLPHook):
    """Adds alpha * v to the residual stream after block `layer` (at positions >= `from_pos`):
    hook_params = v [d_model]."""

    layer: int
    alpha: float
    from_pos: int = 0

    def apply(self, hook_params, layer, resid_mid, mlp_in, state, true_mlp):
        out = true_mlp(mlp_in)
        if layer != self.layer:
            return out, state
        pos = jnp.arange(out.shape[1])[None, :, None]
        return out + jnp.where(pos >= self.from_pos, self.alpha * hook_params, 0.0), state


def feature_direction(tc_cfg: TranscoderConfig, tc_params: TranscoderParams, layer: int,
                      feature: int, target_layer: int | None = None) -> Float[Array, " d_model"]:
    """A feature's decoder row into `target_layer` (default: its own layer)."""
    FeatureEdit(layer, feature, None).check(tc_cfg)
    return tcm.decoder_to_layer(tc_cfg, tc_params, layer,
                                layer if target_layer is None else target_layer)[feature]


def mean_residual(params: LMParams, model_cfg: ModelConfig, token_lists: list[list[int]],
                  layer: int,
                  position: Literal["last", "mean"] = "last") -> Float[Array, " d_model"]:
    """Mean over prompts of the residual stream after block `layer` (last token, or the mean over
    each prompt's tokens)."""
    if not token_lists:
        raise ConfigError("a difference of means needs at least one prompt on each side")
    if not 0 <= layer < model_cfg.n_layers:
        raise ConfigError(f"layer {layer} out of range 0..{model_cfg.n_layers - 1}")
    vecs = []
    for ids in token_lists:
        _, cap = forward(params, model_cfg, jnp.asarray([ids]),
                         capture=("resid_pre", "resid_final"))
        r = cap.resid_pre[layer + 1, 0] if layer + 1 < model_cfg.n_layers else cap.resid_final[0]
        vecs.append(r[-1] if position == "last" else r.mean(0))
    return jnp.stack(vecs).mean(0)


def diff_of_means(params, model_cfg, positive: list[list[int]], negative: list[list[int]],
                  layer: int,
                  position: Literal["last", "mean"] = "last") -> Float[Array, " d_model"]:
    """mean residual(positive) - mean residual(negative) after block `layer`."""
    return (mean_residual(params, model_cfg, positive, layer, position)
            - mean_residual(params, model_cfg, negative, layer, position))


def steered_logits(params, model_cfg, tokens, v, layer: int, alpha: float, from_pos: int = 0):
    if not 0 <= layer < model_cfg.n_layers:
        raise ConfigError(f"layer {layer} out of range 0..{model_cfg.n_layers - 1}")
    logits, _ = forward(params, model_cfg, jnp.asarray(tokens)[None],
                        mlp_hook=SteerHook(layer, float(alpha), from_pos),
                        hook_params=jnp.asarray(v))
    return logits[0]


# --- generation ------------------------------------------------------------------------------------
def greedy_continue(logits_fn, prompt: list[int], max_new_tokens: int, eos: tuple[int, ...] = (),
                    temperature: float = 0.0, seed: int = 0) -> list[int]:
    """Continue `prompt` with `logits_fn(tokens) -> [pos, vocab]` recomputing the whole sequence
    each step (interventions change every position's computation, so no KV cache). Tokens are
    padded to a fixed length so one compilation serves every step."""
    total = len(prompt) + max_new_tokens
    buf = np.zeros(total, np.int32)
    buf[:len(prompt)] = prompt
    key = jax.random.key(seed)
    n = len(prompt)
    while n < total:
        logits = logits_fn(jnp.asarray(buf))[n - 1]
        if temperature > 0:
            key, sub = jax.random.split(key)
            nxt = int(jax.random.categorical(sub, logits / temperature))
        else:
            nxt = int(jnp.argmax(logits))
        buf[n] = nxt
        n += 1
        if nxt in eos:
            break
    return buf[len(prompt):n].tolist()


# --- logit lens ------------------------------------------------------------------------------------
def logit_lens(params: LMParams, model_cfg: ModelConfig, tokens, k: int = 5):
    """Top-k tokens and probabilities decoded from the residual stream entering each block and
    after the last one, through the final norm (recomputed, not frozen) and the unembedding:
    (ids [layer+1, pos, k], probs [layer+1, pos, k])."""
    _, cap = forward(params, model_cfg, jnp.asarray(tokens)[None],
                     capture=("resid_pre", "resid_final"))
    resid = jnp.concatenate([cap.resid_pre[:, 0], cap.resid_final], axis=0)  # [L+1, pos, d]
    logits, _ = unembed(params, model_cfg, resid)  # the final norm recomputed at every layer
    probs, ids = jax.lax.top_k(jax.nn.softmax(logits, -1), k)
    return np.asarray(ids), np.asarray(probs)


__all__ = [
    "DirectionConfig", "FeatureEdit", "LensConfig", "SteerConfig", "SteerHook", "diff_of_means",
    "feature_direction",
    "free_logits", "frozen_effects", "frozen_logits", "greedy_continue", "logit_lens",
    "mean_residual", "parse_edit", "steered_logits",
]
