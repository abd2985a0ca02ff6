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

With a residual-stream SAE (`TranscoderConfig.is_sae`) in place of a transcoder, edits run in
free mode only: the SAE is spliced at the edited layers with its error recomputed on the run
(`clt.splice`), so the residual stream before that layer's MLP changes by exactly (new - old
activation) x the feature's decoder row, and everything downstream recomputes. An edit's value
may be a multiple of the feature's maximum activation on its feature card (`--set L:F=10x`, the
"clamp a feature to 10x its maximum" experiment of Templeton et al. 2024; `resolve_multiples`).

Steering adds a vector to the residual stream after a layer's block, along a feature's decoder
direction or a difference of mean residuals between two prompt sets (the "function vector" /
refusal-direction method, Todd et al. 2024, Arditi et al. 2024). `cltrace steer --alpha` has a
unit (`STEER_UNIT`, `steering_vector`): the direction is normalised and scaled to alpha times the
prompt's mean residual norm after that block, so alpha = 0.5 is the same relative push at any
layer and for any vector, whatever its raw norm.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

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
    of_max: bool = False  # value is a multiple of the feature's maximum activation (its card)

    def check(self, tc_cfg: TranscoderConfig, n_pos: int | None = None) -> None:
        tc_cfg.layer_index(self.layer)  # a model layer the dictionaries cover
        if not 0 <= self.feature < tc_cfg.n_features:
            raise ConfigError(f"feature {self.feature} does not exist: layer {self.layer} has "
                              f"features 0..{tc_cfg.n_features - 1}")
        if self.pos is not None and n_pos is not None and not 0 <= self.pos < n_pos:
            raise ConfigError(f"position {self.pos} out of range: the prompt has positions "
                              f"0..{n_pos - 1} (BOS = 0)")

    def apply(self, col, positions):
        """The edited activations of this feature, col [..., pos], at `positions` [pos]."""
        if self.of_max:
            raise ConfigError(f"edit {edit_spec(self)} is a multiple of the feature's maximum "
                              "activation: resolve it from its card first (resolve_multiples)")
        if self.pos is None:
            sel = jnp.ones(positions.shape, bool)
        else:
            sel = positions >= self.pos if self.onwards else positions == self.pos
        new = {"set": jnp.full_like(col, self.value), "scale": col * self.value,
               "add": col + self.value}[self.op]
        return jnp.where(sel, new, col)


# A number as Python writes it (no nan / inf: an edit's value must be finite).
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_WHERE = r"(?:@(all|\d+[+:]?))?"
_EDIT = re.compile(rf"^\s*(\d+):(\d+){_WHERE}\s*([=*+])\s*({_NUMBER})(x?)\s*$")
_FLAG_EDIT = re.compile(rf"^\s*(\d+):(\d+){_WHERE}\s*=\s*({_NUMBER})(x?)\s*$")
_FLAG_ZERO = re.compile(rf"^\s*(\d+):(\d+){_WHERE}\s*$")
_OPS = {"=": "set", "*": "scale", "+": "add"}
_SYNTAX = "POS: a position (BOS = 0), P+ for P and every later one, or all; omitted = all"
_FLAG_SYNTAX = {"set": "LAYER:FEATURE[@POS]=VALUE[x]", "scale": "LAYER:FEATURE[@POS]=FACTOR",
                "add": "LAYER:FEATURE[@POS]=DELTA[x]", "zero": "LAYER:FEATURE[@POS]"}


