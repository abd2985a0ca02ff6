"""What goes into the page: the nodes and edges a viewer can hold, chosen under size caps.

An unpruned graph of a long prompt has tens of thousands of nodes and a dense adjacency of
hundreds of millions of edges: Neuronpedia's 1.7 GB JSON for a 73-token prompt is what happens
when all of it is shipped. The page instead holds

* nodes: tokens and logits always; feature and error nodes in order of their influence on the
  logits (`attribution.prune.node_influence`) until their cumulative share reaches
  `ViewConfig.max_influence`, at most `max_nodes` of them. The page's pruning slider then moves
  *within* these, with the same rule as `attribution.prune` (a node shows when the nodes more
  influential than it have not yet reached the threshold);
* edges: each held node's strongest `max_edges_per_node` incoming and outgoing edges (edges
  tied with the last of them kept too), at most
  `max_edges` in all, ranked by the edge score of `attribution.prune` (the edge's share of its
  target's input times the target's influence), so the edges kept are those that matter for the
  output, not just the largest raw weights.

Everything left out is counted in the report, and the page shows the counts.

The page opens on a view a person can read: the `node_budget` most influential feature and error
nodes of those held (`budget`), with every token and logit, their edges drawn and their labels
shown. It also holds, computed here, the strongest paths from the tokens to each target
(`viewer.paths`) and suggested supernodes among the features of that first view
(`viewer.supernodes`). Features are named `LAYER:FEATURE@POS` (`viewer.names`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from attribution.export import metadata, node_ids, node_record
from attribution.graph import Graph, count_edges
from attribution.influence import RowSums, cumulative_share, edge_scores
from attribution.prune import find_threshold, node_influence
from clt.configs import ConfigError, doc, to_dict
from viewer import supernodes
from viewer.layout import ERROR, FEATURE, LOGIT, TOKEN, layout
from viewer.names import feature_name, steer_parts
from viewer.paths import top_paths

MAX_NODE_BUDGET = 100_000
MAX_PATHS = 50

PAGE_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class ViewConfig:
    """What the HTML page holds and shows first; saved in the page's metadata."""

    max_influence: float = doc(
        "Hold feature and error nodes up to this cumulative share of influence on the logits "
        "(the range of the page's pruning slider).", default=0.99)
    max_nodes: int = doc("At most this many feature and error nodes in the page (the most "
                         "influential).", default=5000)
    max_edges_per_node: int = doc(
        "Hold each node's strongest this-many incoming and this-many outgoing edges.", default=48)
    max_edges: int = doc("At most this many edges in the page (the strongest by influence).",
                         default=100_000)
    node_budget: int = doc(
        "The page opens on this many feature and error nodes, the most influential on the "
        "targets (with every token and logit); a page control changes it.", default=100)
    node_threshold: float | None = doc(
        "Initial position of the pruning slider (cumulative influence); None: the trace's "
        "node_threshold.", default=None)
    errors: bool = doc("Hold error nodes (the transcoder's reconstruction errors).", default=True)
    view_edges: bool = doc(
        "Draw every held edge between the nodes shown from the start (the page's 'edges' box); "
        "off: only the edges of hovered, clicked and pinned nodes, and the strongest edges.",
        default=True)
    strongest_edges: int = doc(
        "Draw this many strongest edges among the nodes shown from the start (0: none; the page "
        "has a toggle and slider).", default=0)
    top_paths: int = doc("Paths listed per target in the page's top-paths panel (0: none).",
                         default=5)
    suggested_supernodes: int = doc(
        "At most this many suggested supernodes (groups of the first view's features; 0: "
        "none).", default=supernodes.MAX_SUGGESTIONS)
    title: str = doc("Page title; default: the prompt.", default="")
    max_json_nodes: int = doc(
        "A Neuronpedia graph JSON with more nodes than this is refused before any allocation "
        "(the page is built from its dense adjacency: 16,384 nodes take 1 GiB).", default=16384)
    schema_version: int = doc("Version of this config's JSON layout.", default=1)

    def __post_init__(self):
        if not 0.0 < self.max_influence <= 1.0:
            raise ConfigError(f"ViewConfig.max_influence must be in (0, 1], got "
                              f"{self.max_influence}")
        if self.node_threshold is not None and not 0.0 <= self.node_threshold <= 1.0:
            raise ConfigError(f"ViewConfig.node_threshold must be in [0, 1], got "
                              f"{self.node_threshold}")
        if not 1 <= self.node_budget <= MAX_NODE_BUDGET:
            raise ConfigError(f"ViewConfig.node_budget must be in [1, {MAX_NODE_BUDGET}], got "
                              f"{self.node_budget}")
        if not 0 <= self.top_paths <= MAX_PATHS:
            raise ConfigError(f"ViewConfig.top_paths must be in [0, {MAX_PATHS}], got "
                              f"{self.top_paths}")
        for name in ("max_nodes", "max_edges_per_node", "max_edges", "strongest_edges",
                     "suggested_supernodes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ViewConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_json_nodes < 1:
            raise ConfigError(f"ViewConfig.max_json_nodes must be >= 1, got "
                              f"{self.max_json_nodes}")


@dataclass(frozen=True)
class Selection:
    """The graph nodes and edges held by a page, in page order (indices into the graph)."""

    nodes: np.ndarray  # [n] graph node indices
    kind: np.ndarray  # [n] FEATURE .. LOGIT
    cumulative: np.ndarray  # [graph nodes] cumulative influence share at each node's rank
    before: np.ndarray  # [graph nodes] the same, excluding the node itself
    influence: np.ndarray  # [graph nodes]
    edge_target: np.ndarray  # [e] page indices, edges sorted by |weight|, strongest first
    edge_source: np.ndarray  # [e]
    edge_weight: np.ndarray  # [e] raw adjacency weights
    edge_norm: np.ndarray  # [e] |weight| / the target's sum of |incoming| (as influence)
    edge_score: np.ndarray  # [e] pruning's edge score (edge_norm x target influence + logit w)
    input_abs: np.ndarray  # [n] each held node's sum of |incoming edges| (full graph)
    report: dict


def cumulative_influence(influence: np.ndarray, total: float | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Deprecated alias (kept for a release): `attribution.influence.cumulative_share`."""
    return cumulative_share(influence, total)


def _kinds(graph: Graph) -> np.ndarray:
    r = graph.ranges
    kind = np.empty(graph.n_nodes, np.int8)
    for code, s in ((FEATURE, r.feature), (ERROR, r.error), (TOKEN, r.token), (LOGIT, r.logit)):
        kind[s] = code
    return kind


def select(graph: Graph, config: ViewConfig) -> Selection:
    """Choose the nodes and edges of the page (see the module docstring)."""
    kind = _kinds(graph)
    pruned = graph.pruned  # the tracer's: its influence and row sums, already taken
    infl = (node_influence(graph) if pruned is None else pruned.influence).astype(np.float64)
    total = graph.influence_total() if graph.streamed else None
    cum, before = cumulative_share(infl, total)  # "before" decides visibility
    sources = (kind == FEATURE) | ((kind == ERROR) & config.errors)
    # Shares of all sources' influence (a streamed graph's left-out features count in it).
    src_total = None if total is None else float(infl[sources].sum()) + \
        graph.full_graph.influence_left_out
    cut = find_threshold(infl[sources], config.max_influence, src_total) if sources.any() \
        else 0.0
    candidates = np.nonzero(sources & (infl >= cut) & (infl > 0))[0]
    capped = candidates[np.argsort(-infl[candidates], kind="stable")[:config.max_nodes]]
    nodes = np.sort(np.concatenate([capped, np.nonzero(kind >= TOKEN)[0]]))

    if graph.input_abs is not None:
        sums = graph.input_abs[nodes]
    else:
        known = RowSums.reuse(None if pruned is None else pruned.sums, graph.n_nodes,
                              graph.ranges.error)
        sums = known.at(graph.adjacency, nodes, errors=False)[0]
    tgt, src, w, norm, escore, edge_report = _edges(graph, nodes, infl, sums, config)
    n_feat = int((kind == FEATURE).sum())
    n_err = int((kind == ERROR).sum())
    held = kind[nodes]
    report = {
        "nodes_in_graph": int(graph.n_nodes), "nodes_held": len(nodes),
        "features_held": int((held == FEATURE).sum()), "features_in_graph": n_feat,
        "errors_held": int((held == ERROR).sum()), "errors_in_graph": n_err,
        "nodes_left_out": int(graph.n_nodes - len(nodes)),
        "left_out_below_influence": int((sources & ~((infl >= cut) & (infl > 0))).sum()),
        "left_out_over_node_cap": int(len(candidates) - len(capped)),
        "left_out_errors_off": 0 if config.errors else n_err,
        **edge_report,
    }
    if graph.streamed:  # the graph itself stores part of its full graph (attribution.graph)
        full = graph.full_graph
        report["full_graph"] = {k: getattr(full, k) for k in ("features", "nodes", "edges",
                                                              "features_left_out")}
    return Selection(nodes, held, cum, before, infl, tgt, src, w, norm, escore, sums, report)


def budget(sel: Selection, n: int, errors: bool = True) -> np.ndarray:
    """Page indices of the `n` feature (and error, with `errors`) nodes of the page most
    influential on the targets (`node_influence`; ties: graph order), in that order: the
    page's first view, less its tokens and logits."""
    order = _by_influence(sel)
    ok = (sel.kind == FEATURE) | ((sel.kind == ERROR) & errors)
    return order[ok[order]][:n]


def _by_influence(sel: Selection) -> np.ndarray:
    """Page indices of the feature and error nodes, most influential first."""
    src = np.nonzero(sel.kind <= ERROR)[0]
    return src[np.argsort(-sel.influence[sel.nodes[src]], kind="stable")]


def _top_mask(score: np.ndarray, k: int, axis: int) -> np.ndarray:
    """True where an entry of `score` (>= 0, edge scores) is among the k largest of its row
    (axis=1) or column (axis=0): at least its k-th largest value (entries tied with it are all
    kept; every entry of a line with fewer than k nonzero ones). The k-th values come from
    partitions of contiguous copies, `TOP_LINES` lines at a time, which is several times faster
    than ranking every entry (`argpartition` over a page's ~25M scores took seconds); a copy of
    columns is transposed `TOP_BLOCK` rows at a time (a strided copy of whole columns took
    longer than their partition). In each copy the zeros become distinct negative numbers: a
    partition among many equal values is slow (a page's scores are ~2/3 zeros; 0.22 -> 0.06 s
    for its rows), and a k-th value below 0 keeps what a k-th value of 0 would (all of it)."""
    n = score.shape[axis]
    if k <= 0 or n == 0:
        return np.zeros(score.shape, bool)
    if k >= n:
        return np.ones(score.shape, bool)
    m = score.shape[1 - axis]
    kth = np.empty(m, score.dtype)
    stand_in = -np.arange(1, n + 1, dtype=score.dtype)  # for the zeros of a line
    for i in range(0, m, TOP_LINES):  # a copy: partitioned in place
        if axis == 1:
            lines = np.array(score[i:i + TOP_LINES], order="C")
        else:
            cols = score[:, i:i + TOP_LINES]
            lines = np.empty((cols.shape[1], n), score.dtype)
            for j in range(0, n, TOP_BLOCK):
                lines[:, j:j + TOP_BLOCK] = cols[j:j + TOP_BLOCK].T
        np.copyto(lines, stand_in, where=lines == 0)
        lines.partition(n - k, axis=1)
        kth[i:i + TOP_LINES] = lines[:, n - k]
    return score >= (kth[:, None] if axis == 1 else kth[None, :])


TOP_LINES = 256  # `_top_mask`'s lines per copy: a 5,016-node page's scores, 0.49 -> 0.31 s
TOP_BLOCK = 64  # `_top_mask`'s rows per block of a transposed copy of columns


def _edges(graph: Graph, nodes: np.ndarray, infl: np.ndarray, sums: np.ndarray,
           config: ViewConfig):
    """Edges among the held nodes under the caps, as page indices, strongest |weight| first:
    (targets, sources, weights, normalised weights, edge scores, report)."""
    A = graph.adjacency
    sub = A[np.ix_(nodes, nodes)].astype(np.float32, copy=False)  # [target, source]
    # Pruning's edge score: share of the target's whole input (all sources, held or not: the
    # full graph's, for a streamed graph, `sums`) times the target's influence plus its logit
    # weight.
    score = edge_scores(sub, (infl + graph.logit_weights())[nodes], sums)
    nonzero = sub != 0
    keep = (_top_mask(score, config.max_edges_per_node, axis=1)
            | _top_mask(score, config.max_edges_per_node, axis=0)) & nonzero
    n_capped_node = int(nonzero.sum() - keep.sum())
    tgt, src = np.nonzero(keep)
    s = score[tgt, src]
    if len(s) > config.max_edges:
        top = np.argpartition(-s, config.max_edges - 1)[:config.max_edges]
        tgt, src = tgt[top], src[top]
    w = sub[tgt, src]
    order = np.argsort(-np.abs(w), kind="stable")
    total = count_edges(A)
    report = {"edges_in_graph": total, "edges_held": len(order),
              "edges_left_out": total - len(order),
              "left_out_edge_per_node_cap": n_capped_node,
              "left_out_edge_total_cap": int(keep.sum()) - len(order),
              "left_out_edges_of_left_out_nodes": total - int(nonzero.sum())}
    tgt, src, w = tgt[order], src[order], w[order]
    # Each edge's share of its target's input: the score with unit target weight.
    norm = edge_scores(w[:, None], np.ones(len(w)), sums[tgt])[:, 0]
    return tgt.astype(np.int32), src.astype(np.int32), w, norm, score[tgt, src], report


# --- the page's data -----------------------------------------------------------------------------
def _nums(values, fmt: str) -> str:
    """A JSON array of numbers written with `fmt` (short: the page is mostly these arrays)."""
    return "[" + ",".join(format(float(v), fmt) for v in values) + "]"


def _plain(value):
    """JSON for what graph.info may hold besides JSON types (numpy scalars, paths)."""
    return value.item() if hasattr(value, "item") else str(value)


def _ints(values) -> str:
    return "[" + ",".join(str(int(v)) for v in values) + "]"


def page_paths(sel: Selection, k: int) -> list[dict]:
    """Each target's (logit node's) k strongest paths from the tokens through the held edges
    (`viewer.paths`), as page indices: [{"target", "paths": [[score, nodes, edges], ...]}]."""
    starts, ends = np.nonzero(sel.kind == TOKEN)[0], np.nonzero(sel.kind == LOGIT)[0]
    found = top_paths(len(sel.nodes), sel.edge_source, sel.edge_target, sel.edge_norm, starts,
                      ends, k)
    return [{"target": int(t), "paths": [[float(f"{p.score:.4g}"), list(p.nodes), list(p.edges)]
                                         for p in found[int(t)]]} for t in ends]


def suggested_supernodes(graph: Graph, sel: Selection, config: ViewConfig,
                         cards: dict | None = None) -> list[dict]:
    """Suggested groups (`viewer.supernodes`) of the features of the page's first view, members
    as page indices. `cards`: the page's cards payload (`viewer.features.cards_for`), whose top
    output tokens group features too."""
    members = budget(sel, config.node_budget)
    members = members[sel.kind[members] == FEATURE]
    if len(members) < 2 or config.suggested_supernodes == 0:
        return []
    i = sel.nodes[members] - graph.ranges.feature.start
    layer, fidx, pos = graph.feature_layer[i], graph.feature_index[i], graph.feature_pos[i]
    vectors = supernodes.out_vectors(graph.adjacency[np.ix_(sel.nodes, sel.nodes[members])],
                                     sel.input_abs)
    top, text = None, None
    if cards:
        c = cards["cards"]
        top = [(c.get(f"{a}_{f}") or {}).get("pos") for a, f in zip(layer, fidx)]
        top = [t[0][0] if t else -1 for t in top]
        vocab = cards.get("vocab", {})

        def text(t):
            return vocab.get(str(t), f"<{t}>")
    found = supernodes.suggest(layer, pos, vectors, sel.influence[sel.nodes[members]], top,
                               text, lambda p: graph.token_strings[p],
                               config.suggested_supernodes)
    return [{**g, "members": [int(members[m]) for m in g["members"]]} for g in found]


def page_data(graph: Graph, sel: Selection, config: ViewConfig,
              labels: dict[tuple[int, int], str] | None = None,
              cards: dict | None = None) -> tuple[str, dict]:
    """The page's graph data as JSON text (columnar arrays; numbers written short) and its
    metadata dict. `labels` maps (layer, feature index) to a feature's label; `cards` is the
    page's cards payload (`viewer.features.cards_for`), if any."""
    r = graph.ranges
    n = sel.nodes
    kind = sel.kind
    layer = np.full(len(n), -1, np.int64)
    pos = np.zeros(len(n), np.int64)
    ref = np.full(len(n), -1, np.int64)  # feature index, or token id for tokens and logits
    act = np.zeros(len(n))
    for code, rng, lay, p, f, a in (
            (FEATURE, r.feature, graph.feature_layer, graph.feature_pos, graph.feature_index,
             graph.activation),
            (ERROR, r.error, graph.error_layer, graph.error_pos, None, None)):
        m = kind == code
        i = n[m] - rng.start
        layer[m], pos[m] = lay[i], p[i]
        if f is not None:
            ref[m], act[m] = f[i], a[i]
    m = kind == TOKEN
    pos[m] = n[m] - r.token.start
    ref[m] = graph.tokens[pos[m]]
    m = kind == LOGIT
    layer[m] = graph.n_layers
    pos[m] = graph.n_pos - 1
    ref[m] = graph.logit_tokens[n[m] - r.logit.start]
    x, y, axis = layout(kind, layer, pos, sel.influence[n], graph.n_pos, graph.n_layers)
    ids = node_ids(graph)
    labels = labels or {}
    text = [labels.get((int(layer[i]), int(ref[i])), "") if kind[i] == FEATURE else ""
            for i in range(len(n))]
    # A target's weight by its place in the logit range (custom targets, e.g. a logit
    # difference, may share a token id or have no probability: NaN is written as 0).
    logit_p = np.zeros(len(n))
    m = kind == LOGIT
    logit_p[m] = np.nan_to_num(np.asarray(graph.logit_probs, np.float64)[n[m] - r.logit.start],
                               nan=0.0, posinf=0.0, neginf=0.0)
    names = [feature_name(int(layer[i]), int(ref[i]), int(pos[i])) if kind[i] == FEATURE else ""
             for i in range(len(n))]
    rank = np.full(len(n), -1, np.int64)
    rank[_by_influence(sel)] = np.arange(int((kind <= ERROR).sum()))
    total = max(float(sel.influence.sum()), 1e-30)

    threshold = config.node_threshold
    if threshold is None:
        threshold = float(graph.config.get("node_threshold") or 0.8)
    info = graph.summary()
    meta = {
        "schema_version": PAGE_SCHEMA_VERSION, "title": config.title or graph.prompt,
        "prompt": graph.prompt, "n_layers": graph.n_layers, "n_pos": graph.n_pos,
        "bos": graph.bos, "logit_strings": list(graph.logit_strings),
        "error_name": graph.error_name,  # "other neurons" in a neuron graph
        "node_threshold": threshold, "config": to_dict(config), "info": info,
        "report": sel.report, "transcoder": graph.config.get("transcoder", ""),
        "model": graph.info.get("model", graph.config.get("model", "")),
        # The page's export writes what attribution.export writes: its metadata, and the
        # record of each node (the page sets a feature's clerp from its label).
        "neuronpedia": metadata(graph, threshold),
        "steer": dict(zip(("head", "tail"), steer_parts(graph))),
    }
    parts = {
        "meta": json.dumps(meta, default=_plain), "tokens": json.dumps(list(graph.token_strings)),
        "axis": json.dumps(axis.to_json()),
        "id": json.dumps([ids[i] for i in n]), "kind": _ints(kind), "layer": _ints(layer),
        "pos": _ints(pos), "ref": _ints(ref), "act": _nums(act, ".4g"),
        "cum": _nums(sel.cumulative[n], ".6g"), "before": _nums(sel.before[n], ".7g"),
        "infl": _nums(sel.influence[n] / total, ".4g"), "p": _nums(logit_p, ".9g"),
        "x": _nums(x, ".1f"), "y": _nums(y, ".1f"), "label": json.dumps(text),
        "name": json.dumps(names), "rank": _ints(rank),
        "es": _ints(sel.edge_source), "et": _ints(sel.edge_target),
        "ew": _nums(sel.edge_weight, ".4g"), "sc": _nums(sel.edge_score, ".3g"),
        "paths": json.dumps(page_paths(sel, config.top_paths), separators=(",", ":")),
        "suggest": json.dumps(suggested_supernodes(graph, sel, config, cards),
                              separators=(",", ":")),
        "np": json.dumps([node_record(graph, int(i), sel.cumulative) for i in n],
                         separators=(",", ":"), default=_plain),
    }
    return "{" + ",".join(f'"{k}":{v}' for k, v in parts.items()) + "}", meta


__all__ = ["PAGE_SCHEMA_VERSION", "Selection", "ViewConfig", "budget", "cumulative_influence",
           "page_data", "page_paths", "select", "suggested_supernodes"]
