"""Attribution graphs by batched VJPs through the frozen linear model ("Circuit Tracing", Ameisen
et al., 2025, §2.3; circuit-tracer's `attribute`).

Edge A[target, source] = the direct effect of the source on the target through the frozen linear
model of `attribution.replacement`:
  * feature target (layer l, pos p, feature f): its pre-activation minus bias, W_enc[l][:, f] .
    x_l[p] where x_l is the transcoder input at layer l;
  * logit target (token v): (W_U[:, v] - mean over the vocabulary of W_U) . h_final[last], h_final
    the final norm's output under its frozen scale (before any soft-capping);
  * feature source (s, p', f'): activation x its decoder rows into every layer it writes (all
    later layers for a CLT); error source (t, p'): its error vector; token source p': the
    embedding vector entering block 0 (scaled token embedding plus learned positions, if any).
Since the frozen model is affine, A[t, s] is the target's gradient with respect to each source's
coefficient. A batch of targets is one backward sweep over the layers, from the highest target
layer down (targets sort by layer, so a batch rarely pays for layers above it): at layer l,
`jax.vjp` of that frozen block, `vmap`ped over the batch's cotangents, where each target's
encoder row (or logit direction) is injected at its layer and position. The gradients at every
MLP slot are then contracted with the active features' decoder rows, the error vectors, and the
embeddings, giving whole rows of A. Rows go to host numpy as they are made. The model is causal:
a batch whose targets sit at positions < P runs on the first P positions only (P rounded up to
`position_bucket`), which halves the work on average for long prompts; a full graph's batches go
by prefix, then layer (`attribution.stream.dense_batches`).

Streamed (`adjacency="stream"`, automatic when the dense adjacency would not fit): the rows are
never held. Batches go top layer first, one layer at a time; since every edge points from a lower
layer to a higher one (or to a logit), a target's influence on the logits is final by the time
its row is made, and the row is folded at once into its sources' influence (row-normalised |A|
weighted by the target's influence plus logit probability: `attribution.influence.influence`
computed in one pass), its |A| sum and its error share (the completeness score). What is stored
is the dense graph of the `stream_features` most influential features, their rows made a second
time (`attribution.stream`). The source layout of the decoder contraction is in
`attribution.tiling`.

Every graph carries its replacement and completeness scores, unpruned and pruned at the config's
thresholds (`Graph.scores`, `attribution.prune.score`).

Under `max_feature_nodes`, rows are made for the logits first, then for features in order of
their influence on the logits estimated from the rows made so far, re-ranked every
`update_interval` batches (circuit-tracer's greedy scheme). The graph keeps only the rows and
columns of the features visited.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from attribution import replacement as rep
from attribution.graph import Graph, error_nodes, node_levels
from attribution.hostmem import trim_heap, zeros
from attribution.influence import influence
from attribution.prune import prune, score
from attribution.stream import (
    chunks,
    dense_batches,
    rows_ahead,
    stream,
    use_stream,
    visit_batches,
)
from attribution.tiling import SlotTiles, Sources, position_blocks, split_blocks, value_groups
from clt.configs import ConfigError, doc, to_dict
from clt.io import to_device
from clt.lm.config import ModelConfig
from clt.lm.params import LMParams
from clt.progress import process_seconds, progress_bar
from clt.transcoder import TranscoderConfig, TranscoderParams, check_model


@dataclass(frozen=True)
class TraceConfig:
    """How to trace one prompt; saved as `config.json` beside every graph."""

    prompt: str = doc("The text whose next token is explained.")
    model: str = doc("Model name or path (see `cltrace models`).", default="smollm2-135m")
    transcoder: str = doc(
        "Transcoder: a cltrace directory, a circuit-tracer layout directory, or a Hugging Face "
        "repo in that layout; empty: the one bundled for the model (smollm2-135m).", default="")
    target: tuple[str, ...] = doc(
        "Attribute this next token instead of the most probable ones (one token, e.g. "
        "' basketball'; repeat the flag for more). The targets weigh equally in influence.",
        default=(), repeat=True, metavar="TOKEN")
    minus: tuple[str, ...] = doc(
        "With --target: attribute the logit difference target - minus (why ' Austin' beats "
        "' Dallas'); one per target, or one for every target.", default=(), repeat=True,
        metavar="TOKEN")
    target_vector: str = doc(
        "A .npy file holding a [d_model] direction: attribute the final norm's output at the "
        "last position projected on it (instead of logits).", default="")
    max_n_logits: int = doc("At most this many logit nodes.", default=10)
    desired_logit_prob: float = doc(
        "Logit nodes: the most probable next tokens until their probabilities add up to this.",
        default=0.95)
    max_feature_nodes: int | None = doc(
        "Keep at most this many feature nodes, chosen greedily by influence on the logits; None "
        "keeps every active feature.", default=None)
    batch_size: int = doc(
        "Targets per backward sweep; 0: automatic, 64 under max_feature_nodes (the greedy visit "
        "re-ranks the features every update_interval batches) and 256 otherwise (a full or "
        "streamed graph's rows do not depend on it, and bigger batches bring the decoder "
        "contraction nearer the matmul peak). Reduced automatically so the per-batch gradients "
        "stay under `batch_memory_gb`.", default=0)
    batch_memory_gb: float = doc("Budget for one batch's gradients at every layer.", default=1.0)
    decoder_rows_gb: float | None = doc(
        "Memory for the active features' decoder rows laid out MLP slot by slot, made once "
        "before the first row: the decoder contraction then runs as one wide product per slot "
        "over all the features writing it. When they need more (many active features), on a "
        "mesh, or for a prompt longer than 16 positions (or position_bucket), each batch gathers "
        "the rows it reads instead: slower, no extra memory. None: as much as the transcoder's "
        "decoder weights take (the layout at most doubles them), and at least 0.5 GB; 0 turns "
        "the layout off.", default=None)
    value_contraction: Literal["auto", "on", "off"] = doc(
        "With the slot layout, for a transcoder without a skip connection: contract each "
        "feature's cumulative decoder write, as the next layer's attention values see it "
        "(kv_heads x head_dim wide: a third of d_model on SmolLM2), with the gradient at those "
        "values, instead of every decoder row with the gradient at every later layer. The same "
        "edges (exact algebra, `_edges_by_values`) for fewer FLOPs on a cross-layer transcoder. "
        "auto: when it counts fewer FLOPs; on: whenever it applies; off: never.",
        default="auto")
    dtype: Literal["float32", "bfloat16", "float64"] = doc(
        "Compute dtype of the backward sweeps; rows are stored as float32 (float64 under "
        "float64, which needs jax_enable_x64: for reference checks).", default="float32")
    matmul_precision: Literal["highest", "default"] = doc(
        "float32 matrix products on an accelerator. highest: in float32 (the edges match "
        "float64 interventions and circuit-tracer's float32 graphs to ~1e-6 of each row's "
        "largest edge). default: the device's fast mode, TensorFloat-32 on NVIDIA GPUs since "
        "Ampere (10-bit mantissas: ~1e-3 relative, several times faster). The same on a CPU; "
        "bfloat16 and float64 products are unaffected.", default="highest")
    adjacency: Literal["auto", "dense", "stream"] = doc(
        "dense: keep every row, the whole adjacency (it grows with the square of the active "
        "features). stream: fold each batch of rows, as it is made, into every node's influence "
        "and the graph scores (exact, computed top layer first so each target's influence is "
        "final when its row is made), then keep a dense graph of the `stream_features` most "
        "influential features (their rows made again): memory grows with the nodes, not their "
        "square. auto: dense when it fits under max_adjacency_gb, else stream. Ignored under "
        "max_feature_nodes.", default="auto")
    stream_features: int = doc(
        "Under stream: the features kept in the stored graph, the most influential; the "
        "graph also holds every error, token and logit node and the full graph's influences, "
        "|A| row sums and scores.", default=8192)
    position_bucket: int = doc(
        "A batch of targets at positions < P needs the first P positions only (the model is "
        "causal): each batch runs on the shortest such prefix, P rounded up to a multiple of "
        "this (one compilation per distinct P). 0: automatic: with the decoder rows laid out "
        "(decoder_rows_gb), the prompt in up to 4 blocks, as many as each layer has batches of "
        "features; else prompt length / 8, at least 16. The prompt length or more: always the "
        "whole prompt.", default=0)
    offload: bool = doc(
        "Keep the dense adjacency in host memory (numpy), filling it batch by batch; otherwise it "
        "is assembled on the accelerator and copied at the end.", default=True)
    max_adjacency_gb: float = doc(
        "Largest dense adjacency held: beyond it, auto streams, and dense (or a stream whose "
        "stored graph would still exceed it) is refused with a one-line error.", default=16.0)
    update_interval: int = doc(
        "Under max_feature_nodes: batches between re-rankings of the remaining features.",
        default=4)
    node_threshold: float = doc("Pruning: keep nodes up to this share of influence.", default=0.8)
    edge_threshold: float = doc("Pruning: keep edges up to this share of influence.", default=0.98)
    neurons: bool = doc(
        "Trace the model's own MLP neurons instead of a transcoder's features (each MLP "
        "linearised at the prompt: its units' nonlinear factors frozen; attribution.neurons): "
        "no transcoder needed.", default=False)
    neuron_top_k: int = doc(
        "With neurons: the units of each layer and position kept as nodes (the largest writes); "
        "the rest of each MLP's output is folded into that layer and position's 'other neurons' "
        "(error) node. 0: every unit.", default=32)
    mesh_data: int = doc(
        "Devices along the mesh's 'data' axis: each batch of rows is split over them (-1: all "
        "devices left). 1 x 1 traces on one device.", default=1)
    mesh_feature: int = doc(
        "Devices along the mesh's 'feature' axis: the transcoder's features (and the "
        "vocabulary of the embedding and unembedding) are split over them, by the training's "
        "logical-axis rules (clt.sharding).", default=1)
    save_full: bool = doc(
        "Store every node and edge in graph.npz; by default it holds the graph pruned at "
        "node_threshold / edge_threshold, with every node's full-graph influence and activation "
        "(a few MB instead of hundreds).", default=False)
    schema_version: int = doc("Version of this config's JSON layout.", default=1)

    def __post_init__(self):
        for name in ("max_n_logits", "update_interval", "stream_features"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TraceConfig.{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 0:
            raise ConfigError(f"TraceConfig.batch_size must be >= 0 (0: automatic), got "
                              f"{self.batch_size}")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise ConfigError("TraceConfig.max_feature_nodes must be >= 0 or None")
        for name in ("desired_logit_prob", "node_threshold", "edge_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"TraceConfig.{name} must be in (0, 1], got "
                                  f"{getattr(self, name)}")
        if self.position_bucket < 0:
            raise ConfigError("TraceConfig.position_bucket must be >= 0 (0: automatic)")
        for name in ("batch_memory_gb", "max_adjacency_gb"):
            v = getattr(self, name)
            if not (0 < v < float("inf")):  # NaN fails this too
                raise ConfigError(f"TraceConfig.{name} must be a positive number of GB, got {v}")
        if self.decoder_rows_gb is not None and not (0 <= self.decoder_rows_gb < float("inf")):
            raise ConfigError(f"TraceConfig.decoder_rows_gb must be >= 0 GB, got "
                              f"{self.decoder_rows_gb}")
        if self.value_contraction not in ("auto", "on", "off"):
            raise ConfigError(f"TraceConfig.value_contraction must be auto, on or off, got "
                              f"{self.value_contraction!r}")
        if self.matmul_precision not in ("highest", "default"):
            raise ConfigError(f"TraceConfig.matmul_precision must be highest or default, got "
                              f"{self.matmul_precision!r}")
        if self.neuron_top_k < 0:
            raise ConfigError(f"TraceConfig.neuron_top_k must be >= 0 (0: every unit), got "
                              f"{self.neuron_top_k}")
        if self.neurons and self.transcoder:
            raise ConfigError("TraceConfig: neurons traces the model's own MLP units; give "
                              "--neurons or --transcoder, not both")
        for name in ("mesh_data", "mesh_feature"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and v != -1):
                raise ConfigError(f"TraceConfig.{name} must be a positive number of devices or "
                                  f"-1 (all left), got {v!r}")
        if self.mesh_data == -1 and self.mesh_feature == -1:
            raise ConfigError("TraceConfig: only one of mesh_data / mesh_feature may be -1")
        if self.minus and not self.target:
            raise ConfigError("TraceConfig.minus needs a target: --target A --minus B attributes "
                              "the logit difference A - B")
        if self.minus and len(self.minus) not in (1, len(self.target)):
            raise ConfigError(f"TraceConfig.minus: give one token, or one per target "
                              f"({len(self.target)}), got {len(self.minus)}")
        if self.target and self.target_vector:
            raise ConfigError("TraceConfig: give target tokens or a target_vector, not both")
        if len(set(self.target)) != len(self.target):
            raise ConfigError(f"TraceConfig.target: a token is repeated in {list(self.target)}")
        if any(not t for t in self.target + self.minus):
            raise ConfigError("TraceConfig.target / minus: an empty string is no token")
        if self.target_vector and not self.target_vector.endswith(".npy"):
            raise ConfigError(f"TraceConfig.target_vector must be a .npy file, got "
                              f"{self.target_vector!r}")


# --- targets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Targets:
    """The nodes whose inputs the graph explains: the most probable next tokens (`logits`), or
    what the user chose (`TraceConfig.target` / `minus` / `target_vector`, resolved to ids by
    `resolve_targets`). Each target is a direction read off the final norm's output at the last
    position: a token's unembedding column minus the vocabulary mean (its logit, centred), the
    difference of two columns (a logit difference), or a given vector."""

    tokens: tuple[int, ...] = ()  # user-chosen tokens
    minus: tuple[int, ...] = ()  # one per token, or one for all: logit differences
    vector: tuple[float, ...] = ()  # [d_model] direction; its name is `vector_name`
    vector_name: str = "vector"

    @property
    def custom(self) -> bool:
        return bool(self.tokens or self.vector)


def logit_direction(W_U, plus, minus=None):
    """[n, d_model] directions of logit targets: unembedding columns `plus` minus the vocabulary
    mean (a centred logit, before soft-capping), or minus the columns `minus` (a difference)."""
    W = jnp.asarray(W_U)
    W = W.astype(jnp.promote_types(W.dtype, jnp.float32))
    # The callers' index arrays copied (`to_device`), and two programs, where eager ops lower
    # one each. The mean is a program of its own: fused with the gather, XLA sums in another
    # order (the directions moved by an ulp).
    if minus is None:
        return _columns_minus(W, to_device(plus, np.int32), _row_mean(W), None)
    return _columns_minus(W, to_device(plus, np.int32), None, to_device(minus, np.int32))


_row_mean = jax.jit(partial(jnp.mean, axis=1))


@jax.jit
def _columns_minus(W, plus, mean, minus):
    """Columns `plus` of W [n, d] minus the row `mean` [d], or (mean None) minus columns
    `minus`."""
    return W[:, plus].T - (mean[None] if minus is None else W[:, minus].T)


def select_logits(last_logits, W_U, max_n_logits: int, desired_prob: float):
    """(token ids, probabilities, directions [n, d_model]) of the logit nodes: the most probable
    tokens until their cumulative probability reaches `desired_prob`, at most `max_n_logits`."""
    probs = _probs(last_logits)
    order = np.argsort(-probs, kind="stable")[:max_n_logits]
    cum = np.cumsum(probs[order])
    n = min(int(np.searchsorted(cum, desired_prob)) + 1, len(order))
    toks = order[:n].astype(np.int32)
    return toks, probs[toks].astype(np.float32), logit_direction(W_U, toks)


def _probs(last_logits) -> np.ndarray:
    return np.asarray(jax.nn.softmax(jnp.asarray(last_logits, jnp.float32)), np.float64)


def custom_targets(last_logits, W_U, targets: Targets, strings):
    """(token ids, names, probabilities, weights, directions, info) of user-chosen targets.
    A difference's or a direction's probability is 0 (undefined; the info holds both tokens'
    probabilities and the logit difference); every target weighs 1/n in influence."""
    probs = _probs(last_logits)
    logits = np.asarray(last_logits, np.float64)
    info = []
    if targets.vector:
        v = jnp.asarray(np.asarray(targets.vector, np.float64)[None])
        toks, names, p, dirs = np.array([-1], np.int32), [targets.vector_name], [0.0], v
        info.append({"name": targets.vector_name, "kind": "vector"})
    else:
        toks = np.asarray(targets.tokens, np.int32)
        minus = (np.broadcast_to(np.asarray(targets.minus, np.int32), toks.shape)
                 if targets.minus else None)
        names = strings(toks)
        if minus is None:
            p, dirs = probs[toks], logit_direction(W_U, toks)
            info = [{"name": n, "kind": "token", "prob": float(q)} for n, q in zip(names, p)]
        else:
            others = strings(minus)
            # Shown as "Austin − Dallas" (the page quotes names); info keeps both exact tokens.
            names = [f"{a.strip() or a} − {b.strip() or b}" for a, b in zip(names, others)]
            p, dirs = np.zeros(len(toks)), logit_direction(W_U, toks, minus)
            info = [{"name": n, "kind": "logit difference", "probs": [float(probs[a]),
                                                                      float(probs[b])],
                     "tokens": [int(a), int(b)],
                     "logit_difference": float(logits[a] - logits[b])}
                    for n, a, b in zip(names, toks, minus)]
    n = len(toks)
    return (toks, list(names), np.asarray(p, np.float32), np.full(n, 1.0 / n, np.float32), dirs,
            info)


def resolve_targets(config: TraceConfig, tokenizer, d_model: int) -> Targets:
    """TraceConfig's target strings as token ids (each must be one token: else a one-line
    error listing its tokens), or its target_vector read and checked ([d_model], finite)."""
    if config.target_vector:
        path = Path(config.target_vector).expanduser()
        try:
            v = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--target-vector {path}: cannot read a .npy array "
                              f"({type(e).__name__}: {str(e)[:80]})") from None
        v = np.asarray(v, np.float64).reshape(-1) if v.ndim == 2 and 1 in v.shape else v
        if v.shape != (d_model,) or not np.issubdtype(v.dtype, np.number):
            raise ConfigError(f"--target-vector {path}: shape {v.shape}, the model needs a "
                              f"[{d_model}] direction")
        if not np.all(np.isfinite(v)) or not np.any(v):
            raise ConfigError(f"--target-vector {path}: the direction must be finite and "
                              "non-zero")
        return Targets(vector=tuple(float(x) for x in v), vector_name=f"vector {path.name}")

    def one(s: str, flag: str) -> int:
        ids = tokenizer.encode(s, add_bos=False)
        if len(ids) != 1:
            pieces = " ".join(repr(t) for t in tokenizer.token_strings(ids))
            raise ConfigError(f"--{flag} {s!r} is {len(ids)} tokens ({pieces}), not one: give "
                              "a single token")
        return int(ids[0])

    return Targets(tokens=tuple(one(s, "target") for s in config.target),
                   minus=tuple(one(s, "minus") for s in config.minus))


# --- one batch of rows ---------------------------------------------------------------------------
# XLA:CPU hands its dot fusions to YNNPACK in recent jaxlibs (0.10); the row programs run faster
# with XLA's own dot emitter (the demo's rows 7.3-7.5 -> 6.6 s, session 22). Set per program: an
# XLA without the option refuses it when compiling (checked once on a trivial program), and the
# rows then compile without it; other backends ignore CPU options.
ROW_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def accepted_options(options: dict) -> dict | None:
    """`options` if this XLA compiles a trivial program with them, else None."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(np.float32(0)).compile()
    except (RuntimeError, TypeError, ValueError):  # XLA: no such option (or an older jax.jit)
        return None
    return dict(options)