def parse_edit(spec: str, flag: Literal["set", "scale", "add", "zero"] | None = None
               ) -> FeatureEdit:
    """One feature edit. With no `flag`: `L:F@POS=V` (set), `L:F@POS*V` (scale), `L:F@POS+V`
    (add). With the `cltrace steer` flag that carries it: `--set/--scale/--add L:F@POS=V`, or
    `--zero L:F@POS`. POS is a position (BOS = 0), `P+` or `P:` for P and every later position
    (generation included), or `all`; omitted = all. V is a finite number; `Nx` (set and add)
    means N times the feature's maximum activation on its card (`resolve_multiples`). Anything
    else (e.g. `3:5@1==2`) is refused with the accepted syntax, never read another way."""
    if not isinstance(spec, str):
        raise ConfigError(f"intervention {spec!r} must be a string like 3:5@1=2")
    if flag is None:
        m = _EDIT.match(spec)
        syntax = (f"LAYER:FEATURE[@POS]=VALUE (or *FACTOR, +DELTA; VALUE or DELTA Nx: N times "
                  f"the feature's max activation; {_SYNTAX})")
    elif flag in _FLAG_SYNTAX:
        m = (_FLAG_ZERO if flag == "zero" else _FLAG_EDIT).match(spec)
        syntax = f"--{flag} {_FLAG_SYNTAX[flag]} ({_SYNTAX})"
    else:
        raise ConfigError(f"unknown edit kind {flag!r}; one of {list(_FLAG_SYNTAX)}")
    if not m:
        raise ConfigError(f"cannot parse intervention {spec!r}; write {syntax}")
    multiple = ""
    if flag is None:
        layer, feature, where, sym, value, multiple = m.groups()
        op = _OPS[sym]
    elif flag == "zero":
        (layer, feature, where), op, value = m.groups(), "set", "0"
    else:
        (layer, feature, where, value, multiple), op = m.groups(), flag
    if multiple and op == "scale":
        raise ConfigError(f"intervention {spec!r}: a scale factor is already relative; Nx (N "
                          "times the feature's max activation) applies to set and add values")
    onwards = bool(where) and where[-1] in "+:"
    pos = None if where in (None, "all") else int(where.rstrip("+:"))
    v = float(value)
    if not math.isfinite(v):  # 1e999 parses as inf
        raise ConfigError(f"intervention {spec!r}: the value must be a finite number")
    return FeatureEdit(int(layer), int(feature), pos, op, v, onwards, bool(multiple))


def edit_spec(e: FeatureEdit) -> str:
    """The one `parse_edit` spec (no flag) that gives back `e` exactly (onwards written P:)."""
    where = "all" if e.pos is None else f"{e.pos}{':' if e.onwards else ''}"
    sym = {v: k for k, v in _OPS.items()}[e.op]
    return f"{e.layer}:{e.feature}@{where}{sym}{e.value!r}{'x' if e.of_max else ''}"


def resolve_multiples(edits: tuple[FeatureEdit, ...], max_activation, source: str = "cards",
                      tc_cfg: TranscoderConfig | None = None) -> tuple[FeatureEdit, ...]:
    """Edits whose value is a multiple of the feature's maximum activation (`Nx`) made absolute:
    value = N x max_activation[layer, feature] (an array [layer, feature], e.g. the top
    activation of every feature's card; with `tc_cfg`, its rows are that transcoder's
    dictionaries and an edit's model layer is found among them). One-line errors for a feature
    the maxima do not cover or that never fired in them (a maximum of 0 scales to nothing)."""
    out = []
    for e in edits:
        if not e.of_max:
            out.append(e)
            continue
        L, F = np.shape(max_activation)
        row = e.layer if tc_cfg is None else tc_cfg.layer_index(e.layer)
        if not (0 <= row < L and 0 <= e.feature < F):
            raise ConfigError(f"edit {edit_spec(e)}: the {source} cover {L} layers x {F} "
                              f"features; no maximum for feature {e.layer}:{e.feature}")
        m = float(max_activation[row][e.feature])
        if not (math.isfinite(m) and m > 0):
            raise ConfigError(f"edit {edit_spec(e)}: feature {e.layer}:{e.feature} never fired "
                              f"in the {source}' scan (maximum {m}); give an absolute value")
        out.append(dataclasses.replace(e, value=e.value * m, of_max=False))
    return tuple(out)


# --- command configs ---------------------------------------------------------------------------
def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _finite(cls: str, name: str, value: float) -> None:
    _need(math.isfinite(value), f"{cls}.{name} must be a finite number, got {value!r}")


def _at_least(cls: str, name: str, value: int, low: int, high: int | None = None) -> None:
    rng = f">= {low}" if high is None else f"in {low}..{high}"
    _need(value >= low and (high is None or value <= high),
          f"{cls}.{name} must be {rng}, got {value!r}")


def _nonempty(cls: str, name: str, value: str | None, optional: bool = False) -> None:
    if value is None and optional:
        return
    _need(isinstance(value, str) and value.strip() != "",
          f"{cls}.{name} must be a non-empty string, got {value!r}")


