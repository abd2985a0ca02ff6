"""The local replacement model of one prompt, and the frozen linear model its graph is read from.

"Circuit Tracing" (Ameisen et al., 2025, §2.2 "local replacement model"): run the real model on the
prompt (a BOS token prepended, as circuit-tracer does), record every attention pattern and every
normalisation scale, and freeze them. Replace each MLP output by the transcoder's reconstruction
plus an error term, error = (true MLP output - reconstruction), held constant. With the real
inputs the replacement then reproduces the original logits exactly (`replacement_logits`).

Once features are also treated as constants (each feature a *source* that writes activation x
decoder rows), everything left is affine in the nodes' contributions: token embeddings, feature
writes, error vectors. That frozen linear model is what attribution differentiates
(`linear_block`, `final_hidden`); its MLP slot at layer t receives

    mlp_sub[t] + x_t @ W_skip[t]        (the W_skip term only for transcoders with a skip)

where mlp_sub[t] = sum of the features' decoder writes + b_dec[t] + error[t] (= the true MLP output
minus the skip at the real input) and x_t is the transcoder input at layer t (resid_mid, or the
normalised MLP input which, under the frozen norm scale, is an affine function of resid_mid).

How a skip connection is attributed: it is not a node. Being linear in its input, it is part of the
frozen linear model, like attention's OV circuit: a source's effect that reaches x_t also reaches
the MLP slot of layer t through W_skip, and the edge from that source to any later target includes
this path. This matches circuit-tracer, which passes gradients through the skip and detaches the
rest of the MLP output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from clt import transcoder as tcm
from clt.configs import ConfigError
from clt.io import to_device
from clt.lm.config import ModelConfig
from clt.lm.model import (FREEZABLE, Capture, attn_input, attn_values, block, embed, forward,
                          mlp_input, norm)
from clt.lm.params import LMParams
from clt.splice import SplicedTranscoder
from clt.transcoder import TranscoderConfig, TranscoderParams

# The per-layer frozen fields (everything in FREEZABLE but the final norm scale).
_LAYER_FROZEN = tuple(f for f in FREEZABLE if f != "final_norm_scale")


@jax.tree_util.register_dataclass
@dataclass
class LocalReplacement:
    """Everything the frozen model of one prompt needs, for one sequence (no batch axis except in
    `frozen`, whose fields keep the model's [layer, batch=1, ...] layout).

    Positions count the prepended BOS token as position 0.
    """

    tokens: Int[Array, " pos"]
    embeds: Float[Array, "pos d_model"]  # what enters block 0 (scaled embedding + positions)
    frozen: Capture  # attention patterns and every norm scale, batch 1
    inputs: Float[Array, "layer pos d_model"]  # transcoder inputs (its input point)
    mlp_out: Float[Array, "layer pos d_model"]  # true MLP outputs (after any post-MLP norm)
    recon: Float[Array, "layer pos d_model"]  # the transcoder's reconstruction on the prompt
    mlp_sub: Float[Array, "layer pos d_model"]  # MLP slot minus the skip term (see module doc)
    error: Float[Array, "layer pos d_model"]  # true MLP output - reconstruction
    last_logits: Float[Array, " vocab"]  # the model's logits at the last position (float32)


@dataclass(frozen=True)
class ActiveFeatures:
    """Active features, sorted by (layer, pos, index); host numpy arrays."""

    layer: np.ndarray  # [n] int32
    pos: np.ndarray  # [n] int32
    index: np.ndarray  # [n] int32
    value: np.ndarray  # [n] activations (the compute dtype, float32 normally)

    def __len__(self) -> int:
        return len(self.layer)

    def take(self, rows: np.ndarray) -> ActiveFeatures:
        return ActiveFeatures(self.layer[rows], self.pos[rows], self.index[rows], self.value[rows])


def build(params: LMParams, model_cfg: ModelConfig, tc_cfg: TranscoderConfig,
          tc_params: TranscoderParams,
          tokens: Int[np.ndarray, " pos"]
          ) -> tuple[LocalReplacement, Float[Array, "pos layer feature"]]:
    """Run the real model on `tokens` (BOS already prepended) and freeze it.

    Returns the replacement and the feature activations of every position and layer [pos, layer,
    feature] (the BOS position included: its features are part of the exact reconstruction even
    though they are left out of the graph).
    """
    tcm.check_model(tc_cfg, model_cfg)
    check_transcoder(tc_cfg)
    return _build(params, tc_params, to_device(np.asarray(tokens)[None], np.int32),
                  model_cfg=model_cfg, tc_cfg=tc_cfg)


def check_transcoder(tc_cfg: TranscoderConfig) -> None:
    """Refuse an SAE where a local replacement model is needed (graphs, frozen-mode edits): its
    features reconstruct the residual stream, they do not stand in for the MLPs."""
    if tc_cfg.is_sae:
        raise ConfigError("this is a residual-stream SAE (output_point == input_point): "
                          "attribution graphs and frozen-mode edits need a transcoder, whose "
                          "features replace the MLPs; an SAE works with eval, features and "
                          "steer (free mode, --feature-direction)")


@partial(jax.jit, static_argnames=("model_cfg", "tc_cfg"))
def _build(params: LMParams, tc_params: TranscoderParams, tok, *, model_cfg: ModelConfig,
           tc_cfg: TranscoderConfig):
    # One compiled program (read from the persistent compilation cache by a second command),
    # not a hundred small dispatches.
    wanted = FREEZABLE + ("resid_mid", "mlp_in", "mlp_out")
    logits, cap = forward(params, model_cfg, tok, capture=wanted)
    # Frozen: attention patterns and normalisation scales are nonlinear functions of the residual
    # stream; holding them at their values on this prompt is what makes the rest linear.
    frozen = jax.lax.stop_gradient(cap.frozen_part())
    reads = tc_cfg.read(cap.resid_mid, cap.mlp_in)[:, 0]  # [layer pos d_model]
    x = jnp.swapaxes(reads, 0, 1)  # [pos layer d_model], the transcoder's layout
    acts = tcm.encode(tc_cfg, tc_params, x)
    recon = jnp.swapaxes(tcm.decode(tc_cfg, tc_params, acts, x), 0, 1)
    mlp_out = cap.mlp_out[:, 0]
    # Frozen: the error is a constant node, (true - reconstruction) at the real input.
    error = jax.lax.stop_gradient(mlp_out - recon)
    skip = 0.0 if tc_params.W_skip is None else jnp.einsum("lpd,lde->lpe", reads, tc_params.W_skip)
    positions = jnp.arange(tok.shape[1])[None]
    rm = LocalReplacement(
        tokens=tok[0], embeds=embed(params, model_cfg, tok, positions)[0], frozen=frozen,
        inputs=reads,
        mlp_out=mlp_out, recon=jax.lax.stop_gradient(recon),
        mlp_sub=jax.lax.stop_gradient(mlp_out - skip), error=error,
        last_logits=logits[0, -1])
    return rm, acts


def build_neurons(params: LMParams, model_cfg: ModelConfig, tokens: Int[np.ndarray, " pos"],
                  top_k: int):
    """`build` for a neuron graph (`attribution.neurons`): the MLPs linearised at the prompt,
    their `top_k` largest units per layer and position as features, the rest of each MLP's
    output in its error node. Returns (replacement, activations [pos, layer, d_mlp], factors
    [pos, layer, d_mlp]: each unit's frozen factor, its target vector being factor *
    W_in[:, i])."""
    from attribution.neurons import neuron_transcoder

    tc_cfg, tc_params = neuron_transcoder(params, model_cfg)
    rm, acts, factors = _build_neurons(params, jnp.asarray(tokens, jnp.int32)[None],
                                       model_cfg=model_cfg, top_k=top_k)
    return rm, acts, factors, tc_cfg, tc_params


@partial(jax.jit, static_argnames=("model_cfg", "top_k"))
def _build_neurons(params: LMParams, tok, *, model_cfg: ModelConfig, top_k: int):
    from attribution.neurons import build_acts

    wanted = FREEZABLE + ("resid_mid", "mlp_in", "mlp_out")
    logits, cap = forward(params, model_cfg, tok, capture=wanted)
    acts, factors, recon = build_acts(params, model_cfg, cap, top_k)
    mlp_out = cap.mlp_out[:, 0]
    positions = jnp.arange(tok.shape[1])[None]
    rm = LocalReplacement(
        tokens=tok[0], embeds=embed(params, model_cfg, tok, positions)[0],
        frozen=jax.lax.stop_gradient(cap.frozen_part()), inputs=cap.mlp_in[:, 0],
        mlp_out=mlp_out, recon=jax.lax.stop_gradient(recon),
        mlp_sub=jax.lax.stop_gradient(mlp_out), error=jax.lax.stop_gradient(mlp_out - recon),
        last_logits=logits[0, -1])
    return rm, acts, jax.lax.stop_gradient(factors)


def active_features(acts: Float[Array, "pos layer feature"], skip_bos: bool) -> ActiveFeatures:
    """The nonzero activations as a sorted list (the BOS position left out when `skip_bos`)."""
    a = np.asarray(jax.device_get(acts))
    if skip_bos:
        a = a.copy()
        a[0] = 0.0
    pos, layer, index = np.nonzero(a)
    order = np.lexsort((index, pos, layer))
    pos, layer, index = pos[order], layer[order], index[order]
    return ActiveFeatures(layer.astype(np.int32), pos.astype(np.int32), index.astype(np.int32),
                          a[pos, layer, index])


def prefix(rm: LocalReplacement, n: int) -> LocalReplacement:
    """The replacement restricted to the first `n` positions (static). The model is causal, so
    every value at a position < n, and every gradient of such a value, is the same as in `rm`."""
    fr = rm.frozen

    def cut(name: str, a):
        if a is None:
            return None
        if name == "attn_pattern":  # [layer batch head qpos kpos]
            return a[..., :n, :n]
        if name == "final_norm_scale":  # [batch pos]
            return a[:, :n]
        return a[:, :, :n]  # [layer batch pos ...]

    frozen = Capture(**{f: cut(f, getattr(fr, f)) for f in FREEZABLE})
    return LocalReplacement(
        tokens=rm.tokens[:n], embeds=rm.embeds[:n], frozen=frozen, inputs=rm.inputs[:, :n],
        mlp_out=rm.mlp_out[:, :n], recon=rm.recon[:, :n], mlp_sub=rm.mlp_sub[:, :n],
        error=rm.error[:, :n], last_logits=rm.last_logits)


# --- the frozen linear model ---------------------------------------------------------------------
def _layer_frozen(rm: LocalReplacement, layer) -> dict:
    return {k: getattr(rm.frozen, k)[layer] for k in _LAYER_FROZEN
            if getattr(rm.frozen, k) is not None}


def linear_block(rm: LocalReplacement, params: LMParams, model_cfg: ModelConfig,
                 tc_cfg: TranscoderConfig, tc_params: TranscoderParams, layer,
                 x: Float[Array, "1 pos d_model"], m_sub: Float[Array, "1 pos d_model"],
                 value_delta: Float[Array, "1 pos kv_head head_dim"] | None = None):
    """Block `layer` (may be traced) of the frozen linear model: (resid_pre, MLP substitution) ->
    (resid_post, transcoder input at this layer). Affine in (x, m_sub). `value_delta` is added to
    the attention's values (a zero one: its VJP is the gradient at the values, `value_rows`)."""
    lp = jax.tree.map(lambda a: a[layer], params.layers)
    fr = _layer_frozen(rm, layer)
    skip = None if tc_params.W_skip is None else tc_params.W_skip[layer].astype(x.dtype)

    def mlp_fn(resid_mid, mlp_in):
        # The MLP is gone: its slot takes the substitution, plus the skip connection, which stays
        # live because it is linear in the transcoder input (see the module docstring).
        if skip is None:
            return m_sub
        return m_sub + tc_cfg.read(resid_mid, mlp_in) @ skip

    # Patterns are frozen, so RoPE tables and masks are never read: queries and keys are dead code.
    dummy = jnp.zeros(x.shape[:2] + (model_cfg.head_dim,), jnp.float32)
    x_next, caps, _ = block(lp, model_cfg, x, dummy, dummy, None, fr, ("resid_mid", "mlp_in"),
                            mlp_fn=mlp_fn, value_delta=value_delta)
    return x_next, tc_cfg.read(caps["resid_mid"], caps["mlp_in"])


def value_rows(rm: LocalReplacement, params: LMParams, model_cfg: ModelConfig, layer: int,
               x: Float[Array, "n d_model"], pos: Int[Array, " n"]
               ) -> Float[Array, "n kv_dim"]:
    """What residual vectors x (one per row, at positions `pos`) add to block `layer`'s attention
    values under the frozen norm scale: the linear part of `linear_block`'s path from its input to
    the values, flattened to [n, kv_heads * head_dim].

    Without a skip connection, the gradient at MLP slot t is the one at slot t + 1 plus what
    block t + 1's attention sends back through its values (patterns are frozen, the MLPs are
    constants), so a write x into slot t meets the gradients above it through value_rows(t + 1,
    x) (`attribution.trace._edges_by_values`)."""
    # The layer's weights are cut here, not in the jitted part: with the whole model as an
    # argument a call took 5-10x longer.
    lp = jax.tree.map(lambda a: a[layer], params.layers)
    return _value_rows(lp, model_cfg, rm.frozen.attn_norm_scale[layer][0], x, pos)


@partial(jax.jit, static_argnames=("model_cfg",))
def _value_rows(lp, model_cfg: ModelConfig, scale, x, pos):
    def affine(x, scale):
        return attn_values(lp, attn_input(lp, model_cfg, x, scale)[0]).reshape(x.shape[0], -1)

    # A zero input gives the biases alone, whatever the scale: one row of them.
    return affine(x, scale[pos]) - affine(jnp.zeros_like(x[:1]), scale[:1])


def read_rows(rm: LocalReplacement, params: LMParams, model_cfg: ModelConfig,
              tc_cfg: TranscoderConfig, layer, vec: Float[Array, "n d_model"],
              pos: Int[Array, " n"]) -> Float[Array, "n d_model"]:
    """Targets' vectors at layer `layer`'s (may be traced) transcoder input (one per row, at
    positions `pos`), taken back to the residual stream before the layer's attention along the
    residual path only (the attention held fixed): the transpose of what `linear_block` reads
    from its input without going through the attention's values, under the frozen norm scale.
    The rest of a target's gradient there goes through the values (`value_rows`;
    `attribution.trace._edges_by_values`)."""
    lp = jax.tree.map(lambda a: a[layer], params.layers)
    scale = rm.frozen.mlp_norm_scale[layer][0] if rm.frozen.mlp_norm_scale is not None else None
    return _read_rows(lp, model_cfg, tc_cfg, scale, vec, pos)


@partial(jax.jit, static_argnames=("model_cfg", "tc_cfg"))
def _read_rows(lp, model_cfg: ModelConfig, tc_cfg: TranscoderConfig, scale, vec, pos):
    def read(x):  # the residual (after the fixed attention) -> the transcoder input
        return tc_cfg.read(x, mlp_input(lp, model_cfg, x, None if scale is None else scale[pos])[0])

    _, back = jax.vjp(read, jnp.zeros_like(vec))
    return back(vec)[0]


def final_hidden(rm: LocalReplacement, params: LMParams, model_cfg: ModelConfig,
                 x: Float[Array, "1 pos d_model"]) -> Float[Array, "1 pos d_model"]:
    """The final norm with its frozen scale: the vector logit directions are read from."""
    h, _ = norm(x, params.final_norm_w, params.final_norm_b, model_cfg, rm.frozen.final_norm_scale)
    return h


# The weights `linear_block` and `final_hidden` never read: the MLPs (their slot takes the
# substitution), the embedding and unembedding (the embeddings are in rm.embeds, the logit
# directions are computed before the sweep).
_UNSWEPT_LAYER = ("W_in", "W_gate", "W_out", "b_in", "b_out", "post_mlp_norm_w")
_UNSWEPT = ("embed", "pos_embed", "unembed")


def sweep_params(params: LMParams) -> LMParams:
    """The model weights the linear sweep reads (`linear_block`, `final_hidden`); the rest None.
    A row maker holding only these lets the other ~80% of a model's weights go once the
    forward pass is done (`release_unswept`)."""
    layers = dataclasses.replace(params.layers, **dict.fromkeys(_UNSWEPT_LAYER))
    return dataclasses.replace(params, layers=layers, **dict.fromkeys(_UNSWEPT))


def _unswept(params: LMParams, keep=()) -> list:
    """`params`' live arrays the sweep never reads, none of them also in the pytrees `keep`."""
    kept = {id(a) for a in jax.tree.leaves((sweep_params(params), keep))}
    return [a for a in jax.tree.leaves(params)
            if isinstance(a, jax.Array) and id(a) not in kept and not a.is_deleted()]


def unswept_bytes(params: LMParams) -> int:
    """Bytes `release_unswept` frees (the planner's prediction for a single trace)."""
    return sum(a.nbytes for a in _unswept(params))


def release_unswept(params: LMParams, *keep) -> int:
    """Free the device buffers of `params`' weights that the sweep never reads (`sweep_params`),
    leaving alone any array also held in the pytrees `keep`. The caller's `params` cannot run a
    forward pass afterwards: for a model used once (a single `cltrace trace`). Returns bytes
    freed."""
    arrays = _unswept(params, keep)
    for a in arrays:
        a.delete()
    return sum(a.nbytes for a in arrays)


def linear_forward(rm: LocalReplacement, params: LMParams, model_cfg: ModelConfig,
                   tc_cfg: TranscoderConfig, tc_params: TranscoderParams,
                   embeds: Float[Array, "pos d_model"], mlp_sub: Float[Array, "layer pos d_model"]):
    """The whole frozen linear model: (transcoder inputs [layer, pos, d_model], final hidden
    [pos, d_model]). With (rm.embeds, rm.mlp_sub) it reproduces the real model's values."""
    x = embeds[None]
    reads = []
    for layer in range(model_cfg.n_layers):
        x, r = linear_block(rm, params, model_cfg, tc_cfg, tc_params, layer, x,
                            mlp_sub[layer][None])
        reads.append(r[0])
    return jnp.stack(reads), final_hidden(rm, params, model_cfg, x)[0]


# --- the local replacement model itself --------------------------------------------------------
def replacement_logits(rm: LocalReplacement, params: LMParams, model_cfg: ModelConfig,
                       tc_cfg: TranscoderConfig, tc_params: TranscoderParams,
                       ) -> Float[Array, "pos vocab"]:
    """Logits of the local replacement model (frozen patterns, norms and errors; live features).
    On the prompt it was built from, these equal the real model's logits."""
    hook = SplicedTranscoder(tc_cfg, errors=True)
    hp = (tc_params, rm.mlp_out[:, None], rm.recon[:, None], jnp.arange(rm.tokens.shape[0]))
    logits, _ = forward(params, model_cfg, rm.tokens[None], frozen=rm.frozen, mlp_hook=hook,
                        hook_params=hp)
    return logits[0]


def prompt_ids(model, prompt: str) -> list[int]:
    """A prompt's token ids for a loaded model, its BOS prepended; one-line errors for an empty
    or too long prompt."""
    from clt.configs import ConfigError

    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    ids, _ = prepend_bos(model.cfg, model.tokenizer.encode(prompt, add_bos=False))
    if len(ids) > model.cfg.max_position:
        raise ConfigError(f"the prompt has {len(ids)} tokens but the model's context is "
                          f"{model.cfg.max_position}; shorten it")
    return ids


def prepend_bos(model_cfg: ModelConfig, ids: list[int]) -> tuple[list[int], bool]:
    """The token ids with the model's BOS in front (once); whether position 0 is a BOS."""
    if model_cfg.bos_token_id is None:
        return list(ids), False
    if ids and ids[0] == model_cfg.bos_token_id:
        return list(ids), True
    return [model_cfg.bos_token_id] + list(ids), True


__all__ = [
    "ActiveFeatures",
    "LocalReplacement",
    "active_features",
    "build",
    "build_neurons",
    "final_hidden",
    "linear_block",
    "linear_forward",
    "prefix",
    "prepend_bos",
    "prompt_ids",
    "replacement_logits",
]