@cache
def _row_program():
    """`_rows` jitted, with `ROW_COMPILER_OPTIONS` where this XLA accepts them."""
    return jax.jit(_rows, static_argnames=("model_cfg", "tc_cfg", "src_layers", "over_counts",
                                           "first_pos", "n_pos", "tiles", "values"),
                   donate_argnames=("scratch",),
                   compiler_options=accepted_options(ROW_COMPILER_OPTIONS))


def _rows(params, tc_params, rm, layout, columns, tgt_layer, tgt_pos, tgt_vec, tgt_id=None,
          direct=None, scratch=None, *,
          model_cfg: ModelConfig, tc_cfg: TranscoderConfig, src_layers: tuple[int, ...],
          over_counts: tuple[int, ...], first_pos: int, n_pos: int, tiles=None,
          values: int = 0):
    """Rows of A for a batch of targets: [batch, features + errors + tokens] float32.

    tgt_layer: the target's layer (n_layers for a logit), tgt_pos its position (< n_pos),
    tgt_vec its encoder row or logit direction. The model is causal, so the sweep runs on the
    first `n_pos` positions only; sources at later positions get zeros. layout: per source
    layer, `Sources.device()`; over_counts: its overflow tiles in the prefix; columns: every
    active feature's decoder slot in the prefix's slots (`_RowMaker.prefix_columns`). With
    `tiles` (`_edges_by_tiles`), layout holds each MLP slot's `SlotTiles` arrays instead, cut
    into blocks of positions (`split_blocks`; the batch reads the blocks below n_pos, which is a
    block's end), and columns every feature's accumulator row; with `values` too
    (`_edges_by_values`), each slot's the last slot's cumulative rows and each value group's rows
    (`values` slots a group), with every active feature's direct edges (`direct`, added for the
    targets that are features, `tgt_id`), and the sweep keeps the gradients at the attention
    values, grouped the same way, instead of those at every MLP slot, in `scratch` (one buffer
    per position block, made by `_RowMaker`, donated, returned and passed to the next batch; no
    zeros needed but in the group above the batch's top, which is zeroed here).

    Returns (rows, scratch)."""
    B = tgt_layer.shape[0]
    T_all = rm.tokens.shape[0]
    rm = rep.prefix(rm, n_pos) if n_pos < T_all else rm
    L, T, D = model_cfg.n_layers, n_pos, model_cfg.d_model
    dt = rm.embeds.dtype
    rows = jnp.arange(B)

    def inject(at_layer):  # each target's vector at its position, if its layer is `at_layer`
        v = tgt_vec.astype(dt) * (tgt_layer == at_layer)[:, None].astype(dt)
        return jnp.zeros((B, T, D), dt).at[rows, tgt_pos].set(v)[:, None]

    zero = jnp.zeros((1, T, D), dt)
    lmax = jnp.max(tgt_layer)
    f32 = jnp.promote_types(dt, jnp.float32)  # accumulate in at least float32

    def top(_):
        _, top_vjp = jax.vjp(lambda x: rep.final_hidden(rm, params, model_cfg, x), zero)
        return jax.vmap(top_vjp)(inject(L))[0]  # [B, 1, T, D] at the final residual

    # Only a batch holding a logit starts from the final residual (the others from zeros).
    g = jax.lax.cond(lmax >= L, top, lambda _: jnp.zeros((B, 1, T, D), dt), None)
    # Block l holds the read point of layer-l targets, so the sweep runs from block lmax (the
    # last block when a logit is in the batch) down to block 0.
    n_blocks = jnp.minimum(lmax + 1, L)
    error = rm.error.astype(dt)

    no_skip = tc_params.W_skip is None  # (always so at the values)
    kv = (model_cfg.n_kv_heads, model_cfg.head_dim)
    zero_v = jnp.zeros((1, T) + kv, dt) if values else None
    # The position blocks below the prefix (`position_blocks`): a laid-out prompt's gradients are
    # kept block by block, as its rows are (`_RowMaker`).
    used = tuple(b for b in tiles[2] if b[0] < T) if tiles is not None else ()
    n_groups = scratch[0].shape[0] - 2 if values else 0  # `_RowMaker`: a spare group past the last

    def step(i, carry):
        g, G, err = carry
        layer = n_blocks - 1 - i
        if no_skip:
            # The MLP slot's gradient is the block output's, g itself (batch-major, [B, 1, T,
            # D]). The targets at this layer read the residual between attention and MLP: each
            # one's read taken back there (`rep.read_rows`, at its own position) is added to g
            # in place, and the block's attention takes the sum back. (The generic VJP below
            # builds a [B, T, D] injection of zeros per layer and adds it: ~5% of the rows'
            # time.)
            gm = g
            mine = (tgt_layer == layer).astype(dt)[:, None]
            r = rep.read_rows(rm, params, model_cfg, tc_cfg, layer, tgt_vec.astype(dt) * mine,
                              tgt_pos)
            _, blk_vjp = jax.vjp(
                lambda x, v: rep.linear_block(rm, params, model_cfg, tc_cfg, tc_params, layer,
                                              x, zero, v)[0], zero, zero_v)
            gx, gv = jax.vmap(blk_vjp, out_axes=(0, 2))(g.at[rows, 0, tgt_pos].add(r))
            if not values:  # position-major, [1, T, B, D], as the generic VJP gives it below
                gm = jnp.moveaxis(g, 0, 2)
        else:  # a skip connection reads the residual too: the block's whole VJP
            _, blk_vjp = jax.vjp(
                lambda x, m, v: rep.linear_block(rm, params, model_cfg, tc_cfg, tc_params,
                                                 layer, x, m, v), zero, zero, zero_v)
            # gm comes out position-major, [1, T, B, D]: the decoder contraction below is then
            # a matmul per position with contiguous operands (XLA's CPU batched dot is several
            # times slower with the batch axis in the middle). At the values there is no skip.
            gx, gm, gv = jax.vmap(blk_vjp, out_axes=(0, 2, 2))((g, inject(layer)))
        # The error nodes' edges while this layer's gradients are in cache.
        e_err = jax.lax.dynamic_index_in_dim(error, layer, 0, False)
        e_l = ((gm[:, 0].astype(f32) * e_err.astype(f32)).sum(-1) if values  # (a dot would
               # transpose gm; at the values gm stays batch-major: only the error nodes and a
               # logit's `below` read it)
               else jnp.einsum("tbd,td->bt", gm[0], e_err, preferred_element_type=f32))
        err = jax.lax.dynamic_update_index_in_dim(err, e_l, layer, axis=0)
        if tiles is not None and not values:
            return gx, tuple(jax.lax.dynamic_update_index_in_dim(Gb, gm[0, a:b], layer, axis=0)
                             for Gb, (a, b) in zip(G, used)), err
        if not values:
            return gx, jax.lax.dynamic_update_index_in_dim(G, gm[0], layer, axis=0), err
        # G = (a logit's gradient at the last slot, the gradients at every block's values):
        # `_edges_by_values`. Block b's values meet value slot b - 1's rows: they are kept in
        # groups of `values` slots, [group, T, B, slot in group, V] after a leading group for
        # block 0 (whose values meet no slot).
        below, at_values = G
        reads = (tgt_layer == L) & (layer == L - 1)
        below = jax.lax.cond(jnp.any(reads),
                             lambda b: b + gm[:, 0] * reads.astype(dt)[:, None, None],
                             lambda b: b, below)
        gv = gv[0].reshape(T, B, 1, -1)
        at, z = layer - 1 + values, jnp.zeros((), layer.dtype)
        at_values = tuple(jax.lax.dynamic_update_slice(u, gv[None, a:b],
                                                       (at // values, z, z, at % values, z))
                          for u, (a, b) in zip(at_values, used))
        return gx, (below, at_values), err

    # Blocks above every target in the batch get no gradient: the sweep starts below them.
    if values:
        # Every block up to the top (lmax) writes its place; the places above it that a product
        # reads are those of its group: zeroed (lmax's own place: block lmax + 1's; a top past
        # the last value slot zeroes the trailing spare group).
        at = jnp.minimum(lmax + values, (n_groups + 1) * values) // values
        G0 = (jnp.zeros((B, T, D), dt), tuple(
            jax.lax.dynamic_update_index_in_dim(u, jnp.zeros(u.shape[1:], u.dtype), at, 0)
            for u in scratch[:len(used)]))
    elif tiles is not None:
        G0 = tuple(jnp.zeros((L, b - a, B, D), dt) for a, b in used)
    else:
        G0 = jnp.zeros((L, T, B, D), dt)
    g, G, err = jax.lax.fori_loop(0, n_blocks, step, (g, G0, jnp.zeros((L, B, T), f32)))

    # The error and token columns [B, errors + T_all] (zeros past the prefix).
    err = jnp.pad(err, ((0, 0), (0, 0), (0, T_all - T)))  # [L, B, T_all]
    emb = jnp.einsum("btd,td->bt", g[:, 0], rm.embeds, preferred_element_type=f32)
    tail = jnp.concatenate([jnp.swapaxes(err[:, :, first_pos:], 0, 1).reshape(B, -1),
                            jnp.pad(emb, ((0, 0), (0, T_all - T)))], axis=1)
    if tiles is not None:
        # The accumulator [B, rows] is target-major: each feature's column read at its row.
        if values:
            below = jnp.swapaxes(G[0], 0, 1)  # [T, B, D], for products position by position
            acc = _edges_by_values(below, G[1], layout, tiles, tgt_layer, lmax, values, direct,
                                   tgt_id)
        else:  # the decoder contraction slot by slot, over all its writers at once
            acc = _edges_by_tiles(G, layout, tiles, lmax)
        return (jnp.concatenate([acc.at[:, columns].get(mode="promise_in_bounds"), tail], axis=1),
                G[1] + scratch[len(used):] if values else None)
    else:
        # The decoder contraction: each source layer's edges at its main rows and overflow tiles.
        by_source = tc_cfg.max_reach is not None and tc_cfg.max_reach <= SOURCE_MAJOR_REACH
        edges = (_edges_by_source if by_source else _edges_by_slot)(
            G, tc_params, tc_cfg, layout, over_counts, src_layers, lmax, dt)

        # Every source layer's edges, one row per decoder slot ([slots, B], then a zero row for
        # the features past the prefix), are read at the features' slots in one gather
        # (`columns`): per-layer gathers and pads cost more than the contraction itself on
        # low-layer batches.
        slots = []
        for (_, act, _, o_act, _), n_over, e in zip(layout, over_counts, edges):
            act, o_act = act[:T], o_act[:n_over]
            slots += [jnp.swapaxes(e[0] * act[:, None], 1, 2).reshape(-1, B),
                      jnp.swapaxes(e[1] * o_act[:, None], 1, 2).reshape(-1, B)]
        slots.append(jnp.zeros((1, B), f32))
        feats = jnp.concatenate(slots).at[columns].get(mode="promise_in_bounds")
        return jnp.concatenate([feats.T, tail], axis=1), None


# Transcoders whose features write at most this many layers contract source layer by source
# layer (a loop over the few slots each writes), the others MLP slot by slot (`_edges_by_slot`).
# Measured on a 12-token full graph at batch 256: a PLT's rows 18.6 s by source against 20.9 s
# by slot; a CLT's top batch 0.85 s by slot against 0.99 s by source. Windowed CLTs in between
# were not measured.
SOURCE_MAJOR_REACH = 4

# A prompt of at most this many positions (or position_bucket) may have its active features'
# decoder rows laid out once (`SlotTiles`); a longer one's automatic position bucket is at least
# this.
TILED_POSITIONS = 16
# Most position blocks of a laid-out prompt under the automatic bucket (`tiled_bucket`).
MAX_BLOCKS = 4


def tiled_bucket(n_pos: int, n_rows: int, n_sources: int, batch: int) -> int:
    """The automatic position bucket of a laid-out prompt: its positions in k blocks, k the
    batches of feature rows each source layer has (`n_rows / (n_sources x batch)`, from 1 to
    MAX_BLOCKS). Batches go by prefix, then layer (`attribution.stream.dense_batches`): a block
    holding less than a batch per layer would mix layers in its batches (deeper sweeps), and
    each prefix is one more compilation."""
    k = min(MAX_BLOCKS, max(1, n_rows // max(n_sources * batch, 1)))
    return -(-n_pos // k)


# Value slots per product of `_edges_by_values` (`value_groups`). Measured on the 12-token CLT
# full graph (scripts/bench_trace.py, batch 256): see the README's decoder-contraction table.
VALUE_GROUP = 3


def _slot_product(acc, Gt, slot_layout):
    """acc [B, accumulator rows] plus one slot's rows times its gradients, block by block of
    positions (`split_blocks`): Gt holds the gradients [positions, B, W] of the blocks below the
    batch's prefix, slot_layout every block's main rows [positions, K, W], overflow tiles
    [tiles, Ko, W] and where they go (`split_blocks`). Each window's products [B, K] are added
    at its first accumulator row (overlapping windows only add zeros: padding rows are zero)."""
    dn = jax.lax.ScatterDimensionNumbers(update_window_dims=(1, 2), inserted_window_dims=(),
                                         scatter_dims_to_operand_dims=(1,))

    def add(acc, start, x):  # x [windows, B, K]: window i at accumulator rows start[i] ..
        return jax.lax.scatter_add(acc, start[:, None], x, dn, indices_are_sorted=True,
                                   mode="promise_in_bounds")

    for G, (Dm, Do, m_start, o_pos, o_start) in zip(Gt, slot_layout):
        acc = add(acc, m_start, jnp.einsum("qnd,qbd->qbn", Dm, G,
                                           preferred_element_type=acc.dtype))
        if Do.shape[0]:  # overflow tiles
            grad = G.at[o_pos].get(mode="promise_in_bounds")
            acc = add(acc, o_start, jnp.einsum("nkd,nbd->nbk", Do, grad,
                                               preferred_element_type=acc.dtype))
    return acc


def _edges_by_tiles(G, layout, tiles, lmax):
    """Every feature's edges summed over the slots it writes ([B, accumulator rows] in
    `SlotTiles` order): per slot, one product of its gradients G[t] [positions, B, D] with all
    its writers' decoder rows at each position (times their activations, `SlotTiles.decoders`),
    its overflow tiles with their positions' gradients, each added into the accumulator at its
    rows; block by block of positions, G holding [L, positions, B, D] for each block below the
    batch's prefix (`_slot_product`). The features past the prefix keep zero rows. tiles:
    (accumulator rows, each slot's t, the position blocks)."""
    n_rows, slots, _ = tiles
    acc = jnp.zeros((G[0].shape[2], n_rows), jnp.promote_types(G[0].dtype, jnp.float32))
    for t, lay in zip(slots, layout):
        acc = jax.lax.cond(t < lmax, lambda acc, t=t, lay=lay: _slot_product(
            acc, [Gb[t] for Gb in G], lay), lambda acc: acc, acc)
    return acc


def _edges_by_values(below, at_values, layout, tiles, tgt_layer, lmax, group, direct, tgt_id):
    """`_edges_by_tiles`' edges for a transcoder without a skip connection, from fewer products.

    With frozen patterns and norms and the MLPs constant, the gradient of a target at MLP slot t
    is the one at slot t + 1 plus what block t + 1 sends back through its attention values:
    g[t] = g[t + 1] + J[t + 1]^T u[t + 1], where u[b] is the gradient at block b's values and J[b]
    the linear map from the residual to them (`rep.value_rows`). A target at layer l reads the
    residual after block l's attention, so at slot l - 1 (block l's input) its gradient is its
    read taken back along the residual path alone, r (`rep.read_rows`), at its own position,
    plus J[l]^T u[l]. Summed over the slots t a feature writes, its edge sum_t dec[t] . g[t] is

        [same position] C[l - 1] . r  +  sum over t <= l - 1 of  (J[t + 1] C[t]) . u[t + 1]

    with C[t] its cumulative write (sum of its decoder rows into slots <= t, times its
    activation). The first term, the direct edge, depends on the two features alone: it is made
    once per trace (`SlotTiles.cumulative`) and added here for a feature target. A logit (l past
    the last layer) reads the last slot through the final norm only: its first term is
    C[L - 1] . g[L - 1] at every position, from the last slot's cumulative rows. The second term
    is kv-wide (kv_heads x head_dim) products, `group` slots at a time (`value_groups`): one
    product of group x kv width per group, fewer and wider products and fewer adds into the
    accumulator.

    below [P, B, D]: a logit's gradient at the last slot; at_values, per position block below
    the prefix P: [2 + groups, the block's positions, B, group, V], u at every block (block b at
    value slot b - 1's place; the leading group holds block 0's, the trailing one is spare).
    layout: per slot, (its `SlotTiles.cumulative` rows on the last slot, else None; its group's
    value rows on a group's last slot, else None), each cut into the position blocks
    (`split_blocks`). direct: (flat, offset, length, start) per active feature
    (`SlotTiles.cumulative`); tgt_id each target's feature, -1 for none. tiles: (accumulator
    rows, each slot's t, the position blocks, the longest direct run). The features past the
    prefix keep zero rows. Returns [B, accumulator rows + the longest direct run]."""
    n_rows, slots, blocks, k_max = tiles
    f32 = jnp.promote_types(below.dtype, jnp.float32)
    B = below.shape[1]
    acc = jnp.zeros((B, n_rows + k_max), f32)  # room for a direct run from any row
    for t, (cum, val) in zip(slots, layout):
        if cum is not None:  # the last slot: logits
            reads = tgt_layer == t + 1
            acc = jax.lax.cond(jnp.any(reads), lambda acc, cum=cum, reads=reads: _slot_product(
                acc, [below[a:b] * reads.astype(below.dtype)[None, :, None]
                      for a, b in blocks[:len(at_values)]], cum), lambda acc: acc, acc)
        if val is not None:  # t is the last slot of group t // group, which starts at g * group
            g = t // group
            acc = jax.lax.cond(g * group + 1 <= lmax, lambda acc, g=g, val=val: _slot_product(
                acc, [u[1 + g].reshape(u.shape[1], B, -1) for u in at_values], val),
                lambda acc: acc, acc)
    # The direct edges of feature targets: each a run of accumulator rows in its own column.
    flat, offset, length, start = direct
    ok = tgt_id >= 0
    i = jnp.where(ok, tgt_id, 0)
    k = jnp.arange(k_max)
    n = jnp.where(ok, length[i], 0)
    run = jnp.where(k[None] < n[:, None],
                    flat[jnp.minimum(offset[i][:, None] + k[None], flat.shape[0] - 1)], 0)
    dn = jax.lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0,),
                                         scatter_dims_to_operand_dims=(0, 1))
    at = jnp.stack([jnp.arange(B, dtype=start.dtype), start[i]], axis=1)
    return jax.lax.scatter_add(acc, at, run.astype(f32), dn, unique_indices=True,
                               mode="promise_in_bounds")


def _edges_by_source(G, tc_params, tc_cfg, layout, over_counts, src_layers, lmax, dt):
    """Per source layer, its features' edges ([T, B, K] main rows, [tiles, B, Ko] overflow) from
    the gradients G [L, T, B, D] at the MLP slots it writes, slot by slot."""
    _, T, B, _ = G.shape
    f32 = jnp.promote_types(dt, jnp.float32)
    edges = []
    for s, (idx, _, o_idx, _, o_pos), n_over in zip(src_layers, layout, over_counts):
        idx, o_idx, o_pos = idx[:T], o_idx[:n_over], o_pos[:n_over]
        e = (jnp.zeros((T, B, idx.shape[1]), f32), jnp.zeros((n_over, B, o_idx.shape[1]), f32))

        def contract(t, e, s=s, idx=idx, o_idx=o_idx, o_pos=o_pos, n_over=n_over):
            # Main rows: position q's gradients [B, D] against its [K, D] active decoder rows;
            # overflow tiles gather their positions' gradients. Indices are in bounds by
            # construction: saying so spares XLA's slow checked gather. The barrier keeps each
            # gather out of the dot: fused into it, XLA's CPU dot runs 2-3x slower.
            W = jax.lax.dynamic_index_in_dim(tc_params.W_dec[s], t - s, 1, False).astype(dt)
            Gt = jax.lax.dynamic_index_in_dim(G, t, 0, False)
            dec = jax.lax.optimization_barrier(W.at[idx].get(mode="promise_in_bounds"))
            main = e[0] + jnp.einsum("qbd,qkd->qbk", Gt, dec, preferred_element_type=f32)
            if not n_over:
                return main, e[1]
            dec, grad = jax.lax.optimization_barrier((W.at[o_idx].get(mode="promise_in_bounds"),
                                                      Gt.at[o_pos].get(mode="promise_in_bounds")))
            return main, e[1] + jnp.einsum("nbd,nkd->nbk", grad, dec, preferred_element_type=f32)

        # A target at layer l reads MLP slots t < l only: the loop stops below every target of
        # the batch. The cond keeps a source layer the batch does not read from doing anything:
        # XLA hoists a loop's invariant gathers (all of a PLT's) out of it, where they would run
        # even for no iteration.
        edges.append(jax.lax.cond(s < lmax, lambda e, s=s, contract=contract: jax.lax.fori_loop(
            s, jnp.minimum(lmax, s + tc_cfg.n_targets(s)), contract, e), lambda e: e, e))
    return edges


def _edges_by_slot(G, tc_params, tc_cfg, layout, over_counts, src_layers, lmax, dt):
    """`_edges_by_source`'s edges, MLP slot by slot: G[t] is copied out once per slot (XLA's CPU
    dot takes no dynamic slice, so a slice per source layer and slot copies it as many times as
    the slot has writers: ~15 on average on a CLT), then contracted with each writer's active
    decoder rows."""
    L, T, B, _ = G.shape
    f32 = jnp.promote_types(dt, jnp.float32)
    main = [idx[:T] for idx, *_ in layout]
    over = [(o_idx[:n], o_pos[:n]) for (_, _, o_idx, _, o_pos), n in zip(layout, over_counts)]

    def slot(t, e):
        Gt = jax.lax.dynamic_index_in_dim(G, t, 0, False)
        out = []
        for i, s in enumerate(src_layers):
            def contract(ei, i=i, s=s):  # as in `_edges_by_source`
                W = tc_params.W_dec[s]  # [features, n_targets(s), D]
                dec = jax.lax.optimization_barrier(
                    W.at[main[i], t - s].get(mode="promise_in_bounds").astype(dt))
                m = ei[0] + jnp.einsum("qbd,qkd->qbk", Gt, dec, preferred_element_type=f32)
                if not over_counts[i]:
                    return m, ei[1]
                o_idx, o_pos = over[i]
                dec, grad = jax.lax.optimization_barrier((
                    W.at[o_idx, t - s].get(mode="promise_in_bounds").astype(dt),
                    Gt.at[o_pos].get(mode="promise_in_bounds")))
                return m, ei[1] + jnp.einsum("nbd,nkd->nbk", grad, dec,
                                             preferred_element_type=f32)

            reads = (s <= t) & (t < s + tc_cfg.n_targets(s))
            out.append(jax.lax.cond(reads, contract, lambda ei: ei, e[i]))
        return tuple(out)

    # Targets at layer l read MLP slots t < l only: the loop stops below every target.
    return jax.lax.fori_loop(0, jnp.minimum(lmax, L), slot, tuple(
        (jnp.zeros((T, B, idx.shape[1]), f32), jnp.zeros((o.shape[0], B, o.shape[1]), f32))
        for idx, (o, _) in zip(main, over)))


# --- the whole graph -----------------------------------------------------------------------------
def trace_mesh(config: TraceConfig):
    """The ('data', 'feature') mesh of config.mesh_data x mesh_feature (None for 1 x 1)."""
    if (config.mesh_data, config.mesh_feature) == (1, 1):
        return None
    from clt import sharding as shd

    mesh = shd.make_mesh(config.mesh_data, config.mesh_feature)
    return mesh if mesh.size > 1 else None


def place(mesh, tc_cfg: TranscoderConfig, params: LMParams, tc_params: TranscoderParams, rm):
    """The tracer's arrays on a mesh: the transcoder's parameters by the training's logical-axis
    rules (features over 'feature', `clt.sharding`), the embedding and unembedding split over
    the vocabulary on 'feature' (Gemma's 262k rows are never whole on one device), everything
    else replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    from clt import sharding as shd

    f = mesh.shape["feature"]
    if tc_cfg.n_features % f:
        raise ConfigError(f"the transcoder's {tc_cfg.n_features} features per layer do not split "
                          f"over the mesh's feature axis ({f}); choose --mesh-feature dividing it")
    tc_params = jax.device_put(tc_params, shd.param_shardings(tc_cfg, mesh))
    rep_s = NamedSharding(mesh, PartitionSpec())

    def vocab(a, axis):
        if a is None or a.shape[axis] % f:
            return jax.device_put(a, rep_s) if a is not None else None
        spec = [None] * a.ndim
        spec[axis] = "feature"
        return jax.device_put(a, NamedSharding(mesh, PartitionSpec(*spec)))

    params = dataclasses.replace(
        jax.device_put(dataclasses.replace(params, embed=None, unembed=None), rep_s),
        embed=vocab(params.embed, 0), unembed=vocab(params.unembed, 1))
    return params, tc_params, jax.device_put(rm, rep_s)


class _RowMaker:
    """Pads target batches to a fixed size, runs each on the shortest position prefix that holds
    its targets (rounded up to a bucket: one compilation per bucket), returns rows."""

    def __init__(self, params, model_cfg, tc_cfg, tc_params, rm, active, bos, batch, dtype,
                 bucket: int = 0, mesh=None, target_scale=None,
                 decoder_rows_gb: float | None = None, value_contraction: str = "auto",
                 value_group: int = 0, n_rows: int | None = None):
        cast = (lambda t: jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, t))
        # Only the weights the sweep reads: the rest (MLPs, embeddings) can go after the forward
        # pass (`rep.release_unswept`).
        self.params = cast(rep.sweep_params(params))
        self.tc_params, self.rm = cast(tc_params), cast(rm)
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        # The decoder as given and as cast (the same arrays when the dtypes agree): what
        # `release_decoder` frees. None on a mesh, whose batches read the placed copies.
        self.W_dec_held = () if self.mesh is not None else (*tc_params.W_dec,
                                                              *self.tc_params.W_dec)
        if self.mesh is not None:
            self.params, self.tc_params, self.rm = place(self.mesh, tc_cfg, self.params,
                                                         self.tc_params, self.rm)
            if batch % self.mesh.shape["data"]:
                raise ConfigError(f"batch {batch} is not a multiple of the mesh's data axis "
                                  f"({self.mesh.shape['data']})")
        self.cfg, self.tc_cfg, self.batch = model_cfg, tc_cfg, batch
        self.W_enc = self.tc_params.W_enc if self.mesh is not None else tc_params.W_enc
        # Per active feature, a factor on its encoder row (a neuron's frozen gate); None: 1.
        self.target_scale = target_scale
        T = self.n_pos = int(rm.tokens.shape[0])
        self.bucket = bucket if bucket > 0 else max(TILED_POSITIONS, -(-T // 8))
        self.sources = [Sources.build(active, s, T) for s in range(model_cfg.n_layers)
                        if np.any(active.layer == s)]
        self.src_layers = tuple(src.layer for src in self.sources)
        # On one device, for a prompt of at most TILED_POSITIONS (or position_bucket) positions:
        # every slot's decoder rows laid out once (`SlotTiles`), for wide products, when they fit
        # in decoder_rows_gb (None: the decoder weights' own size, >= 0.5 GB); else each batch
        # gathers them, source layer by source layer (`Sources`). The layout is cut into blocks
        # of positions (`position_blocks`): a batch on a prefix reads the blocks below it.
        self.tiles, self.values = None, 0  # values: the value slots' group size (0: off)
        one = self.mesh is None and self.sources and T <= max(TILED_POSITIONS, bucket)
        tiles = SlotTiles.build(active, model_cfg.n_layers, tc_cfg.sources, T) if one else None
        budget = (max(sum(W.size for W in tc_params.W_dec) * np.dtype(dtype).itemsize,
                      AUTO_DECODER_ROWS_GB * 2**30)
                  if decoder_rows_gb is None else decoder_rows_gb * 2**30)
        item, D = np.dtype(dtype).itemsize, model_cfg.d_model
        V = model_cfg.n_kv_heads * model_cfg.head_dim
        if tiles is not None and value_contraction != "off" and tc_params.W_skip is None:
            # Every slot's cumulative rows: each feature in every slot from its layer up.
            cum = SlotTiles.build(active, model_cfg.n_layers, lambda t: range(t + 1), T)
            L = model_cfg.n_layers
            group = value_group or VALUE_GROUP
            # FLOPs per target of a top batch: d_model-wide at every slot against kv-wide at every
            # value group's cells. Memory: the value rows, the last slot's cumulative rows (for
            # logits) and the direct edges (every pair of features at one position).
            last = cum.rows() - cum.rows(L - 1)
            counts = np.zeros((T, L), np.int64)
            np.add.at(counts, (active.pos, active.layer), 1)
            n_direct = int((counts * (np.cumsum(counts, 1) - counts)).sum())
            fewer = cum.value_cells(L, group) * V < tiles.rows() * D
            sums = np.promote_types(np.dtype(dtype), np.float32).itemsize  # direct edges' dtype
            fits = ((last * D + cum.value_cells(L, group) * V) * item + n_direct * sums <= budget
                    and n_direct < 2**31)
            if fits and (fewer or value_contraction == "on"):
                tiles, self.values = cum, group
        if not self.values and tiles is not None and tiles.nbytes(D, dtype) > budget:
            tiles = None
        if tiles is not None and bucket <= 0:
            # (n_rows: the feature rows the trace will make, all by default; a capped one's)
            self.bucket = tiled_bucket(T, len(active) if n_rows is None else n_rows,
                                       len(self.sources), batch)
        blocks = position_blocks(T, self.bucket) if tiles is not None else ()

        def put_blocks(sl, main, over):  # on the device, cut into the position blocks
            return None if main is None else tuple(
                tuple(jax.device_put(a) if i < 2 else jnp.asarray(a, jnp.int32)
                      for i, a in enumerate(b)) for b in split_blocks(sl, main, over, blocks))

        if self.values:
            self.tiles = tiles
            value_fn = partial(rep.value_rows, self.rm, self.params, model_cfg)
            mats, direct = tiles.cumulative(
                self.tc_params.W_dec, active, np.dtype(dtype),
                lambda b, x, p: value_fn(b, jnp.asarray(x), jnp.asarray(p)), model_cfg.n_layers,
                self._reads(active, tc_cfg), self.values)
            self.layout = tuple((put_blocks(sl, Cm, Co), put_blocks(sl, Vm, Vo))
                                for (Cm, Co, Vm, Vo), sl in zip(mats, tiles.slots))
            flat, offset, length, start = direct
            self._direct = (jax.device_put(np.concatenate([flat, np.zeros(1, flat.dtype)])),
                            jnp.asarray(offset.astype(np.int32)), jnp.asarray(length),
                            jnp.asarray(start))
            self._k_max = max(1, int(length.max()) if len(length) else 1)
        elif tiles is not None:
            self.tiles = tiles
            mats = tiles.decoders(self.tc_params.W_dec, active, np.dtype(dtype))
            self.layout = tuple(put_blocks(sl, Dm, Do) for (Dm, Do), sl in zip(mats, tiles.slots))
        else:
            self.layout = tuple(self._put(src.device()) for src in self.sources)
        # The sweep's gradients at the attention values (`_rows`), per position block:
        # [leading group (block 0), value groups, trailing spare group, the block's positions, B,
        # group, kv width], made once, then each batch's donated buffers are the next one's.
        n_groups = len(value_groups(model_cfg.n_layers, self.values)) if self.values else 0
        self._scratch = (tuple(jnp.zeros((n_groups + 2, b - a, batch, self.values, V), dtype)
                               for a, b in blocks) if self.values else None)
        if self.tiles is not None:  # (and every feature's accumulator row)
            self._tile_args = (self.tiles.n_rows, tuple(sl.t for sl in self.tiles.slots),
                               blocks) + ((self._k_max,) if self.values else ())
            self._tile_columns = jax.device_put(self.tiles.row_of)
        self._columns = {}  # prefix length -> prefix_columns(prefix length)
        self.first_pos = 1 if bos else 0
        self.out_dtype = np.float64 if dtype == jnp.float64 else np.float32
        self.flops_run = 0.0  # arithmetic of the batches made so far (`flops`)
        self.batches_run = 0

    def _reads(self, active: rep.ActiveFeatures, tc_cfg: TranscoderConfig,
               chunk: int = 1024) -> np.ndarray:
        """Every active feature's target vector (`_encoder_rows`) taken back to the residual
        below its layer along the residual path (`rep.read_rows`) [n, D], `chunk` rows per call
        (padded: one compilation)."""
        out = None
        for layer in np.unique(active.layer):
            f = np.flatnonzero(active.layer == layer)
            for c in range(0, len(f), chunk):
                g = f[c:c + chunk]
                pos = np.zeros(chunk, np.int32)
                pos[:len(g)] = active.pos[g]
                r = np.asarray(rep.read_rows(self.rm, self.params, self.cfg, tc_cfg, int(layer),
                                             self._encoder_rows(active, g, chunk),
                                             jnp.asarray(pos)))[:len(g)]
                if out is None:
                    out = np.zeros((len(active), r.shape[1]), np.promote_types(r.dtype,
                                                                               np.float32))
                out[g] = r
        return out

    def _encoder_rows(self, active: rep.ActiveFeatures, which: np.ndarray, size: int):
        """Encoder rows [size, d_model] of the active features `which`, each times its target
        scale, padded with feature 0's, the padding zeroed: every gather of a size has one
        shape (an eager op compiles once per shape)."""
        n, which = len(which), np.asarray(which)
        full = np.concatenate([which, np.zeros(size - n, which.dtype)])
        ts = self.target_scale
        scale = np.zeros(size, np.float32 if ts is None else np.asarray(ts).dtype)
        scale[:n] = 1.0 if ts is None else ts[which]
        return _scaled_rows(self.W_enc, jax.device_put(active.layer[full].astype(np.int32)),
                            jax.device_put(active.index[full].astype(np.int32)),
                            jax.device_put(scale))

    def _released_decoder(self) -> dict:
        """The decoder arrays `release_decoder` frees, by id: none while batches still gather
        the decoder rows (no layout, or a mesh)."""
        if self.tiles is None:
            return {}
        return {id(a): a for a in self.W_dec_held
                if isinstance(a, jax.Array) and not a.is_deleted()}

    def decoder_bytes(self) -> int:
        """Bytes `release_decoder` would free (the planner's prediction for a single trace)."""
        return sum(a.nbytes for a in self._released_decoder().values())

    def release_decoder(self) -> int:
        """Free the transcoder's decoder weights once its rows are laid out (the slot or values
        layout, `SlotTiles`): no row reads `W_dec` then. For a transcoder used once (a single
        `cltrace trace`): its arrays are deleted, also in the caller's pytrees, so the trace's
        adjacency can reuse their memory. Returns bytes freed."""
        if self.tiles is None:  # batches gather their decoder rows: it stays
            return 0
        gone = self._released_decoder()
        freed = sum(a.nbytes for a in gone.values())
        self.tc_params = dataclasses.replace(self.tc_params, W_dec=())
        self.W_dec_held = ()
        for a in gone.values():
            a.delete()
        return freed

    def _put(self, tree, spec=None):
        """On the mesh: replicated (spec None) or laid out by `spec`; unchanged without one."""
        if self.mesh is None:
            return tree
        from jax.sharding import NamedSharding, PartitionSpec

        sharding = NamedSharding(self.mesh, spec if spec is not None else PartitionSpec())
        return jax.device_put(tree, sharding)

    def prefix_length(self, pos: np.ndarray) -> int:
        """Positions the batch's sweep runs on: its last target's, rounded up to the bucket."""
        need = int(pos.max()) + 1
        return min(self.n_pos, -(-need // self.bucket) * self.bucket)

    def flops(self, P: int, lmax: int, layers=None) -> float:
        """Floating-point operations of one padded batch on the prefix of P positions whose
        highest target is at layer lmax (n_layers for a logit), counted from the shapes `_rows`
        runs: per target, each swept block's backward through the frozen attention (O and V
        projections, the patterns) and the transcoder's skip connection; the decoder contraction
        over every active slot of the prefix (padding slots included) for each layer the batch
        reads (under `values`: kv-wide value groups up to lmax, d_model-wide at the last slot
        when a logit is among the batch's target `layers`, default just lmax; the direct edges
        are a gather and an add); the error and embedding contractions. Norms and elementwise
        work are left out."""
        c, L, D = self.cfg, self.cfg.n_layers, self.cfg.d_model
        hd = c.head_dim
        block = D * c.n_heads * hd + P * c.n_heads * hd + c.n_kv_heads * hd * D
        if self.tc_params.W_skip is not None:
            block += D * D
        per_target = 2 * P * block * min(lmax + 1, L)
        if self.values:
            V = c.n_kv_heads * hd
            logit = L in {int(x) for x in (layers if layers is not None else (lmax,))}
            last = {b: a for a, b in value_groups(L, self.values)}  # group: last slot -> first
            for sl in self.tiles.slots:
                cells = sl.cells(P)
                per_target += 2 * D * cells * (logit and sl.t == L - 1)
                if sl.t in last:  # its group's product: group x kv wide, if the batch reaches it
                    per_target += 2 * V * self.values * cells * (last[sl.t] + 1 <= lmax)
        elif self.tiles is not None:  # each slot below the batch's top: its main rows and tiles
            for sl in self.tiles.slots:
                if sl.t < lmax:
                    per_target += 2 * D * sl.cells(P)
        else:
            over_counts, _ = self.prefix_columns(P)
            for src, n_over in zip(self.sources, over_counts):
                reads = min(lmax, src.layer + self.tc_cfg.n_targets(src.layer)) - src.layer
                if reads > 0:
                    slots = P * src.index.shape[1] + n_over * src.over_index.shape[1]
                    per_target += 2 * D * slots * reads
        per_target += 2 * L * P * D + 2 * P * D
        return float(self.batch * per_target)

    def prefix_columns(self, P: int) -> tuple[tuple[int, ...], object]:
        """For the prefix of P positions: per source layer, its overflow tiles (static); and for
        every active feature, in graph order, its row in `_rows`'s slots (each source layer's
        main rows [P, K] then its overflow tiles, layer after layer; a feature past the prefix
        reads the zero row after them), cached."""
        if P not in self._columns:
            cols, at = [], 0
            for src in self.sources:
                n_over, c = src.columns(P)
                rest = np.full(len(src.pos) - len(c), -1, np.int32)  # past the prefix
                cols.append((n_over, np.concatenate([c + at, rest])))
                at += P * src.index.shape[1] + n_over * src.over_index.shape[1]
            index = np.concatenate([c for _, c in cols]) if cols else np.zeros(0, np.int32)
            self._columns[P] = (tuple(n for n, _ in cols),
                                self._put(jnp.asarray(np.where(index < 0, at, index)
                                                      .astype(np.int32))))
        return self._columns[P]

    def __call__(self, layer: np.ndarray, pos: np.ndarray, vec, host: bool = True,
                 padded: bool = False, features: np.ndarray | None = None):
        """Rows of these targets ([n, sources]; [batch, sources] with the padding rows, which are
        zero, under `padded`); on the host as numpy, or left on the device. `features`: the
        active features they are (`features`), for targets between the first and last layer when
        the contraction is at the values (their direct edges were made beforehand)."""
        n = len(layer)
        pad = self.batch - n
        L = self.cfg.n_layers
        if self.values and features is None and np.any((layer > 0) & (layer < L)):
            raise ValueError("at the values, a target inside the model must be an active "
                             "feature: call `features`")
        ids = np.full(self.batch, -1, np.int32)
        if self.values and features is not None:
            ids[:n] = features
        P = self.prefix_length(pos)
        layer = np.concatenate([layer, np.zeros(pad, np.int32)]).astype(np.int32)
        pos = np.concatenate([pos, np.zeros(pad, np.int32)]).astype(np.int32)
        if len(vec) < self.batch:  # padded on the host (`features` passes them padded already)
            vec = np.asarray(vec)
            vec = np.concatenate([vec, np.zeros((pad, self.cfg.d_model), vec.dtype)])
        vec = jax.device_put(vec) if isinstance(vec, np.ndarray) else vec
        self.flops_run += self.flops(P, int(layer[:n].max()), np.unique(layer[:n]))
        self.batches_run += 1
        args, static = self._inputs(P, layer, pos, vec, ids)
        out, self._scratch = _row_program()(*args, **static)
        if host:  # cut on the host: a slice on the device compiles once per batch size
            out = np.asarray(jax.device_get(out))
        return out if padded else out[:n]

    def _inputs(self, P: int, layer: np.ndarray, pos: np.ndarray, vec, ids: np.ndarray):
        """`_rows`' arguments and static arguments for a padded batch on the prefix of P
        positions."""
        if self.tiles is not None:  # the blocks below P (`_rows`), every feature's row
            over_counts, columns, tiles = (), self._tile_columns, self._tile_args
        else:
            (over_counts, columns), tiles = self.prefix_columns(P), None
        layer, pos = jax.device_put(layer), jax.device_put(pos)
        if self.mesh is not None:  # the batch's targets split over 'data'
            from jax.sharding import PartitionSpec

            layer, pos = self._put((layer, pos), PartitionSpec("data"))
            vec = self._put(vec, PartitionSpec("data", None))
        args = (self.params, self.tc_params, self.rm, self.layout, columns, layer, pos, vec,
                jax.device_put(ids) if self.values else None,
                self._direct if self.values else None, self._scratch)
        return args, {"model_cfg": self.cfg, "tc_cfg": self.tc_cfg,
                      "src_layers": self.src_layers, "over_counts": over_counts,
                      "first_pos": self.first_pos, "n_pos": P, "tiles": tiles,
                      "values": self.values}

    def features(self, active: rep.ActiveFeatures, which: np.ndarray, host: bool = True,
                 padded: bool = False):
        which = np.asarray(which)
        vec = self._encoder_rows(active, which, self.batch)
        return self(active.layer[which], active.pos[which], vec, host, padded, which)


@jax.jit
def _scaled_rows(W_enc, layer, index, scale):
    """`_RowMaker._encoder_rows`' gather and scale, one program (eager, one per op)."""
    vec = W_enc[layer, :, index]
    return vec * scale.astype(vec.dtype)[:, None]


@dataclass
class TraceSetup:
    """What the tracer knows after the forward pass and before any row: the replacement model,
    the active features, the targets, the node counts and the row maker (`attribution.plan`
    predicts a trace's memory and time from it)."""

    ids: list
    bos: bool
    token_strings: list
    rm: object  # attribution.replacement.LocalReplacement
    active: object  # attribution.replacement.ActiveFeatures
    logit_toks: np.ndarray
    names: list
    logit_probs: np.ndarray
    weights: np.ndarray | None
    logit_dirs: object
    target_info: list | None
    err_layer: np.ndarray
    err_pos: np.ndarray
    cap: int
    streamed: bool
    batch: int
    make: _RowMaker
    seconds: float
    tc_cfg: TranscoderConfig  # the transcoder's, or the MLP neurons' (attribution.neurons)

    @property
    def n_all(self) -> int:
        return len(self.active)

    @property
    def n_err(self) -> int:
        return len(self.err_layer)

    @property
    def n_pos(self) -> int:
        return len(self.ids)

    @property
    def n_logit(self) -> int:
        return len(self.logit_toks)

    @property
    def n_src(self) -> int:
        return self.n_all + self.n_err + self.n_pos


def setup_trace(params: LMParams, model_cfg: ModelConfig, tc_cfg: TranscoderConfig | None,
                tc_params: TranscoderParams | None, token_ids, config: TraceConfig, *,
                token_strings: list[str] | None = None, logit_strings=None,
                targets: Targets | None = None, check_size: bool = True) -> TraceSetup:
    """The forward pass and everything decided before the first row (see `trace_tokens`).
    `check_size=False` (the planner): a mode over max_adjacency_gb is not refused here."""
    t0 = time.perf_counter()
    if not config.neurons:
        check_model(tc_cfg, model_cfg)
    ids, bos = rep.prepend_bos(model_cfg, [int(i) for i in token_ids])
    if len(ids) - int(bos) == 0:
        raise ConfigError("the prompt is empty: give at least one token to trace")
    if len(ids) > model_cfg.max_position:
        raise ConfigError(f"the prompt has {len(ids)} tokens (BOS included) but model "
                          f"'{model_cfg.name}' has a context of {model_cfg.max_position}; "
                          "shorten it")
    if token_strings is None:
        token_strings = [str(i) for i in ids]
    elif bos and len(token_strings) == len(ids) - 1:
        token_strings = ["<bos>"] + list(token_strings)
    T, L = len(ids), model_cfg.n_layers

    factors = None
    if config.neurons:  # the MLP units as features (attribution.neurons)
        rm, acts, factors, tc_cfg, tc_params = rep.build_neurons(
            params, model_cfg, np.asarray(ids), config.neuron_top_k)
    else:
        rm, acts = rep.build(params, model_cfg, tc_cfg, tc_params, np.asarray(ids))
    active = rep.active_features(acts, skip_bos=bos)
    del acts
    if factors is not None:  # each node's frozen factor: its target vector's scale
        factors = np.asarray(factors)[active.pos, active.layer, active.index]
    strings = logit_strings or (lambda t: [str(int(i)) for i in t])
    if targets is not None and targets.custom:
        logit_toks, names, logit_probs, weights, logit_dirs, target_info = custom_targets(
            rm.last_logits, params.W_U, targets, strings)
        if logit_dirs.shape[1] != model_cfg.d_model:
            raise ConfigError(f"the target vector has {logit_dirs.shape[1]} dimensions, the "
                              f"model {model_cfg.d_model}")
    else:
        logit_toks, logit_probs, logit_dirs = select_logits(
            rm.last_logits, params.W_U, config.max_n_logits, config.desired_logit_prob)
        names, weights, target_info = strings(logit_toks), None, None
    logit_dirs = np.asarray(logit_dirs)  # on the host: each batch's are cut, padded and put there
    err_layer, err_pos = error_nodes(L, T, bos)
    n_all, n_err, n_logit = len(active), len(err_layer), len(logit_toks)
    n_src = n_all + n_err + T
    cap = n_all if config.max_feature_nodes is None else min(config.max_feature_nodes, n_all)
    try:
        streamed = use_stream(config, n_all, cap, n_src, n_err, T, n_logit)
    except ConfigError:
        if check_size:
            raise
        streamed = False

    dtype = jnp.dtype(config.dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ConfigError("dtype float64 needs jax.config.update('jax_enable_x64', True)")
    batch = batch_size(config, model_cfg, T, capped=cap < n_all)
    mesh = trace_mesh(config)
    if mesh is not None:  # each device makes batch / data rows: a multiple of the data axis
        d = mesh.shape["data"]
        batch = -(-batch // d) * d
    make = _RowMaker(params, model_cfg, tc_cfg, tc_params, rm, active, bos, batch, dtype,
                     config.position_bucket, mesh, target_scale=factors,
                     decoder_rows_gb=config.decoder_rows_gb,
                     value_contraction=config.value_contraction, n_rows=cap)
    return TraceSetup(ids, bos, list(token_strings), rm, active, logit_toks, names, logit_probs,
                      weights, logit_dirs, target_info, err_layer, err_pos, cap, streamed, batch,
                      make, time.perf_counter() - t0, tc_cfg)


def trace_tokens(params: LMParams, model_cfg: ModelConfig, tc_cfg: TranscoderConfig | None,
                 tc_params: TranscoderParams | None, token_ids, config: TraceConfig, *,
                 token_strings: list[str] | None = None, logit_strings=None,
                 targets: Targets | None = None, progress: bool = False,
                 release_model: bool = False) -> Graph:
    """The unpruned attribution graph of a tokenised prompt (the BOS is prepended here).
    Under `config.neurons` the MLP units are the features: tc_cfg and tc_params are None.

    `logit_strings(ids) -> list[str]` names the logit tokens (default: the ids as text);
    `targets`: what to explain (default: the most probable next tokens). `release_model`: once
    the forward pass is done, free the model weights no row reads (its MLPs and embeddings,
    `rep.release_unswept`) and, once its rows are laid out, the transcoder's decoder
    (`_RowMaker.release_decoder`), for a caller done with both: neither can run again."""
    with matmul_precision(config):
        return _trace_tokens(params, model_cfg, tc_cfg, tc_params, token_ids, config,
                             token_strings=token_strings, logit_strings=logit_strings,
                             targets=targets, progress=progress, release_model=release_model)


def matmul_precision(config: TraceConfig):
    """The context every program of a trace is compiled and run in (its forward pass, rows,
    planner batches): `config.matmul_precision` for float32 products (jax's own default is
    TensorFloat-32 on recent NVIDIA GPUs). The one home of that choice."""
    return jax.default_matmul_precision(config.matmul_precision)


def _trace_tokens(params: LMParams, model_cfg: ModelConfig, tc_cfg: TranscoderConfig | None,
                  tc_params: TranscoderParams | None, token_ids, config: TraceConfig, *,
                  token_strings: list[str] | None = None, logit_strings=None,
                  targets: Targets | None = None, progress: bool = False,
                  release_model: bool = False) -> Graph:
    t0 = time.perf_counter()
    st = setup_trace(params, model_cfg, tc_cfg, tc_params, token_ids, config,
                     token_strings=token_strings, logit_strings=logit_strings, targets=targets)
    if release_model and not config.neurons:  # neuron rows read the MLPs' own weights
        rep.release_unswept(params, st.make.params, st.make.tc_params)
        st.make.release_decoder()
    trim_heap()  # before the adjacency: a fresh mapping, it cannot reuse freed heap pages
    ids, bos, token_strings, active = st.ids, st.bos, st.token_strings, st.active
    logit_toks, names, logit_probs, weights = st.logit_toks, st.names, st.logit_probs, st.weights
    logit_dirs, target_info, err_layer, err_pos = (st.logit_dirs, st.target_info, st.err_layer,
                                                   st.err_pos)
    n_all, n_err, n_logit, n_src, T, L = (st.n_all, st.n_err, st.n_logit, st.n_src, st.n_pos,
                                          model_cfg.n_layers)
    cap, streamed, batch, make = st.cap, st.streamed, st.batch, st.make
    t_setup = time.perf_counter() - t0
    info = {"model": model_cfg.name, "transcoder": to_dict(st.tc_cfg), "batch_size": batch,
            "position_bucket": make.bucket, "adjacency": "stream" if streamed else "dense",
            "decoder_layout": ("sources" if make.tiles is None else
                               "values" if make.values else "slots"),
            "seconds_setup": round(t_setup, 3)}
    if target_info is not None:
        info["targets"] = target_info
    if config.neurons:  # its error nodes hold the units not kept: "other neurons"
        info["neurons"] = {"top_k": config.neuron_top_k, "d_mlp": model_cfg.d_mlp}
    infl_weights = logit_probs if weights is None else weights  # each target's weight

    def graph(selected, adjacency, **extra):
        sel = active.take(selected)
        g = Graph(
            tokens=np.asarray(ids, np.int32), token_strings=list(token_strings),
            feature_layer=sel.layer, feature_pos=sel.pos, feature_index=sel.index,
            activation=sel.value, error_layer=err_layer, error_pos=err_pos,
            logit_tokens=logit_toks, logit_strings=list(names), logit_probs=logit_probs,
            adjacency=adjacency, n_layers=L, bos=bos, config=to_dict(config), info=info,
            n_active_total=n_all, prompt=config.prompt, target_weights=weights, **extra)
        t1 = time.perf_counter()
        with progress_bar(progress) as bar, warnings.catch_warnings():
            bar.add_task("pruning and scores", total=None)
            warnings.simplefilter("ignore")  # the caller's own prune warns (the graph it shows)
            g.pruned = prune(g, config.node_threshold, config.edge_threshold)
            g.scores = score(g, config.node_threshold, config.edge_threshold, g.pruned)
        info["seconds_scores"] = round(time.perf_counter() - t1, 3)
        return g

    with progress_bar(progress) as bar:
        task = bar.add_task("attribution rows", total=n_logit + cap)
        if streamed:
            selected, adjacency, extra = stream(make, active, batch, logit_dirs, infl_weights,
                                                 n_err, T, config.stream_features, bar, task)
            info["seconds_rows"] = round(time.perf_counter() - t0 - t_setup, 3)
            info["row_flops"], info["row_batches"] = make.flops_run, make.batches_run
            return graph(selected, adjacency, **extra)
        logit_rows = np.concatenate([
            make(np.full(len(c), L, np.int32), np.full(len(c), T - 1, np.int32), logit_dirs[c])
            for c in chunks(np.arange(n_logit), batch)])
        # From process start (imports, loading, compiling included): what a user waits for.
        first = process_seconds()
        if first is not None:
            info["seconds_to_first_rows"] = round(first, 2)
        bar.advance(task, n_logit)
        if cap == n_all:
            selected = np.arange(n_all)
            feat_rows = _all_rows(make, active, batch, n_src, n_src + n_logit, bar, task,
                                  config.offload)
        else:
            selected, feat_rows = _greedy_rows(
                make, active, cap, batch, logit_rows, infl_weights,
                node_levels(active.layer, err_layer, T, n_logit, L), config.update_interval, bar,
                task)
    info["seconds_rows"] = round(time.perf_counter() - t0 - t_setup, 3)
    info["row_flops"], info["row_batches"] = make.flops_run, make.batches_run

    keep_cols = np.concatenate([selected, np.arange(n_all, n_src)])
    n_feat = len(selected)
    N = n_feat + n_err + T + n_logit
    if cap == n_all:
        adjacency = feat_rows  # already [N, N], feature rows filled in place
    else:
        adjacency = zeros((N, N), make.out_dtype)
        adjacency[:n_feat, :n_feat + n_err + T] = feat_rows[:, keep_cols]
    adjacency[N - n_logit:, :n_feat + n_err + T] = logit_rows[:, keep_cols]
    return graph(selected, adjacency)


# The least memory the automatic decoder_rows_gb allows the slot layout (GB): small layouts
# always pay (a PLT's is about its decoder weights' size).
AUTO_DECODER_ROWS_GB = 0.5


# Automatic batch sizes (TraceConfig.batch_size 0): a capped graph's greedy visit, where the batch
# sets how many features are visited between re-rankings; full and streamed graphs, whose rows
# are the same at any batch (measured on this 2-core CPU, a 12-token full graph with a CLT of 512
# features per layer, whole processes: 45-51 s at 64, 32-36 s at 256, +0.2 GB peak).
GREEDY_BATCH, FULL_BATCH = 64, 256


def batch_size(config: TraceConfig, model_cfg: ModelConfig, n_pos: int,
               capped: bool = False) -> int:
    """Targets per backward sweep: config.batch_size (automatic: GREEDY_BATCH for a capped
    graph's greedy visit, else FULL_BATCH), reduced so that one batch's gradients at every layer
    stay under config.batch_memory_gb."""
    per_target = model_cfg.n_layers * n_pos * model_cfg.d_model * jnp.dtype(config.dtype).itemsize
    want = config.batch_size or (GREEDY_BATCH if capped else FULL_BATCH)
    return max(1, min(want, int(config.batch_memory_gb * 2**30 // per_target)))


def _all_rows(make, active, batch, n_src, N, bar, task, offload):
    """Every feature's row, in the final square adjacency [N, N] (host numpy). With `offload`,
    each batch's rows move to the host as they are made; without, they stay on the device until
    all are made (faster on an accelerator with room for them)."""
    adjacency = zeros((N, N), make.out_dtype)
    batches = dense_batches(active, batch, make.prefix_length)
    if offload:  # each batch stored while the next is made
        for c, r in rows_ahead(make, active, batches):
            adjacency[c, :n_src] = r
            bar.advance(task, len(c))
        return adjacency
    kept = []
    for c in batches:
        kept.append(make.features(active, c, host=False))
        bar.advance(task, len(c))
    if kept:  # (none without active features)
        adjacency[np.concatenate(batches), :n_src] = np.asarray(
            jax.device_get(jnp.concatenate(kept)))
    return adjacency


def _greedy_rows(make, active, cap, batch, logit_rows, logit_weights, levels, update_interval,
                 bar, task):
    """circuit-tracer's greedy visit: rank unvisited features by their influence estimated from
    the rows made so far, make the rows of the next `update_interval` batches, repeat. `levels`:
    every node's (`node_levels`), for influence's one pass."""
    n_all, n_logit = len(active), len(logit_rows)
    n_nodes = len(levels)
    n_src = n_nodes - n_logit
    logit_nodes = np.arange(n_src, n_nodes)
    buf = zeros((n_logit + cap, n_src), make.out_dtype)
    buf[:n_logit] = logit_rows
    row_nodes = np.zeros(n_logit + cap, np.int64)
    row_nodes[:n_logit] = logit_nodes
    weights = np.zeros(n_nodes, np.float64)
    weights[logit_nodes] = logit_weights
    visited = np.zeros(n_all, bool)
    st = n_logit
    while st - n_logit < cap:
        infl = influence(buf[:st], weights, row_nodes[:st], levels=levels)
        rank = np.argsort(-infl[:n_all], kind="stable")
        pending = rank[~visited[rank]][:min(update_interval * batch, cap - (st - n_logit))]
        for c, rows in rows_ahead(make, active, visit_batches(active, pending, batch)):
            buf[st:st + len(c)] = rows
            row_nodes[st:st + len(c)] = c
            visited[c] = True
            st += len(c)
            bar.advance(task, len(c))
    order = np.argsort(row_nodes[n_logit:st], kind="stable")
    selected = row_nodes[n_logit:st][order]
    return selected, buf[n_logit:st][order]


class Tracer:
    """A model and its transcoder, loaded once, tracing prompt after prompt (`cltrace trace
    --prompts`): weights are read once and every compiled program of a shape already seen is
    reused. `prepare` checks a prompt's tokens and targets without tracing (so a batch of
    prompts is refused before the first is traced); `trace` traces it."""

    def __init__(self, config: TraceConfig, progress: bool = False):
        from clt.circuit_tracer_io import open_transcoder
        from clt.lm.loading import load_model

        with progress_bar(progress) as bar:
            bar.add_task(f"loading {config.model} and its transcoder", total=None)
            self.model = load_model(config.model)
            if config.neurons:  # the model's MLP units: no transcoder
                self.ref, self.tc_cfg, self.tc_params = "", None, None
            else:
                # An empty transcoder means the one shipped for an embedded model, recorded by
                # name.
                self.ref, self.tc_cfg, self.tc_params = open_transcoder(config.transcoder,
                                                                        self.model.cfg)
                rep.check_transcoder(self.tc_cfg)  # an SAE: refused before any trace
        if self.model.tokenizer is None:
            raise ConfigError(f"model '{config.model}' has no tokenizer: cannot encode the "
                              "prompt")
        self.model_name, self.transcoder = config.model, config.transcoder
        self.released = False

    def prepare(self, config: TraceConfig) -> tuple[TraceConfig, list[int], Targets]:
        """(config naming the loaded transcoder, the prompt's token ids, its targets), checked:
        the same model and transcoder, targets of one token each, the prompt within the
        model's context."""
        if (config.model, config.transcoder, config.neurons) != (
                self.model_name, self.transcoder, self.tc_cfg is None):
            raise ConfigError("Tracer.prepare: this tracer holds model "
                              f"{self.model_name!r} and transcoder {self.transcoder!r}")
        check_prompt(config)
        cfg = self.model.cfg
        targets = resolve_targets(config, self.model.tokenizer, cfg.d_model)
        ids = self.model.tokenizer.encode(config.prompt, add_bos=False)
        n = len(rep.prepend_bos(cfg, ids)[0])
        if n > cfg.max_position:
            raise ConfigError(f"the prompt has {n} tokens (BOS included) but model "
                              f"'{cfg.name}' has a context of {cfg.max_position}; shorten it")
        return dataclasses.replace(config, transcoder=self.ref), ids, targets

    def _inputs(self, config: TraceConfig):
        """(model params, model config, transcoder config, transcoder params, ids, config, the
        keywords of `setup_trace` / `trace_tokens`) of a checked prompt."""
        if self.released:
            raise RuntimeError("this Tracer traced its last prompt (trace(..., last=True))")
        config, ids, targets = self.prepare(config)
        tok = self.model.tokenizer
        kw = {"token_strings": tok.token_strings(ids, merge=True), "targets": targets,
              "logit_strings": lambda t: tok.token_strings([int(i) for i in t])}
        return (self.model.params, self.model.cfg, self.tc_cfg, self.tc_params, ids, config), kw

    def plan(self, config: TraceConfig):
        """(the trace's setup, its `attribution.plan.ModePlan`s): the forward pass and one
        measured batch of rows, no trace."""
        from attribution.plan import plan_modes

        args, kw = self._inputs(config)
        with matmul_precision(config):
            st = setup_trace(*args, **kw, check_size=False)
            # The plan is of a single trace (`cltrace trace`), which frees the weights no row
            # reads (the model's and, once laid out, the decoder's).
            released = 0 if config.neurons else (rep.unswept_bytes(self.model.params)
                                                  + st.make.decoder_bytes())
            return st, plan_modes(st, args[-1], self.model.cfg.n_layers,
                                  released_gb=released / 2**30)

    def trace(self, config: TraceConfig, progress: bool = False, last: bool = False) -> Graph:
        """`last`: no prompt follows, so the weights no row reads are freed after the forward
        pass (a lower peak); the tracer cannot trace again."""
        args, kw = self._inputs(config)
        self.released = last
        return trace_tokens(*args, **kw, progress=progress, release_model=last)


def check_prompt(config: TraceConfig) -> None:
    """What can be checked of a prompt's config before any model is loaded."""
    if not config.prompt.strip():
        raise ConfigError("the prompt is empty: give some text to trace")
    if config.target_vector and not Path(config.target_vector).expanduser().is_file():
        raise ConfigError(f"--target-vector: no file at {config.target_vector}")


def trace(config: TraceConfig, progress: bool = False) -> Graph:
    """Load the model and transcoder named in `config` and trace its prompt."""
    check_prompt(config)
    return Tracer(config, progress).trace(config, progress, last=True)


def load_any_transcoder(ref: str):
    """Deprecated alias (kept for a release): `clt.circuit_tracer_io.load_transcoder`."""
    from clt.circuit_tracer_io import load_transcoder

    return load_transcoder(ref)


__all__ = ["Targets", "TraceConfig", "Tracer", "check_prompt", "custom_targets", "load_any_transcoder", "logit_direction",
           "resolve_targets", "select_logits", "trace", "trace_tokens"]