_ALPHA = 0.25  # the default steering strength, in STEER_UNIT
_FEATURE_REF = re.compile(r"^\s*(\d+):(\d+)\s*$")
STEER_UNIT = ("the mean norm of the residual stream after block LAYER over the prompt's "
              "positions (BOS excluded), on the unsteered prompt")


@dataclass(frozen=True)
class SteerConfig:
    """`cltrace steer`: feature edits, or a steering direction (not both), on one prompt."""

    prompt: str = doc("The text to run.", positional=True)
    model: str = doc("Model name or path.", default="smollm2-135m")
    transcoder: str | None = doc(
        "Transcoder for feature edits (default: the one bundled for the model).", default=None)
    set: tuple[str, ...] = doc(
        "Set a feature's activation (repeatable); V may be Nx: N times the feature's maximum "
        "activation on its card (--cards).", default=(), repeat=True, metavar="L:F@POS=V")
    scale: tuple[str, ...] = doc("Scale a feature's activation (repeatable).", default=(),
                                 repeat=True, metavar="L:F@POS=V")
    add: tuple[str, ...] = doc("Add to a feature's activation (repeatable; V may be Nx, as for "
                               "--set).", default=(), repeat=True, metavar="L:F@POS=V")
    zero: tuple[str, ...] = doc("Zero a feature's activation (repeatable).", default=(),
                                repeat=True, metavar="L:F@POS")
    neurons: bool = doc(
        "Edit the model's own MLP neurons instead of transcoder features: L:F is layer L's "
        "hidden unit F (as `cltrace trace --neurons` names nodes), its activation before the "
        "down-projection; free mode, no transcoder.", default=False)
    cards: str | None = doc(
        "Feature cards (`cltrace features`) giving each feature's maximum activation, for "
        "values written Nx (default: feature_cards.npz beside the transcoder).", default=None)
    mode: Literal["free", "frozen"] = doc(
        "free: downstream features and attention recompute (errors kept); frozen: patterns, "
        "norms, errors and other features fixed (direct effects, = graph edges; next token "
        "only).", default="free")
    vector: str | None = doc("Steer with this direction (.npy [d_model]; only its direction "
                             "counts, --alpha sets the size).", default=None)
    feature_direction: str | None = doc(
        "Steer along feature F of layer L's decoder into layer L.", default=None, metavar="L:F")
    layer: int | None = doc("Steering: add the direction after this block (0 = the first).",
                            default=None)
    alpha: float = doc(
        "Steering strength in units of the residual's own size: the added vector is the unit "
        "direction times alpha times " + STEER_UNIT + " (1 = as large as the residual itself; "
        "negative steers away; about 0.1-0.4 shifts the text and keeps it coherent).",
        default=_ALPHA)
    from_pos: int = doc("Steering: from this prompt position on (BOS = 0; generated positions "
                        "are always steered).", default=0)
    max_new_tokens: int = doc("Tokens to generate for the side-by-side continuations.",
                              default=20)
    k: int = doc("Top-k next tokens to show.", default=5)
    out: str | None = doc("Also write the comparison as JSON.", default=None)

    def __post_init__(self):
        c = "SteerConfig"
        # "" here; a prompt of only spaces is refused once tokenised (`prompt_ids`): a command
        # line copied from a page may legitimately quote one (viewer.names).
        _need(self.prompt != "", f"{c}.prompt must be a non-empty string, got ''")
        _nonempty(c, "model", self.model)
        _nonempty(c, "transcoder", self.transcoder, optional=True)
        _nonempty(c, "vector", self.vector, optional=True)
        _nonempty(c, "cards", self.cards, optional=True)
        _nonempty(c, "out", self.out, optional=True)
        _at_least(c, "k", self.k, 1)
        _at_least(c, "max_new_tokens", self.max_new_tokens, 0)
        _finite(c, "alpha", self.alpha)
        _at_least(c, "from_pos", self.from_pos, 0)
        if self.layer is not None:
            _at_least(c, "layer", self.layer, 0)
        if self.feature_direction is not None:
            _need(bool(_FEATURE_REF.match(self.feature_direction)),
                  f"{c}.feature_direction must be LAYER:FEATURE (e.g. 12:345), got "
                  f"{self.feature_direction!r}")
        edits = self.edits()  # malformed edit specs are refused here, before any model loads
        steering = self.steering
        _need(not (self.vector is not None and self.feature_direction is not None),
              f"{c}: give one steering direction, --vector or --feature-direction, not both")
        _need(not (edits and steering),
              f"{c}: feature edits (--set/--scale/--add/--zero) and steering (--vector / "
              "--feature-direction) cannot be combined in one run; run them one at a time")
        _need(bool(edits) or steering, "nothing to do: give feature edits (--set/--scale/--add/--zero) "
              "or a direction (--vector / --feature-direction with --layer)")
        if self.neurons:
            _need(bool(edits), f"{c}.neurons applies to edits (--set/--scale/--add/--zero); "
                  "steering directions do not read neurons")
            _need(self.transcoder is None, f"{c}: --neurons edits the model's own MLP units; "
                  "drop --transcoder")
            _need(self.mode == "free", f"{c}: --neurons edits run in free mode (drop --mode "
                  "frozen; a neuron graph's edges are the frozen effects)")
            _need(not any(e.of_max for e in edits), f"{c}: values written Nx read a "
                  "transcoder's feature cards; give neuron edits absolute values")
        if steering:
            _need(self.layer is not None,
                  f"{c}: steering needs --layer (the block after which to add the direction)")
            _need(self.mode == "free", f"{c}.mode frozen applies to feature edits only; "
                  "steering always recomputes the model (drop --mode frozen)")
        else:
            for name, default in (("layer", None), ("alpha", _ALPHA), ("from_pos", 0)):
                _need(getattr(self, name) == default,
                      f"{c}.{name} applies only to steering (--vector / --feature-direction); "
                      "feature edits take their positions from @POS")

    @property
    def steering(self) -> bool:
        return self.vector is not None or self.feature_direction is not None

    def edits(self) -> tuple[FeatureEdit, ...]:
        """Every edit of --set, --scale, --add and --zero, each parsed with its flag's syntax."""
        return tuple(parse_edit(s, flag) for flag in ("set", "scale", "add", "zero")
                     for s in getattr(self, flag))

    def edit_specs(self) -> tuple[str, ...]:
        """Every edit as one flag-free `parse_edit` spec (L:F@POS=V, *FACTOR, +DELTA)."""
        return tuple(edit_spec(e) for e in self.edits())

    def feature_ref(self) -> tuple[int, int] | None:
        """(layer, feature) of --feature-direction."""
        if self.feature_direction is None:
            return None
        layer, feature = _FEATURE_REF.match(self.feature_direction).groups()
        return int(layer), int(feature)


