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
`position_bucket`), which halves the work on average for long prompts.

Streamed (`adjacency="stream"`, automatic when the dense adjacency would not fit): the rows are
never held. Batches go top layer first, one layer at a time; since every edge points from a lower
layer to a higher one (or to a logit), a target's influence on the logits is final by the time
its row is made, and the row is folded at once into its sources' influence (row-normalised |A|
weighted by the target's influence plus logit probability: `attribution.prune.influence` computed
in one pass), its |A| sum and its error share (the completeness score). What is stored is the
dense graph of the `stream_features` most influential features, their rows made a second time.

Under `max_feature_nodes`, rows are made for the logits first, then for features in order of
their influence on the logits estimated from the rows made so far, re-ranked every
`update_interval` batches (circuit-tracer's greedy scheme). The graph keeps only the rows and
columns of the features visited.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from attribution import replacement as rep
from attribution.graph import Graph, error_nodes
from attribution.prune import partial_influence
from clt.configs import ConfigError, doc, to_dict
from clt.lm.config import ModelConfig
from clt.lm.params import LMParams
from clt.transcoder import TranscoderConfig, TranscoderParams, check_model


@dataclass(frozen=True)
class TraceConfig:
    """How to trace one prompt; saved as `config.json` beside every graph."""

    prompt: str = doc("The text whose next token is explained.")
    model: str = doc("Model name or path (see `cltrace models`).", default="smollm2-135m")
    transcoder: str = doc(
        "Transcoder: a cltrace directory, a circuit-tracer layout directory, or a Hugging Face "
        "repo in that layout; empty: the one bundled for the model (smollm2-135m).", default="")
    max_n_logits: int = doc("At most this many logit nodes.", default=10)
    desired_logit_prob: float = doc(
        "Logit nodes: the most probable next tokens until their probabilities add up to this.",
        default=0.95)
    max_feature_nodes: int | None = doc(
        "Keep at most this many feature nodes, chosen greedily by influence on the logits; None "
        "keeps every active feature.", default=None)
    batch_size: int = doc(
        "Targets per backward sweep (reduced automatically so the per-batch gradients stay under "
        "`batch_memory_gb`).", default=64)
    batch_memory_gb: float = doc("Budget for one batch's gradients at every layer.", default=1.0)
    dtype: Literal["float32", "bfloat16", "float64"] = doc(
        "Compute dtype of the backward sweeps; rows are stored as float32 (float64 under "
        "float64, which needs jax_enable_x64: for reference checks).", default="float32")
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
        "this (one compilation per distinct P). 0: automatic (prompt length / 8, at least 16); "
        "the prompt length or more: always the whole prompt.", default=0)
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
    schema_version: int = doc("Version of this config's JSON layout.", default=1)

    def __post_init__(self):
        for name in ("max_n_logits", "batch_size", "update_interval", "stream_features"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TraceConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_feature_nodes is not None and self.max_feature_nodes < 0:
            raise ConfigError("TraceConfig.max_feature_nodes must be >= 0 or None")
        for name in ("desired_logit_prob", "node_threshold", "edge_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"TraceConfig.{name} must be in (0, 1], got "
                                  f"{getattr(self, name)}")
        if self.position_bucket < 0:
            raise ConfigError("TraceConfig.position_bucket must be >= 0 (0: automatic)")
        if self.batch_memory_gb <= 0 or self.max_adjacency_gb <= 0:
            raise ConfigError("TraceConfig memory budgets must be positive")


# --- logit targets -------------------------------------------------------------------------------
def select_logits(last_logits, W_U, max_n_logits: int, desired_prob: float):
    """(token ids, probabilities, directions [n, d_model]) of the logit nodes: the most probable
    tokens until their cumulative probability reaches `desired_prob`, at most `max_n_logits`.
    A direction is the unembedding column minus the vocabulary mean (before soft-capping)."""
    probs = np.asarray(jax.nn.softmax(jnp.asarray(last_logits, jnp.float32)), np.float64)
    order = np.argsort(-probs, kind="stable")[:max_n_logits]
    cum = np.cumsum(probs[order])
    n = min(int(np.searchsorted(cum, desired_prob)) + 1, len(order))
    toks = order[:n].astype(np.int32)
    W = jnp.asarray(W_U)
    W = W.astype(jnp.promote_types(W.dtype, jnp.float32))
    dirs = W[:, toks].T - W.mean(axis=1)[None]
    return toks, probs[toks].astype(np.float32), dirs


# --- one batch of rows ---------------------------------------------------------------------------
# Cost of gathering one overflow tile's gradients ([batch, d_model] at its position), in the
# decoder slots whose contraction costs as much (measured on a CPU: ~40 us against ~0.75 us;
# the 128-token benchmark's speed moves by under 8% for any value from 16 to 160).
_GATHER_SLOTS = 54


def _tile_widths(counts: np.ndarray) -> tuple[int, int]:
    """(main width, overflow tile width) for one source layer with these active counts per
    position: the pair with the least work, main rows costing their width at every position,
    overflow tiles their width plus the gather of their gradients."""
    top = -(-max(int(counts.max()), 1) // 16) * 16

    def cost(km, ko):
        return len(counts) * km + int(np.ceil(np.maximum(counts - km, 0) / ko).sum()) * (
            ko + _GATHER_SLOTS)

    return min(((km, ko) for km in range(0, top + 1, 16) for ko in (16, 32, 64, 128)),
               key=lambda w: cost(*w))


@dataclass(frozen=True)
class _Sources:
    """One source layer's active features laid out for the decoder contraction (host numpy).

    Position q's first K features fill row q of `index`/`value` ([pos, K]); the rest fill
    overflow tiles of Ko slots (`over_*`, [tiles, Ko], in position order, `over_pos` their
    positions). K and Ko come from `_tile_widths`. Padding slots hold activation 0. Activity is
    uneven over positions (a layer's busiest position can hold 10x its mean), so this wastes far
    less work than padding every position to the busiest one, and the main rows need no gather
    of the gradients."""

    layer: int
    pos: np.ndarray  # [n] each feature's position, graph order (sorted)
    main: np.ndarray  # [n] bool: in the main rows (else in an overflow tile)
    cell: np.ndarray  # [n] main: position * K + slot; overflow: tile * Ko + slot in the tile
    index: np.ndarray  # [pos, K] int32
    value: np.ndarray  # [pos, K]
    over_index: np.ndarray  # [tiles, Ko] int32
    over_value: np.ndarray  # [tiles, Ko]
    over_pos: np.ndarray  # [tiles] int32

    @classmethod
    def build(cls, active: rep.ActiveFeatures, layer: int, n_pos: int) -> _Sources:
        sel = np.nonzero(active.layer == layer)[0]
        pos = active.pos[sel]
        counts = np.bincount(pos, minlength=n_pos)
        K, Ko = _tile_widths(counts)
        slot = np.arange(len(sel)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[pos]
        tiles = -(-np.maximum(counts - K, 0) // Ko)
        first_tile = np.concatenate([[0], np.cumsum(tiles)[:-1]])
        main = slot < K
        over = np.maximum(slot - K, 0)
        cell = np.where(main, pos * K + slot, (first_tile[pos] + over // Ko) * Ko + over % Ko)
        shape_main, shape_over = (n_pos, K), (int(tiles.sum()), Ko)
        index, value = np.zeros(shape_main, np.int32), np.zeros(shape_main, active.value.dtype)
        o_index, o_value = np.zeros(shape_over, np.int32), np.zeros(shape_over, value.dtype)
        for dst_i, dst_v, m in ((index, value, main), (o_index, o_value, ~main)):
            dst_i.flat[cell[m]] = active.index[sel][m]
            dst_v.flat[cell[m]] = active.value[sel][m]
        return cls(layer, pos, main, cell, index, value, o_index, o_value,
                   np.repeat(np.arange(n_pos), tiles).astype(np.int32))

    def device(self) -> tuple:
        return tuple(jnp.asarray(a) for a in (self.index, self.value, self.over_index,
                                               self.over_value, self.over_pos))

    def columns(self, P: int) -> tuple[int, np.ndarray]:
        """For the prefix of P positions: (its overflow tiles, the column of each of its
        features in the contraction's output [main rows [P, K] then overflow tiles])."""
        n = int(np.searchsorted(self.pos, P))
        n_over = int(np.searchsorted(self.over_pos, P))
        start = P * self.index.shape[1]  # the overflow tiles' columns follow the main rows'
        return n_over, np.where(self.main[:n], self.cell[:n], start + self.cell[:n]).astype(
            np.int32)


@partial(jax.jit, static_argnames=("cfg", "tc_cfg", "src_layers", "src_sizes", "over_counts",
                                   "first_pos", "n_pos"))
def _rows(params, tc_params, rm, layout, columns, tgt_layer, tgt_pos, tgt_vec, *,
          cfg: ModelConfig, tc_cfg: TranscoderConfig, src_layers: tuple[int, ...],
          src_sizes: tuple[int, ...], over_counts: tuple[int, ...], first_pos: int, n_pos: int):
    """Rows of A for a batch of targets: [batch, features + errors + tokens] float32.

    tgt_layer: the target's layer (n_layers for a logit), tgt_pos its position (< n_pos),
    tgt_vec its encoder row or logit direction. The model is causal, so the sweep runs on the
    first `n_pos` positions only; sources at later positions get zeros. layout: per source
    layer, `_Sources.device()`; src_sizes: its active features; over_counts / columns: its
    overflow tiles and its features' columns in the prefix (`_Sources.columns`)."""
    B = tgt_layer.shape[0]
    T_all = rm.tokens.shape[0]
    rm = rep.prefix(rm, n_pos) if n_pos < T_all else rm
    L, T, D = cfg.n_layers, n_pos, cfg.d_model
    dt = rm.embeds.dtype
    rows = jnp.arange(B)

    def inject(at_layer):  # each target's vector at its position, if its layer is `at_layer`
        v = tgt_vec.astype(dt) * (tgt_layer == at_layer)[:, None].astype(dt)
        return jnp.zeros((B, T, D), dt).at[rows, tgt_pos].set(v)[:, None]

    zero = jnp.zeros((1, T, D), dt)
    _, top_vjp = jax.vjp(lambda x: rep.final_hidden(rm, params, cfg, x), zero)
    g = jax.vmap(top_vjp)(inject(L))[0]  # [B, 1, T, D] at the final residual
    lmax = jnp.max(tgt_layer)
    # Block l holds the read point of layer-l targets, so the sweep runs from block lmax (the
    # last block when a logit is in the batch) down to block 0.
    n_blocks = jnp.minimum(lmax + 1, L)

    def step(i, carry):
        g, G = carry
        layer = n_blocks - 1 - i
        _, blk_vjp = jax.vjp(
            lambda x, m: rep.linear_block(rm, params, cfg, tc_cfg, tc_params, layer, x, m),
            zero, zero)
        # gm comes out position-major, [1, T, B, D]: the decoder contraction below is then a
        # matmul per position with contiguous operands (XLA's CPU batched dot is several times
        # slower with the batch axis in the middle).
        gx, gm = jax.vmap(blk_vjp, out_axes=(0, 2))((g, inject(layer)))
        return gx, jax.lax.dynamic_update_index_in_dim(G, gm[0], layer, axis=0)

    # Blocks above every target in the batch get no gradient: the sweep starts below them.
    g, G = jax.lax.fori_loop(0, n_blocks, step, (g, jnp.zeros((L, T, B, D), dt)))
    f32 = jnp.promote_types(dt, jnp.float32)  # accumulate in at least float32

    def pad(x, n):  # zeros for the sources beyond the prefix
        return jnp.pad(x, ((0, 0), (0, n - x.shape[1])))

    cols = []
    for s, (idx, act, o_idx, o_act, o_pos), col, size, n_over in zip(
            src_layers, layout, columns, src_sizes, over_counts):
        idx, act = idx[:T], act[:T]
        o_idx, o_act, o_pos = o_idx[:n_over], o_act[:n_over], o_pos[:n_over]
        e = (jnp.zeros((T, B, idx.shape[1]), f32), jnp.zeros((n_over, B, o_idx.shape[1]), f32))

        def contract(t, e, s=s, idx=idx, o_idx=o_idx, o_pos=o_pos):
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
        # the batch (a third of a CLT's decoder work, on average).
        e = jax.lax.fori_loop(s, jnp.minimum(lmax, s + tc_cfg.n_targets(s)), contract, e)
        flat = jnp.concatenate([jnp.swapaxes(e[0] * act[:, None], 0, 1).reshape(B, -1),
                                jnp.swapaxes(e[1] * o_act[:, None], 0, 1).reshape(B, -1)], axis=1)
        cols.append(pad(flat[:, col], size))
    err = jnp.einsum("ltbd,ltd->blt", G, rm.error.astype(dt), preferred_element_type=f32)
    err = jnp.pad(err, ((0, 0), (0, 0), (0, T_all - T)))
    cols.append(err[:, :, first_pos:].reshape(B, -1))
    cols.append(pad(jnp.einsum("btd,td->bt", g[:, 0], rm.embeds, preferred_element_type=f32),
                    T_all))
    return jnp.concatenate(cols, axis=1)


@partial(jax.jit, static_argnames=("errors",))
def _absorb(influence, rows, node, extra, *, errors: tuple[int, int]):
    """Fold a batch of rows into the influence of their sources, as `attribution.prune` would on
    the whole matrix: each row normalised by its sum of |A|, weighted by its target's influence
    (node >= 0: read from `influence`, already final) plus `extra` (a logit's probability).
    Returns (influence, |A| row sums, |A| sums over the error columns, nonzero count)."""
    a = jnp.abs(rows)
    sums = a.sum(axis=1)
    err = a[:, errors[0]:errors[1]].sum(axis=1)
    w = jnp.where(node >= 0, influence[jnp.maximum(node, 0)], 0.0) + extra
    influence = influence + (w / jnp.maximum(sums, 1e-10)).astype(a.dtype) @ a
    return influence, sums, err, jnp.count_nonzero(rows)


# --- the whole graph -----------------------------------------------------------------------------
class _RowMaker:
    """Pads target batches to a fixed size, runs each on the shortest position prefix that holds
    its targets (rounded up to a bucket: one compilation per bucket), returns rows."""

    def __init__(self, params, cfg, tc_cfg, tc_params, rm, active, bos, batch, dtype,
                 bucket: int = 0):
        cast = (lambda t: jax.tree.map(
            lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, t))
        self.params, self.tc_params, self.rm = cast(params), cast(tc_params), cast(rm)
        self.cfg, self.tc_cfg, self.batch = cfg, tc_cfg, batch
        T = self.n_pos = int(rm.tokens.shape[0])
        self.bucket = bucket if bucket > 0 else max(16, -(-T // 8))
        self.sources = [_Sources.build(active, s, T) for s in range(cfg.n_layers)
                        if np.any(active.layer == s)]
        self.src_layers = tuple(src.layer for src in self.sources)
        self.layout = tuple(src.device() for src in self.sources)
        self.src_sizes = tuple(len(src.pos) for src in self.sources)
        self._columns = {}  # prefix length -> prefix_columns(prefix length)
        self.first_pos = 1 if bos else 0
        self.W_enc = tc_params.W_enc
        self.out_dtype = np.float64 if dtype == jnp.float64 else np.float32

    def prefix_length(self, pos: np.ndarray) -> int:
        """Positions the batch's sweep runs on: its last target's, rounded up to the bucket."""
        need = int(pos.max()) + 1
        return min(self.n_pos, -(-need // self.bucket) * self.bucket)

    def prefix_columns(self, P: int) -> tuple[tuple[int, ...], tuple]:
        """Per source layer, for the prefix of P positions: its overflow tiles (static) and its
        features' columns (`_Sources.columns`), cached."""
        if P not in self._columns:
            cols = [src.columns(P) for src in self.sources]
            self._columns[P] = (tuple(n for n, _ in cols), tuple(jnp.asarray(c) for _, c in cols))
        return self._columns[P]

    def __call__(self, layer: np.ndarray, pos: np.ndarray, vec, host: bool = True,
                 padded: bool = False):
        """Rows of these targets ([n, sources]; [batch, sources] with the padding rows, which are
        zero, under `padded`); on the host as numpy, or left on the device."""
        n = len(layer)
        pad = self.batch - n
        P = self.prefix_length(pos)
        layer = np.concatenate([layer, np.zeros(pad, np.int32)]).astype(np.int32)
        pos = np.concatenate([pos, np.zeros(pad, np.int32)]).astype(np.int32)
        vec = jnp.asarray(vec)
        vec = jnp.concatenate([vec, jnp.zeros((pad, self.cfg.d_model), vec.dtype)])
        over_counts, columns = self.prefix_columns(P)
        out = _rows(self.params, self.tc_params, self.rm, self.layout, columns,
                    jnp.asarray(layer), jnp.asarray(pos), vec, cfg=self.cfg, tc_cfg=self.tc_cfg,
                    src_layers=self.src_layers, src_sizes=self.src_sizes,
                    over_counts=over_counts, first_pos=self.first_pos, n_pos=P)
        out = out if padded else out[:n]
        return np.asarray(jax.device_get(out)) if host else out

    def features(self, active: rep.ActiveFeatures, which: np.ndarray, host: bool = True,
                 padded: bool = False):
        layer, index = active.layer[which], active.index[which]
        vec = self.W_enc[jnp.asarray(layer), :, jnp.asarray(index)]  # encoder rows [n, d_model]
        return self(layer, active.pos[which], vec, host, padded)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled, transient=True)


def trace_tokens(params: LMParams, cfg: ModelConfig, tc_cfg: TranscoderConfig,
                 tc_params: TranscoderParams, token_ids, config: TraceConfig, *,
                 token_strings: list[str] | None = None, logit_strings=None,
                 progress: bool = False) -> Graph:
    """The unpruned attribution graph of a tokenised prompt (the BOS is prepended here).

    `logit_strings(ids) -> list[str]` names the logit tokens (default: the ids as text)."""
    t0 = time.perf_counter()
    check_model(tc_cfg, cfg)
    ids, bos = rep.prepend_bos(cfg, [int(i) for i in token_ids])
    if len(ids) - int(bos) == 0:
        raise ConfigError("the prompt is empty: give at least one token to trace")
    if len(ids) > cfg.max_position:
        raise ConfigError(f"the prompt has {len(ids)} tokens (BOS included) but model "
                          f"'{cfg.name}' has a context of {cfg.max_position}; shorten it")
    if token_strings is None:
        token_strings = [str(i) for i in ids]
    elif bos and len(token_strings) == len(ids) - 1:
        token_strings = ["<bos>"] + list(token_strings)
    T, L = len(ids), cfg.n_layers

    rm, acts = rep.build(params, cfg, tc_cfg, tc_params, np.asarray(ids))
    active = rep.active_features(acts, skip_bos=bos)
    del acts
    logit_toks, logit_probs, logit_dirs = select_logits(
        rm.last_logits, params.W_U, config.max_n_logits, config.desired_logit_prob)
    err_layer, err_pos = error_nodes(L, T, bos)
    n_all, n_err, n_logit = len(active), len(err_layer), len(logit_toks)
    n_src = n_all + n_err + T
    cap = n_all if config.max_feature_nodes is None else min(config.max_feature_nodes, n_all)
    stream = _use_stream(config, n_all, cap, n_src, n_err, T, n_logit)

    dtype = jnp.dtype(config.dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ConfigError("dtype float64 needs jax.config.update('jax_enable_x64', True)")
    batch = batch_size(config, cfg, T)
    make = _RowMaker(params, cfg, tc_cfg, tc_params, rm, active, bos, batch, dtype,
                     config.position_bucket)
    t_setup = time.perf_counter() - t0
    names = logit_strings(logit_toks) if logit_strings else [str(t) for t in logit_toks]
    info = {"model": cfg.name, "transcoder": to_dict(tc_cfg), "batch_size": batch,
            "position_bucket": make.bucket, "adjacency": "stream" if stream else "dense",
            "seconds_setup": round(t_setup, 3)}

    def graph(selected, adjacency, **extra):
        sel = active.take(selected)
        return Graph(
            tokens=np.asarray(ids, np.int32), token_strings=list(token_strings),
            feature_layer=sel.layer, feature_pos=sel.pos, feature_index=sel.index,
            activation=sel.value, error_layer=err_layer, error_pos=err_pos,
            logit_tokens=logit_toks, logit_strings=list(names), logit_probs=logit_probs,
            adjacency=adjacency, n_layers=L, bos=bos, config=to_dict(config), info=info,
            n_active_total=n_all, prompt=config.prompt, **extra)

    with _progress(progress) as bar:
        task = bar.add_task("attribution rows", total=n_logit + cap)
        if stream:
            selected, adjacency, extra = _stream(make, active, batch, logit_dirs, logit_probs,
                                                 n_err, T, config.stream_features, bar, task)
            info["seconds_rows"] = round(time.perf_counter() - t0 - t_setup, 3)
            info["full_graph"] = extra.pop("full_graph")
            return graph(selected, adjacency, **extra)
        logit_rows = np.concatenate([
            make(np.full(len(c), L, np.int32), np.full(len(c), T - 1, np.int32), logit_dirs[c])
            for c in _chunks(np.arange(n_logit), batch)])
        bar.advance(task, n_logit)
        if cap == n_all:
            selected = np.arange(n_all)
            feat_rows = _all_rows(make, active, batch, n_src, n_src + n_logit, bar, task,
                                  config.offload)
        else:
            selected, feat_rows = _greedy_rows(make, active, cap, batch, logit_rows,
                                               logit_probs, n_src, config.update_interval, bar,
                                               task)
    info["seconds_rows"] = round(time.perf_counter() - t0 - t_setup, 3)

    keep_cols = np.concatenate([selected, np.arange(n_all, n_src)])
    n_feat = len(selected)
    N = n_feat + n_err + T + n_logit
    if cap == n_all:
        adjacency = feat_rows  # already [N, N], feature rows filled in place
    else:
        adjacency = np.zeros((N, N), make.out_dtype)
        adjacency[:n_feat, :n_feat + n_err + T] = feat_rows[:, keep_cols]
    adjacency[N - n_logit:, :n_feat + n_err + T] = logit_rows[:, keep_cols]
    return graph(selected, adjacency)


def batch_size(config: TraceConfig, cfg: ModelConfig, n_pos: int) -> int:
    """Targets per backward sweep: config.batch_size, reduced so that one batch's gradients at
    every layer stay under config.batch_memory_gb."""
    per_target = cfg.n_layers * n_pos * cfg.d_model * jnp.dtype(config.dtype).itemsize
    return max(1, min(config.batch_size, int(config.batch_memory_gb * 2**30 // per_target)))


def stream_batches(active: rep.ActiveFeatures, n_layers: int, batch: int) -> list[np.ndarray]:
    """The feature batches of a streamed trace, in order: top layer first, one layer per batch,
    by position within a layer (so each batch's position prefix is short)."""
    return [c for layer in range(n_layers - 1, -1, -1)
            for c in _chunks(np.nonzero(active.layer == layer)[0], batch)]


def _stream(make, active, batch, logit_dirs, logit_probs, n_err, T, n_keep, bar, task):
    """Every row of the full graph, folded into exact influences and scores as it is made (see
    TraceConfig.adjacency); then the dense graph of the `n_keep` most influential features.

    Targets go top layer first (logits, then layer L-1 down to 0), one layer per batch: a node's
    incoming edges all come from lower layers, so when a target's row is made every path from
    it to the logits has been counted and its influence is final."""
    L = make.cfg.n_layers
    n_all = len(active)
    n_src = n_all + n_err + T
    n_logit = len(logit_dirs)
    errors = (n_all, n_all + n_err)
    influence = jnp.zeros(n_src, make.out_dtype)
    sums = np.zeros(n_all + n_logit, np.float64)  # features, then logits
    err_sums = np.zeros(n_all + n_logit, np.float64)
    edges = 0
    logit_rows = []

    def fold(rows, nodes, extra, where):
        nonlocal influence, edges
        B = rows.shape[0]
        node = np.full(B, -1, np.int32)
        node[:len(nodes)] = nodes
        ex = np.zeros(B, make.out_dtype)
        ex[:len(extra)] = extra
        influence, s, e, nz = _absorb(influence, rows, jnp.asarray(node), jnp.asarray(ex),
                                      errors=errors)
        s, e = np.asarray(s, np.float64), np.asarray(e, np.float64)
        sums[where], err_sums[where] = s[:len(where)], e[:len(where)]
        edges += int(nz)

    for c in _chunks(np.arange(n_logit), batch):
        rows = make(np.full(len(c), L, np.int32), np.full(len(c), T - 1, np.int32),
                    logit_dirs[c], host=False, padded=True)
        fold(rows, [], logit_probs[c], n_all + c)
        logit_rows.append(np.asarray(jax.device_get(rows))[:len(c)])
        bar.advance(task, len(c))
    for c in stream_batches(active, L, batch):
        fold(make.features(active, c, host=False, padded=True), c, [], c)
        bar.advance(task, len(c))
    infl = np.asarray(jax.device_get(influence), np.float64)

    # Exact scores of the full graph (attribution.prune.graph_scores on the whole matrix).
    weights = np.concatenate([np.zeros(n_src), logit_probs.astype(np.float64)])
    full_infl = np.concatenate([infl, np.zeros(n_logit)])
    non_error = np.ones(n_src + n_logit)
    with_rows = np.concatenate([np.arange(n_all), n_src + np.arange(n_logit)])
    non_error[with_rows] = 1.0 - err_sums / np.maximum(sums, 1e-10)
    out = full_infl + weights
    token, error = infl[n_all + n_err:].sum(), infl[errors[0]:errors[1]].sum()

    # The stored graph: the most influential features, their rows made again.
    n_keep = min(n_keep, n_all)
    selected = np.sort(np.argsort(-infl[:n_all], kind="stable")[:n_keep])
    bar.update(task, total=n_logit + n_all + n_keep)
    keep_cols = np.concatenate([selected, np.arange(n_all, n_src)])
    N = n_keep + n_err + T + n_logit
    adjacency = np.zeros((N, N), make.out_dtype)
    for i in range(0, n_keep, batch):
        c = selected[i:i + batch]
        adjacency[i:i + len(c), :N - n_logit] = make.features(active, c)[:, keep_cols]
        bar.advance(task, len(c))
    adjacency[N - n_logit:, :N - n_logit] = np.concatenate(logit_rows)[:, keep_cols]
    left_out = np.setdiff1d(np.arange(n_all), selected)
    node_sums = np.concatenate([sums[selected], np.zeros(n_err + T), sums[n_all:]])
    node_err = np.concatenate([err_sums[selected], np.zeros(n_err + T), err_sums[n_all:]])
    full_graph = {
        "features": n_all, "nodes": n_src + n_logit, "edges": edges,
        "features_left_out": len(left_out),
        "influence_left_out": float(infl[left_out].sum()),
        "replacement_score": float(token / (token + error)) if token + error > 0 else 0.0,
        "completeness_score": float((non_error * out).sum() / max(out.sum(), 1e-30)),
    }
    extra = {"influence": np.concatenate([infl[keep_cols], np.zeros(n_logit)]),
             "input_abs": node_sums, "input_error_abs": node_err, "full_graph": full_graph}
    return selected, adjacency, extra


def _chunks(idx: np.ndarray, size: int):
    return [idx[i:i + size] for i in range(0, len(idx), size)]


def _use_stream(config: TraceConfig, n_all: int, cap: int, n_src: int, n_err: int, T: int,
                n_logit: int) -> bool:
    """Whether to stream (see TraceConfig.adjacency); refuses graphs whose stored adjacency
    would exceed max_adjacency_gb, naming the setting to change."""
    capped = cap < n_all
    n_dense = cap + n_err + T + n_logit
    # Capped: the greedy visit holds its rows over every source until the end.
    dense_gb = (n_dense**2 if not capped else (cap + n_logit) * n_src) * 4 / 2**30
    stream = not capped and (config.adjacency == "stream" or (
        config.adjacency == "auto" and dense_gb > config.max_adjacency_gb))
    if stream:
        n = min(config.stream_features, n_all) + n_err + T + n_logit
        gb = n**2 * 4 / 2**30
        if gb > config.max_adjacency_gb:
            raise ConfigError(
                f"the stored graph ({min(config.stream_features, n_all)} features, {n_err} "
                f"errors, {T} tokens) would take {gb:.1f} GB; lower --stream-features, shorten "
                f"the prompt, or raise --max-adjacency-gb (now {config.max_adjacency_gb})")
    elif dense_gb > config.max_adjacency_gb:
        raise ConfigError(
            f"the dense adjacency would take {dense_gb:.1f} GB ({n_all} active features, "
            f"{cap} kept); use --adjacency stream (or auto), set --max-feature-nodes lower, "
            f"shorten the prompt, or raise --max-adjacency-gb (now {config.max_adjacency_gb})")
    return stream


def _all_rows(make, active, batch, n_src, N, bar, task, offload):
    """Every feature's row, in the final square adjacency [N, N] (host numpy). With `offload`,
    each batch's rows move to the host as they are made; without, they stay on the device until
    all are made (faster on an accelerator with room for them)."""
    adjacency = np.zeros((N, N), make.out_dtype)
    kept = []
    for c in _chunks(np.arange(len(active)), batch):
        r = make.features(active, c, host=offload)
        if offload:
            adjacency[c[0]:c[-1] + 1, :n_src] = r
        else:
            kept.append(r)
        bar.advance(task, len(c))
    if kept:
        adjacency[:len(active), :n_src] = np.asarray(jax.device_get(jnp.concatenate(kept)))
    return adjacency


def _greedy_rows(make, active, cap, batch, logit_rows, logit_probs, n_src, update_interval,
                 bar, task):
    """circuit-tracer's greedy visit: rank unvisited features by their influence estimated from
    the rows made so far, make the rows of the next `update_interval` batches, repeat."""
    n_all, n_logit = len(active), len(logit_rows)
    n_nodes = n_src + n_logit
    logit_nodes = np.arange(n_src, n_nodes)
    buf = np.zeros((n_logit + cap, n_src), make.out_dtype)
    buf[:n_logit] = logit_rows
    row_nodes = np.zeros(n_logit + cap, np.int64)
    row_nodes[:n_logit] = logit_nodes
    visited = np.zeros(n_all, bool)
    st = n_logit
    while st - n_logit < cap:
        infl = partial_influence(buf[:st], row_nodes[:st], logit_probs, logit_nodes, n_nodes)
        rank = np.argsort(-infl[:n_all], kind="stable")
        pending = rank[~visited[rank]][:min(update_interval * batch, cap - (st - n_logit))]
        # Sorting the queue by layer keeps each batch's sweep short (see _rows).
        # (and by position within a layer, its prefix: see _RowMaker).
        pending = pending[np.lexsort((active.pos[pending], active.layer[pending]))]
        for c in _chunks(pending, batch):
            buf[st:st + len(c)] = make.features(active, c)
            row_nodes[st:st + len(c)] = c
            visited[c] = True
            st += len(c)
            bar.advance(task, len(c))
    order = np.argsort(row_nodes[n_logit:st], kind="stable")
    selected = row_nodes[n_logit:st][order]
    return selected, buf[n_logit:st][order]


def trace(config: TraceConfig, progress: bool = False) -> Graph:
    """Load the model and transcoder named in `config` and trace its prompt."""
    from clt.lm.loading import load_model

    if not config.prompt.strip():
        raise ConfigError("the prompt is empty: give some text to trace")
    model = load_model(config.model)
    if not config.transcoder:  # the transcoder shipped for an embedded model, recorded by path
        from clt.bundled import resolve_transcoder

        config = dataclasses.replace(config,
                                     transcoder=resolve_transcoder(None, model.cfg.name))
    tc_cfg, tc_params = load_any_transcoder(config.transcoder)
    check_model(tc_cfg, model.cfg)
    if model.tokenizer is None:
        raise ConfigError(f"model '{config.model}' has no tokenizer: cannot encode the prompt")
    tok = model.tokenizer
    ids = tok.encode(config.prompt, add_bos=False)
    return trace_tokens(model.params, model.cfg, tc_cfg, tc_params, ids, config,
                        token_strings=tok.token_strings(ids),
                        logit_strings=lambda t: tok.token_strings([int(i) for i in t]),
                        progress=progress)


def load_any_transcoder(ref: str):
    """`clt.circuit_tracer_io.load_transcoder` when available (our layout, circuit-tracer layout,
    hub repos), else our own layout only."""
    try:
        from clt.circuit_tracer_io import load_transcoder
    except ImportError:
        from pathlib import Path

        from clt.transcoder import load

        if not Path(ref).is_dir():
            raise ConfigError(f"no transcoder directory at '{ref}'") from None
        return load(ref)
    return load_transcoder(ref)


__all__ = ["TraceConfig", "load_any_transcoder", "select_logits", "trace", "trace_tokens"]
