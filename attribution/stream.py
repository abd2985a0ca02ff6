"""The streamed trace: every row of the full graph folded into exact influences and scores as it
is made, never held (`TraceConfig.adjacency = "stream"`).

Batches go top layer first, one layer at a time; since every edge points from a lower layer to a
higher one (or to a logit), a target's influence on the logits is final by the time its row is
made, so one pass of `attribution.influence.spread` (weighted by the target's influence plus its
logit probability) gives every source's influence, the same numbers `attribution.influence.
influence` iterates to on the whole matrix. Each row's |A| sum and its error part give the
completeness score (`attribution.influence.graph_scores_from`). What is stored is the dense graph
of the `stream_features` most influential features, their rows made a second time.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from attribution.graph import FullGraph, LeftOutFeatures
from attribution.hostmem import zeros
from attribution.influence import graph_scores_from, spread
from attribution.replacement import ActiveFeatures
from clt.configs import ConfigError


def chunks(idx: np.ndarray, size: int) -> list[np.ndarray]:
    return [idx[i:i + size] for i in range(0, len(idx), size)]


def rows_ahead(make, active: ActiveFeatures, batches):
    """Each batch's feature rows on the host, as (batch, rows [len(batch), sources]), made one
    batch ahead: the next batch is dispatched before this one's rows are fetched, so the device
    (on a CPU, XLA's threads) makes it while the caller stores these. The one home of that
    overlap (`_all_rows`, the greedy visit and the streamed graph's stored rows use it)."""
    def fetched(c, rows):
        return c, np.asarray(jax.device_get(rows))[:len(c)]

    ahead = None
    for c in batches:
        rows = make.features(active, c, host=False, padded=True)
        if ahead is not None:
            yield fetched(*ahead)
        ahead = (c, rows)
    if ahead is not None:
        yield fetched(*ahead)


def dense_batches(active: ActiveFeatures, batch: int, prefix_length) -> list[np.ndarray]:
    """The feature batches of a dense full graph, whose rows do not depend on the batches: the
    features sorted by their position prefix (`prefix_length` of one position), then layer, then
    position, then cut. So each batch's sweep runs on its own prefix, stops above its layer, and
    a batch mixes prefixes or layers only at the seams."""
    if not len(active):
        return []
    P = np.asarray([prefix_length(np.array([p])) for p in range(int(active.pos.max()) + 1)])
    return chunks(np.lexsort((active.pos, active.layer, P[active.pos])), batch)


def stream_batches(active: ActiveFeatures, n_layers: int, batch: int) -> list[np.ndarray]:
    """The feature batches of a streamed trace, in order: top layer first, one layer per batch,
    by position within a layer (so each batch's position prefix is short)."""
    return [c for layer in range(n_layers - 1, -1, -1)
            for c in chunks(np.nonzero(active.layer == layer)[0], batch)]


def visit_batches(active: ActiveFeatures, pending: np.ndarray, batch: int) -> list[np.ndarray]:
    """The batches of one group of a greedy visit (`attribution.trace._greedy_rows`): the
    features sorted by layer (each batch's sweep stays short) and by position within a layer
    (its position prefix too), then cut; the planner replays it (`attribution.plan`)."""
    return chunks(pending[np.lexsort((active.pos[pending], active.layer[pending]))], batch)


@partial(jax.jit, static_argnames=("errors",))
def absorb(influence, rows, node, extra, *, errors: tuple[int, int]):
    """Fold a batch of rows into the influence of their sources (`spread`), each row weighted by
    its target's influence (node >= 0: read from `influence`, already final) plus `extra` (a
    logit's probability). Returns (influence, |A| row sums, |A| sums over the error columns,
    nonzero count)."""
    a = jnp.abs(rows)
    sums = a.sum(axis=1)
    w = jnp.where(node >= 0, influence[jnp.maximum(node, 0)], 0.0) + extra
    influence = influence + spread(w, a, sums, xp=jnp)
    return influence, sums, a[:, errors[0]:errors[1]].sum(axis=1), jnp.count_nonzero(rows)


# A dense graph's bytes per entry: the adjacency (4) and pruning's kept-edge mask (1; pruning
# and scores read the adjacency chunk by chunk, `attribution.prune`).
DENSE_BYTES = 5


def available_bytes() -> float:
    """Memory the process could still take (psutil; unlimited where unknown)."""
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except (ImportError, OSError, RuntimeError):  # no psutil, or no /proc
        return float("inf")


def use_stream(config, n_all: int, cap: int, n_src: int, n_err: int, T: int,
               n_logit: int) -> bool:
    """Whether to stream (see TraceConfig.adjacency); refuses graphs whose stored adjacency
    would exceed max_adjacency_gb, naming the setting to change."""
    capped = cap < n_all
    n_dense = cap + n_err + T + n_logit
    # Capped: the greedy visit holds its rows over every source until the end.
    dense_gb = (n_dense**2 if not capped else (cap + n_logit) * n_src) * 4 / 2**30
    # auto: stream past max_adjacency_gb, or when the dense graph and pruning's mask of it
    # (attribution.plan's memory model) would not fit in the memory available now.
    stream = not capped and (config.adjacency == "stream" or (
        config.adjacency == "auto" and (dense_gb > config.max_adjacency_gb or
                                        n_dense**2 * DENSE_BYTES > 0.9 * available_bytes())))
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


def stream(make, active, batch, logit_dirs, logit_weights, n_err, T, n_keep, bar, task):
    """Every row of the full graph, folded as it is made (module docstring); then the dense
    graph of the `n_keep` most influential features. `make` is the tracer's row maker
    (`attribution.trace._RowMaker`). Returns (selected features, adjacency, the Graph fields of a
    streamed graph)."""
    L = make.cfg.n_layers
    n_all = len(active)
    n_src = n_all + n_err + T
    n_logit = len(logit_dirs)
    errors = (n_all, n_all + n_err)
    influence = jnp.zeros(n_src, make.out_dtype)
    sums = np.zeros(n_all + n_logit, np.float64)  # features, then logits
    err_sums = np.zeros(n_all + n_logit, np.float64)
    logit_rows = []
    # Each batch's (rows it sums, sums, error sums, nonzeros), fetched at the end: the host
    # waits for the batch before this one only, so one batch is made while the next is
    # dispatched, and no more than two hold their rows (a long prompt's are GBs).
    folded = []

    def fold(rows, nodes, extra, where):
        nonlocal influence
        B = rows.shape[0]
        node = np.full(B, -1, np.int32)
        node[:len(nodes)] = nodes
        ex = np.zeros(B, make.out_dtype)
        ex[:len(extra)] = extra
        influence, s, e, nz = absorb(influence, rows, jnp.asarray(node), jnp.asarray(ex),
                                     errors=errors)
        folded.append((where, s, e, nz))
        if len(folded) > 1:
            folded[-2][1].block_until_ready()

    for c in chunks(np.arange(n_logit), batch):
        rows = make(np.full(len(c), L, np.int32), np.full(len(c), T - 1, np.int32),
                    logit_dirs[c], host=False, padded=True)
        fold(rows, [], logit_weights[c], n_all + c)
        logit_rows.append(np.asarray(jax.device_get(rows))[:len(c)])
        bar.advance(task, len(c))
    for c in stream_batches(active, L, batch):
        fold(make.features(active, c, host=False, padded=True), c, [], c)
        bar.advance(task, len(c))
    infl = np.asarray(jax.device_get(influence), np.float64)
    edges = 0
    for where, s, e, nz in jax.device_get(folded):
        sums[where] = np.asarray(s, np.float64)[:len(where)]
        err_sums[where] = np.asarray(e, np.float64)[:len(where)]
        edges += int(nz)

    # The full graph's scores, from every node's influence and input sums (errors and tokens
    # have no inputs; logits no influence).
    pad = np.zeros(n_err + T)
    replacement, completeness = graph_scores_from(
        np.concatenate([infl, np.zeros(n_logit)]),
        np.concatenate([np.zeros(n_src), np.asarray(logit_weights, np.float64)]),
        np.concatenate([sums[:n_all], pad, sums[n_all:]]),
        np.concatenate([err_sums[:n_all], pad, err_sums[n_all:]]),
        slice(n_all + n_err, n_src), slice(*errors))

    # The stored graph: the most influential features, their rows made again.
    n_keep = min(n_keep, n_all)
    selected = np.sort(np.argsort(-infl[:n_all], kind="stable")[:n_keep])
    bar.update(task, total=n_logit + n_all + n_keep)
    keep_cols = np.concatenate([selected, np.arange(n_all, n_src)])
    N = n_keep + n_err + T + n_logit
    adjacency = zeros((N, N), make.out_dtype)
    for i, (c, rows) in zip(range(0, n_keep, batch),
                            rows_ahead(make, active, chunks(selected, batch))):
        adjacency[i:i + len(c), :N - n_logit] = rows[:, keep_cols]
        bar.advance(task, len(c))
    adjacency[N - n_logit:, :N - n_logit] = np.concatenate(logit_rows)[:, keep_cols]
    left_out = np.setdiff1d(np.arange(n_all), selected)
    full_graph = FullGraph(
        features=n_all, nodes=n_src + n_logit, edges=edges, features_left_out=len(left_out),
        influence_left_out=float(infl[left_out].sum()), replacement_score=replacement,
        completeness_score=completeness)
    extra = {"influence": np.concatenate([infl[keep_cols], np.zeros(n_logit)]),
             "input_abs": np.concatenate([sums[selected], pad, sums[n_all:]]),
             "input_error_abs": np.concatenate([err_sums[selected], pad, err_sums[n_all:]]),
             "full_graph": full_graph,
             "left_out": LeftOutFeatures(active.layer[left_out], active.pos[left_out],
                                         active.index[left_out],
                                         active.value[left_out].astype(np.float32),
                                         infl[left_out].astype(np.float32))}
    return selected, adjacency, extra


__all__ = ["absorb", "chunks", "dense_batches", "rows_ahead", "stream", "stream_batches", "use_stream",
           "visit_batches"]