@dataclass(frozen=True)
class DirectionConfig:
    """`cltrace direction`: a difference-of-means steering vector."""

    positive: str = doc("Text file, one prompt per line.")
    negative: str = doc("Text file, one prompt per line.")
    layer: int = doc("Residual stream after this block (0 = the first).")
    out: str = doc("Output .npy file (written exactly there).", short="-o")
    model: str = doc("Model name or path.", default="smollm2-135m")
    position: Literal["last", "mean"] = doc(
        "Which residual of each prompt: last = its last token; mean = the mean over its tokens, "
        "the BOS left out.", default="last")

    def __post_init__(self):
        c = "DirectionConfig"
        for name in ("positive", "negative", "out", "model"):
            _nonempty(c, name, getattr(self, name))
        _at_least(c, "layer", self.layer, 0)
        _need(self.position in ("last", "mean"),
              f"{c}.position must be one of ['last', 'mean'], got {self.position!r}")


@dataclass(frozen=True)
class LensConfig:
    """`cltrace lens`: the logit lens of a prompt."""

    prompt: str = doc("The text to run.", positional=True)
    model: str = doc("Model name or path.", default="smollm2-135m")
    k: int = doc("Top-k tokens per layer and position (at most the vocabulary).", default=3)
    html: str | None = doc("Also write a heatmap page here.", default=None)
    every: int = doc("Show every n-th layer in the table (the output row always).", default=1)

    def __post_init__(self):
        c = "LensConfig"
        _need(self.prompt != "", f"{c}.prompt must be a non-empty string, got ''")
        _nonempty(c, "model", self.model)
        _nonempty(c, "html", self.html, optional=True)
        _at_least(c, "k", self.k, 1)
        _at_least(c, "every", self.every, 1)


# --- free mode -------------------------------------------------------------------------------------
def free_logits(params: LMParams, model_cfg: ModelConfig, tc_cfg: TranscoderConfig,
                tc_params: TranscoderParams, rm: rep.LocalReplacement | None,
                edits: tuple[FeatureEdit, ...], tokens=None) -> Float[Array, "pos vocab"]:
    """Logits of the free-mode intervened model on `tokens` (default: the prompt of `rm`; longer
    token sequences start with that prompt). An SAE needs no replacement model (`rm` None)."""
    tokens = rm.tokens if tokens is None else jnp.asarray(tokens, jnp.int32)
    for e in edits:
        e.check(tc_cfg)
    hook = SplicedTranscoder(tc_cfg, errors=True, edits=tuple(edits))
    if tc_cfg.is_sae:  # the SAE's error is recomputed on the run: no prompt record (rm unused)
        hp = tc_params
    else:
        # The transcoder spliced in, features live and edited, errors frozen at the prompt and
        # the model's own MLP beyond it (generation).
        hp = (tc_params, rm.mlp_out[:, None], rm.recon[:, None], jnp.arange(tokens.shape[0]))
    logits, _ = forward(params, model_cfg, tokens[None], mlp_hook=hook, hook_params=hp)
    return logits[0]


@dataclass(frozen=True)
class NeuronEditHook(MLPHook):
    """Free-mode edits of the model's own MLP neurons (`cltrace steer --neurons`): edit
    (layer, unit) changes that unit's hidden activation (act(gate) * up, or act(up) in a
    non-gated MLP) before the down-projection; everything after it, a post-MLP norm included,
    is recomputed. No hook_params."""

    edits: tuple[FeatureEdit, ...]

    def apply(self, hook_params, layer, resid_mid, mlp_in, state, true_mlp):
        mine = [e for e in self.edits if e.layer == layer]
        if not mine:
            return true_mlp(mlp_in), state
        positions = jnp.arange(mlp_in.shape[-2])

        def edit(hidden):  # [batch, pos, d_mlp]
            for e in mine:
                hidden = hidden.at[..., e.feature].set(e.apply(hidden[..., e.feature], positions))
            return hidden

        return true_mlp(mlp_in, edit), state


def neuron_edit_logits(params: LMParams, model_cfg: ModelConfig,
                       edits: tuple[FeatureEdit, ...], tokens) -> Float[Array, "pos vocab"]:
    """Logits of the model with its MLP neurons edited (`NeuronEditHook`) on `tokens`."""
    tokens = jnp.asarray(tokens, jnp.int32)
    logits, _ = forward(params, model_cfg, tokens[None], mlp_hook=NeuronEditHook(tuple(edits)))
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
    """A feature's decoder row into `target_layer` (default: its own layer); model layers (an
    SAE's on some layers: ones it covers)."""
    FeatureEdit(layer, feature, None).check(tc_cfg)
    s = tc_cfg.layer_index(layer)
    t = s if target_layer is None else tc_cfg.layer_index(target_layer)
    return tcm.decoder_to_layer(tc_cfg, tc_params, s, t)[feature]


def _resid_after(params: LMParams, model_cfg: ModelConfig, ids,
                 layer: int) -> Float[Array, "pos d_model"]:
    """The residual stream after block `layer` (where `SteerHook` adds) of one prompt."""
    if not 0 <= layer < model_cfg.n_layers:
        raise ConfigError(f"layer {layer} out of range 0..{model_cfg.n_layers - 1}")
    _, cap = forward(params, model_cfg, jnp.asarray([ids]), capture=("resid_pre", "resid_final"))
    return cap.resid_pre[layer + 1, 0] if layer + 1 < model_cfg.n_layers else cap.resid_final[0]


def _first_real(model_cfg: ModelConfig, ids: list[int]) -> int:
    """1 when position 0 is the BOS of a longer prompt (an attention sink whose residual is the
    same for every prompt and often many times the others' norm: left out of averages), else 0."""
    return 1 if (len(ids) > 1 and model_cfg.bos_token_id is not None
                 and ids[0] == model_cfg.bos_token_id) else 0


@partial(jax.jit, static_argnames=("model_cfg", "position"))
def _pooled_batch(params: LMParams, model_cfg: ModelConfig, tokens: Int[Array, "batch pos"],
                  lengths: Int[Array, " batch"], first: Int[Array, " batch"],
                  position: str) -> Float[Array, "batch stream d_model"]:
    # Only the captures are returned, so XLA drops the unembedding (for Gemma-3 more FLOPs than
    # the blocks). Right padding changes no real position: attention is causal.
    real = jnp.arange(tokens.shape[1])[None] < lengths[:, None]
    _, cap = forward(params, model_cfg, tokens, attention_mask=real,
                     capture=("resid_pre", "resid_final"))
    streams = jnp.concatenate([cap.resid_pre, cap.resid_final[None]], 0).astype(jnp.float32)
    streams = jnp.moveaxis(streams, 0, 1)  # [batch, stream, pos, d_model]
    if position == "last":
        return jnp.take_along_axis(streams, (lengths - 1)[:, None, None, None], axis=2)[:, :, 0]
    pos = jnp.arange(tokens.shape[1])[None]
    w = (real & (pos >= first[:, None])).astype(jnp.float32)
    w = w / w.sum(1, keepdims=True)
    return jnp.einsum("bp,bspd->bsd", w, streams)


def residual_streams(params: LMParams, model_cfg: ModelConfig, token_lists: list[list[int]],
                     position: Literal["last", "mean"] = "last",
                     batch_size: int = 16) -> Float[np.ndarray, "example stream d_model"]:
    """One vector per prompt at every point of the residual stream: stream 0 is the embedding
    (entering block 0), stream l + 1 the residual after block l (where `SteerHook(l)` adds; the
    last one enters the final norm). `position`: the prompt's last token, or the mean over its
    tokens with a leading BOS left out (`_first_real`). Prompts run in batches, right-padded to
    a multiple of 16 tokens (one compilation per length bucket); the result is in prompt order."""
    if not token_lists:
        raise ConfigError("no prompts to read residuals from")
    if position not in ("last", "mean"):
        raise ConfigError(f"position must be 'last' or 'mean', got {position!r}")
    lengths = np.array([len(t) for t in token_lists])
    if lengths.min() < 1 or lengths.max() > model_cfg.max_position:
        raise ConfigError(f"prompt lengths must be in 1..{model_cfg.max_position} tokens, got "
                          f"{lengths.min()}..{lengths.max()}")
    order = np.argsort(lengths, kind="stable")  # similar lengths share a batch and a bucket
    out = np.zeros((len(token_lists), model_cfg.n_layers + 1, model_cfg.d_model), np.float32)
    B = min(batch_size, len(token_lists))
    for start in range(0, len(order), B):
        rows = order[start:start + B]
        rows_full = np.concatenate([rows, np.repeat(rows[:1], B - len(rows))])  # one batch shape
        T = min(model_cfg.max_position, -(-int(lengths[rows].max()) // 16) * 16)
        tokens = np.zeros((B, T), np.int32)
        for i, r in enumerate(rows_full):
            tokens[i, :lengths[r]] = token_lists[r]
        first = np.array([_first_real(model_cfg, token_lists[r]) for r in rows_full], np.int32)
        pooled = _pooled_batch(params, model_cfg, jnp.asarray(tokens),
                               jnp.asarray(lengths[rows_full], jnp.int32), jnp.asarray(first),
                               position)
        out[rows] = np.asarray(pooled)[:len(rows)]
    return out


def mean_residual(params: LMParams, model_cfg: ModelConfig, token_lists: list[list[int]],
                  layer: int,
                  position: Literal["last", "mean"] = "last") -> Float[Array, " d_model"]:
    """Mean over prompts of the residual stream after block `layer` (each prompt's last token,
    or the mean over its tokens, BOS left out: `residual_streams`)."""
    if not token_lists:
        raise ConfigError("a difference of means needs at least one prompt on each side")
    if not 0 <= layer < model_cfg.n_layers:
        raise ConfigError(f"layer {layer} out of range 0..{model_cfg.n_layers - 1}")
    return jnp.asarray(residual_streams(params, model_cfg, token_lists, position)[:, layer + 1]
                       .mean(0))


def diff_of_means(params, model_cfg, positive: list[list[int]], negative: list[list[int]],
                  layer: int,
                  position: Literal["last", "mean"] = "last") -> Float[Array, " d_model"]:
    """mean residual(positive) - mean residual(negative) after block `layer`."""
    return (mean_residual(params, model_cfg, positive, layer, position)
            - mean_residual(params, model_cfg, negative, layer, position))


def residual_norm(params: LMParams, model_cfg: ModelConfig, ids: list[int], layer: int) -> float:
    """The steering unit (`STEER_UNIT`): the mean L2 norm of the residual stream after block
    `layer` over the prompt's positions, the BOS excluded (an attention sink whose norm is often
    many times the others'), on the unsteered prompt."""
    r = _resid_after(params, model_cfg, ids, layer).astype(jnp.float32)
    return float(jnp.linalg.norm(r[_first_real(model_cfg, ids):], axis=-1).mean())


@dataclass(frozen=True)
class Steering:
    """A steering vector in the stated unit: `vector` = alpha * reference_norm * v / |v|, added
    after block `layer`; what `cltrace steer` reports and writes."""

    vector: Float[np.ndarray, " d_model"]
    layer: int
    alpha: float
    reference_norm: float  # STEER_UNIT on this prompt
    raw_norm: float  # |v| as given (ignored but for its direction)

    def summary(self) -> dict:
        return {"layer": self.layer, "alpha": self.alpha, "unit": STEER_UNIT,
                "reference_norm": self.reference_norm, "raw_vector_norm": self.raw_norm,
                "added_norm": float(np.linalg.norm(self.vector))}


def steering_vector(params: LMParams, model_cfg: ModelConfig, ids: list[int], v, layer: int,
                    alpha: float) -> Steering:
    """`v` [d_model] turned into the vector `cltrace steer --alpha` adds: its unit direction
    times alpha times the prompt's `residual_norm` after `layer`. The same alpha is then the
    same relative push at every layer and for every vector (a difference of means and a decoder
    row differ in norm by orders of magnitude)."""
    v = np.asarray(v, np.float32)
    if v.shape != (model_cfg.d_model,):
        raise ConfigError(f"the steering vector has shape {v.shape}, the model needs "
                          f"({model_cfg.d_model},)")
    raw = float(np.linalg.norm(v))
    if not math.isfinite(raw) or raw == 0:
        raise ConfigError(f"the steering vector has norm {raw}: it has no direction to steer "
                          "along (all zeros, or non-finite entries)")
    if not math.isfinite(alpha):
        raise ConfigError(f"alpha must be a finite number, got {alpha!r}")
    ref = residual_norm(params, model_cfg, ids, layer)
    return Steering((alpha * ref / raw) * v, layer, float(alpha), ref, raw)


def steered_logits(params, model_cfg, tokens, v, layer: int, alpha: float, from_pos: int = 0):
    """Logits [pos, vocab] with alpha * v added as given (no unit: `steering_vector` gives the v
    of `cltrace steer`, which passes alpha = 1) after block `layer` from `from_pos` on."""
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
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
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
    if not 1 <= k <= model_cfg.vocab_size:
        raise ConfigError(f"k must be in 1..{model_cfg.vocab_size} (the vocabulary), got {k!r}")
    _, cap = forward(params, model_cfg, jnp.asarray(tokens)[None],
                     capture=("resid_pre", "resid_final"))
    resid = jnp.concatenate([cap.resid_pre[:, 0], cap.resid_final], axis=0)  # [L+1, pos, d]
    logits, _ = unembed(params, model_cfg, resid)  # the final norm recomputed at every layer
    probs, ids = jax.lax.top_k(jax.nn.softmax(logits, -1), k)
    return np.asarray(ids), np.asarray(probs)


__all__ = [
    "STEER_UNIT",
    "DirectionConfig",
    "FeatureEdit",
    "LensConfig",
    "NeuronEditHook",
    "SteerConfig",
    "SteerHook",
    "Steering",
    "diff_of_means",
    "edit_spec",
    "feature_direction",
    "free_logits",
    "frozen_effects",
    "frozen_logits",
    "greedy_continue",
    "logit_lens",
    "mean_residual",
    "neuron_edit_logits",
    "parse_edit",
    "residual_norm",
    "residual_streams",
    "resolve_multiples",
    "steered_logits",
    "steering_vector",
]
