"""The attribution graph artifact: nodes in named ranges, the dense unpruned adjacency, save/load.

A *streamed* graph (a prompt whose full adjacency is too large to hold) stores the dense adjacency
of its most influential features only, with every error, token and logit node, plus the full
graph's influence and |A| row sums of the nodes stored and the full graph's scores; `prune`,
`graph_scores` and the viewer use those, so their results are the full graph's.

An attribution graph ("Circuit Tracing", Ameisen et al., 2025, §2.3) has four kinds of nodes,
stored in this order, each kind a named range (`Graph.ranges`):

    features  active transcoder features (layer, pos, feature index, activation), sorted
    errors    one error node per (layer, pos), pos >= 1 when position 0 is a prepended BOS
    tokens    one embedding node per position (the BOS included)
    logits    the targets attributed: by default the most probable next tokens; or the user's
              (`TraceConfig.target`): tokens, logit differences, or a direction read after the
              final norm (`target_weights` then holds their weights in influence)

`adjacency[target, source]` is the direct effect of the source on the target through the frozen
linear model (see `attribution.trace`). Only features and logits have incoming edges; errors and
tokens are pure sources; logits are pure targets. Positions count the BOS as 0.

Saved as one `.npz` (arrays plus the trace config and metadata as JSON strings, so the file is
self-contained) and a `config.json` beside it, as every artifact of the project; no pickles.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from jaxtyping import Float, Int

from attribution.hostmem import zeros
from clt.configs import ConfigError, from_dict, to_dict
from clt.io import atomic_write, check_npz_size

GRAPH_SCHEMA_VERSION = 2  # 2: sparse edges, partial (slim) graphs
_READS = (1, 2)
MAX_GRAPH_BYTES = 32 * 2**30  # what a graph file may hold once read (the dense 2x a 16 GB cap)
KINDS = ("feature", "error", "token", "logit")


@dataclass(frozen=True)
class NodeRanges:
    """Where each kind of node lives in the node axis."""

    feature: slice
    error: slice
    token: slice
    logit: slice

    @property
    def n_nodes(self) -> int:
        return self.logit.stop

    def kind_of(self, node: int) -> str:
        for kind in KINDS:
            r = getattr(self, kind)
            if r.start <= node < r.stop:
                return kind
        raise IndexError(f"node {node} outside the graph (0..{self.n_nodes - 1})")


@dataclass(frozen=True)
class FullGraph:
    """What a streamed graph knows of the full graph it stores part of (computed while tracing)."""

    features: int  # active features (all of them are in the full graph)
    nodes: int
    edges: int  # nonzero edges
    features_left_out: int  # features not stored (the least influential)
    influence_left_out: float  # their total influence on the logits
    replacement_score: float
    completeness_score: float
    # A slim graph file (`attribution.slim`) stores its full graph pruned at these thresholds.
    pruned_node_threshold: float | None = None
    pruned_edge_threshold: float | None = None

    @property
    def slim(self) -> bool:
        return self.pruned_node_threshold is not None


@dataclass(frozen=True)
class LeftOutFeatures:
    """The active features a partial graph does not store: where they are, their activation and
    their influence on the targets in the full graph (the influence ranking stays complete)."""

    layer: Int[np.ndarray, " left_out"]  # int32
    pos: Int[np.ndarray, " left_out"]  # int32
    index: Int[np.ndarray, " left_out"]  # int32
    activation: Float[np.ndarray, " left_out"]  # float32
    influence: Float[np.ndarray, " left_out"]  # float32

    def __len__(self) -> int:
        return len(self.layer)


@dataclass(frozen=True)
class Scores:
    """Replacement and completeness scores of a graph (`attribution.prune.score`): unpruned (a
    streamed graph: its full graph's) and pruned at the trace's node / edge thresholds."""

    replacement: float
    completeness: float
    pruned_replacement: float
    pruned_completeness: float

    def to_dict(self) -> dict:
        """The names graphs have used in their info and Neuronpedia metadata (`*_score`)."""
        return {f"{k}_score": v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Scores:
        return cls(**{f.name: float(d[f"{f.name}_score"]) for f in fields(cls)})


@dataclass
class Graph:
    """An unpruned attribution graph for one prompt (see the module docstring)."""

    tokens: Int[np.ndarray, " pos"]  # int32 input ids, BOS included
    token_strings: list[str]  # [pos]
    feature_layer: Int[np.ndarray, " feature"]  # int32
    feature_pos: Int[np.ndarray, " feature"]  # int32
    feature_index: Int[np.ndarray, " feature"]  # int32
    activation: Float[np.ndarray, " feature"]  # float32
    error_layer: Int[np.ndarray, " error"]  # int32
    error_pos: Int[np.ndarray, " error"]  # int32
    logit_tokens: Int[np.ndarray, " logit"]  # int32
    logit_strings: list[str]
    logit_probs: Float[np.ndarray, " logit"]  # float32; 0 for a difference or a direction
    adjacency: Float[np.ndarray, "node node"]  # float32, rows = targets, columns = sources
    n_layers: int
    bos: bool  # position 0 is a prepended BOS (its features and errors are not nodes)
    prompt: str = ""
    config: dict = field(default_factory=dict)  # the TraceConfig, as a dict
    info: dict = field(default_factory=dict)  # model / transcoder names, scores, timings
    n_active_total: int = -1  # active features before any max_feature_nodes cap
    # A streamed graph (TraceConfig.adjacency="stream") stores only the most influential features
    # of the full graph; for the nodes it stores, these hold what the full graph says (None in a
    # dense graph, where the adjacency says it all); `full_graph` has the full graph's counts,
    # scores and the influence of the features left out.
    influence: Float[np.ndarray, " node"] | None = None  # influence on the logits, full graph
    input_abs: Float[np.ndarray, " node"] | None = None  # sum of |incoming edges|, full graph
    input_error_abs: Float[np.ndarray, " node"] | None = None  # the same, error sources only
    full_graph: FullGraph | None = None  # streamed graphs only
    scores: Scores | None = None  # set by the tracer (None: a graph read from elsewhere)
    # User-chosen targets (`attribution.trace.Targets`): each target's weight in influence (the
    # logit nodes are then those targets); None: the most probable tokens, weighted by their
    # probabilities.
    target_weights: Float[np.ndarray, " logit"] | None = None
    left_out: LeftOutFeatures | None = None  # partial graphs: the features not stored
    # The tracer's pruning at its thresholds (`attribution.prune.PruneResult`), kept so that the
    # commands after it (export, slim file) do not prune again; not saved.
    pruned: object | None = field(default=None, repr=False, compare=False)
    schema_version: int = GRAPH_SCHEMA_VERSION

    def __post_init__(self):
        _check_nodes({n: getattr(self, n) for n in _ARRAYS}, self.token_strings,
                     self.logit_strings)
        n = self.ranges.n_nodes
        if self.adjacency.shape != (n, n):
            raise ValueError(f"adjacency has shape {self.adjacency.shape}, the nodes need {(n, n)}")
        for name in _FULL:
            a = getattr(self, name)
            if a is not None and a.shape != (n,):
                raise ValueError(f"{name} has shape {a.shape}, the nodes need {(n,)}")
        if self.target_weights is not None and self.target_weights.shape != \
                self.logit_probs.shape:
            raise ValueError(f"target_weights has shape {self.target_weights.shape}, the targets "
                             f"need {self.logit_probs.shape}")
        if self.streamed != (self.full_graph is not None):
            raise ValueError("a streamed graph (influence stored) needs full_graph, and only it")

    @property
    def streamed(self) -> bool:
        """Whether this graph stores only part of its full graph (see `influence`)."""
        return self.influence is not None

    def influence_total(self) -> float:
        """Total influence on the logits of every node of the full graph (those left out of a
        streamed graph included); 0 for a dense graph, whose influence is computed from the
        adjacency."""
        if not self.streamed:
            return 0.0
        return float(self.influence.sum()) + float(self.full_graph.influence_left_out)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def ranges(self) -> NodeRanges:
        f, e, t, lg = (len(self.feature_layer), len(self.error_layer), len(self.tokens),
                       len(self.logit_tokens))
        return NodeRanges(slice(0, f), slice(f, f + e), slice(f + e, f + e + t),
                          slice(f + e + t, f + e + t + lg))

    @property
    def n_nodes(self) -> int:
        return self.ranges.n_nodes

    @property
    def n_edges(self) -> int:
        return count_edges(self.adjacency)

    @property
    def custom_targets(self) -> bool:
        """Whether the logit nodes are targets the user chose (`TraceConfig.target`)."""
        return self.target_weights is not None

    def node_levels(self) -> np.ndarray:
        """[node] each node's level (`node_levels`): what lets influence take one pass."""
        return node_levels(self.feature_layer, self.error_layer, self.n_pos,
                           len(self.logit_tokens), self.n_layers)

    def logit_weights(self) -> np.ndarray:
        """[node] zeros except each target's weight in influence on the logit nodes: its
        probability (the most probable tokens), or the weight of a user-chosen target."""
        w = np.zeros(self.n_nodes, np.float64)
        w[self.ranges.logit] = (self.logit_probs if self.target_weights is None
                                else self.target_weights)
        return w

    @property
    def neurons(self) -> bool:
        """Whether the features are the model's own MLP neurons (`TraceConfig.neurons`,
        `attribution.neurons`): its error nodes then hold the units not kept as nodes."""
        return bool(self.info.get("neurons"))

    @property
    def error_name(self) -> str:
        """What the error nodes are called: "other neurons" in a neuron graph (the rest of each
        MLP's output: the units not kept, and the bias), else "error". The label, the graph
        JSON and the page all use this name."""
        return "other neurons" if self.neurons else "error"

    def summary(self) -> dict:
        """The graph's info with its scores (`*_score`), JSON scalars only: what its page and its
        Neuronpedia metadata show (a neuron graph's `neurons` flattened to True and
        `neuron_top_k`, so that a graph read back from its JSON still names its nodes)."""
        info = {k: v for k, v in self.info.items() if not isinstance(v, dict)}
        if isinstance(self.info.get("neurons"), dict):
            info |= {"neurons": True, "neuron_top_k": self.info["neurons"].get("top_k")}
        return info | (self.scores.to_dict() if self.scores is not None else {})

    def label(self, node: int) -> str:
        """A short human-readable name of a node."""
        r = self.ranges
        kind = r.kind_of(node)
        i = node - getattr(r, kind).start
        if kind == "feature":
            name = feature_name(self.feature_layer[i], self.feature_index[i], self.feature_pos[i])
            return f"{name} ({self.token_strings[self.feature_pos[i]]!r})"
        if kind == "error":
            return f"{self.error_name} L{self.error_layer[i]} @{self.error_pos[i]}"
        if kind == "token":
            return f"token {self.token_strings[i]!r} @{i}"
        if self.custom_targets:
            return f"target {self.logit_strings[i]}"
        return f"logit {self.logit_strings[i]!r} p={self.logit_probs[i]:.3f}"

    # --- save / load -----------------------------------------------------------------------------
    def save(self, path: str | Path, full: bool = False, exact: bool = False,
             pruned=None) -> Path:
        """Write `path` (.npz, self-contained) and `config.json` beside it; returns the .npz path.

        By default the file holds the graph pruned at its trace's thresholds with every node's
        full-graph influence (`attribution.slim`); `full` keeps every node and edge. Edges are
        stored sparse, in float16 scaled per row (`_pack`), or as they are under `exact`.
        `pruned`: the graph's `attribution.prune.PruneResult` at its thresholds, if made."""
        from attribution.slim import slim  # slim prunes: attribution.prune imports this module

        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        g = self if full else slim(self, pruned)
        meta = {
            "schema_version": GRAPH_SCHEMA_VERSION, "kind": "attribution_graph",
            "n_layers": g.n_layers, "bos": g.bos, "prompt": g.prompt,
            "token_strings": g.token_strings, "logit_strings": g.logit_strings,
            "config": g.config, "info": g.info, "n_active_total": g.n_active_total,
            "full_graph": to_dict(g.full_graph) if g.full_graph is not None else None,
            "scores": g.scores.to_dict() if g.scores is not None else None,
            "n_nodes": g.n_nodes,
        }
        arrays = {name: getattr(g, name) for name in _ARRAYS if name != "adjacency"}
        arrays.update(_pack(g.adjacency, exact))
        arrays.update({n: getattr(g, n) for n in _OPTIONAL if getattr(g, n) is not None})
        if g.left_out is not None:
            arrays.update({f"left_out_{f.name}": getattr(g.left_out, f.name)
                           for f in fields(LeftOutFeatures)})
        atomic_write(path, lambda f: np.savez(f, meta=np.array(json.dumps(meta)), **arrays))
        atomic_write(path.parent / "config.json", json.dumps(
            {"kind": "trace", "schema_version": GRAPH_SCHEMA_VERSION, "config": g.config},
            indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        path = Path(path)
        if path.is_dir():
            path = path / "graph.npz"
        if not path.exists():
            raise ConfigError(f"no graph at {path}")
        check_npz_size(path, MAX_GRAPH_BYTES, "graph file")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                version = meta.get("schema_version")
                if meta.get("kind") != "attribution_graph" or version not in _READS:
                    raise ConfigError(f"{path}: graph schema {version!r} is not supported "
                                      f"(this version reads {list(_READS)}); re-run the trace")
                arrays = {name: z[name] for name in _ARRAYS if name != "adjacency"}
                _check_nodes(arrays, meta["token_strings"], meta["logit_strings"])
                n = sum(len(arrays[k]) for k in ("feature_layer", "error_layer", "tokens",
                                                 "logit_tokens"))
                # Schema 1 stored the dense adjacency; schema 2 its edges, whose node count is
                # checked against the node arrays before the dense matrix is allocated.
                if version != 1 and int(meta["n_nodes"]) != n:
                    raise ValueError(f"n_nodes {meta['n_nodes']} but the node arrays hold {n}")
                if n * n * 4 > MAX_GRAPH_BYTES:
                    raise ConfigError(f"{path} has {n:,} nodes: its dense adjacency would take "
                                      f"{n * n * 4 / 2**30:.0f} GiB, more than a graph file may "
                                      f"hold ({MAX_GRAPH_BYTES / 2**30:.0f} GiB)")
                arrays["adjacency"] = z["adjacency"] if version == 1 else _unpack(z, n)
                arrays.update({n: z[n] for n in _OPTIONAL if n in z.files})
                left = {f.name: z[f"left_out_{f.name}"] for f in fields(LeftOutFeatures)
                        if f"left_out_{f.name}" in z.files}
        except ConfigError:
            raise
        except (KeyError, ValueError, TypeError, IndexError, OSError, EOFError,
                zipfile.BadZipFile) as e:
            raise ConfigError(f"{path} is not a cltrace graph, or is truncated "
                              f"({type(e).__name__}: {e}); re-run the trace") from None
        info = dict(meta["info"])
        # Graphs saved before 2026-12-02 kept both in info.
        full = meta.get("full_graph") or info.pop("full_graph", None)
        scores = meta.get("scores")
        if scores is None and all(f"{f.name}_score" in info for f in fields(Scores)):
            scores = {f"{f.name}_score": info.pop(f"{f.name}_score") for f in fields(Scores)}
        return cls(**arrays, n_layers=meta["n_layers"], bos=meta["bos"], prompt=meta["prompt"],
                   token_strings=meta["token_strings"], logit_strings=meta["logit_strings"],
                   config=meta["config"], info=info, n_active_total=meta["n_active_total"],
                   full_graph=from_dict(FullGraph, full) if full else None,
                   scores=Scores.from_dict(scores) if scores else None,
                   left_out=LeftOutFeatures(**left) if left else None)


# Edges stored in float16 are scaled by their row's largest |edge|: each is then within 2^-11
# (float16's precision) of itself, or within 2^-25 of its row's largest |edge| when it is below
# 2^-14 of it (float16's subnormals). `exact` keeps the adjacency's own dtype.
EDGE_RTOL = 2.0**-11
EDGE_ATOL_OF_ROW_MAX = 2.0**-25


def count_edges(a: np.ndarray, lines: int = 256) -> int:
    """Nonzero entries of `a` (an adjacency or an edge mask), `lines` rows at a time: numpy's
    count_nonzero of a float array is several times slower than counting a comparison's
    booleans (0.20 against 0.035 s on the demo's 9,602-node adjacency)."""
    if a.dtype == bool or a.ndim != 2:
        return int(np.count_nonzero(a))
    return sum(int(np.count_nonzero(a[i:i + lines] != 0)) for i in range(0, len(a), lines))


def _pack(adjacency: np.ndarray, exact: bool) -> dict[str, np.ndarray]:
    """The nonzero edges, row by row (CSR: `edge_indptr`, `edge_source`, `edge_value`), the
    values float16 over `edge_row_scale` unless `exact`."""
    n = adjacency.shape[0]
    tgt, src = np.nonzero(adjacency)
    vals = adjacency[tgt, src]
    out = {"edge_indptr": np.searchsorted(tgt, np.arange(n + 1)).astype(np.int64),
           "edge_source": src.astype(np.uint16 if n <= 2**16 else np.uint32)}
    if exact:
        out["edge_value"] = vals
    else:
        scale = np.abs(adjacency).max(axis=1).astype(np.float32) if n else np.zeros(0, np.float32)
        out["edge_row_scale"] = scale
        out["edge_value"] = (vals / scale[tgt]).astype(np.float16)
    return out


def _check_nodes(arrays: dict, token_strings, logit_strings) -> None:
    """The per-node arrays of each kind have one length (a hostile or damaged file is refused
    here, before anything is sized from them)."""
    for names in (("feature_layer", "feature_pos", "feature_index", "activation"),
                  ("error_layer", "error_pos"), ("logit_tokens", "logit_probs"), ("tokens",)):
        sizes = {name: len(arrays[name]) for name in names}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"node arrays of different lengths: {sizes}")
    if len(token_strings) != len(arrays["tokens"]) or \
            len(logit_strings) != len(arrays["logit_tokens"]):
        raise ValueError("token_strings / logit_strings do not match the tokens / logits")


def _unpack(z, n: int) -> np.ndarray:
    indptr, src, vals = z["edge_indptr"], z["edge_source"], z["edge_value"]
    if (indptr.shape != (n + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0)
            or indptr[-1] != len(src) or len(src) != len(vals) or (len(src) and src.max() >= n)):
        raise ValueError("its edge arrays do not fit its nodes")
    tgt = np.repeat(np.arange(n), np.diff(indptr))
    dtype = np.float32 if vals.dtype == np.float16 else vals.dtype
    a = zeros((n, n), dtype)
    v = vals.astype(dtype)
    if "edge_row_scale" in z.files:
        v *= z["edge_row_scale"][tgt]
    a[tgt, src.astype(np.int64)] = v
    return a


_ARRAYS = ("tokens", "feature_layer", "feature_pos", "feature_index", "activation", "error_layer",
           "error_pos", "logit_tokens", "logit_probs", "adjacency")
_FULL = ("influence", "input_abs", "input_error_abs")  # streamed graphs only
_OPTIONAL = _FULL + ("target_weights",)  # arrays saved when set


def feature_name(layer: int | np.integer, feature: int | np.integer,
                 pos: int | np.integer) -> str:
    """A feature node's one name, `LAYER:FEATURE@POS` (e.g. `29:126@5`; positions count the BOS
    as 0): what the page shows and searches, and what `cltrace steer` reads
    (`attribution.interventions.parse_edit`), so a name read off a graph pastes into an
    intervention unchanged."""
    return f"{int(layer)}:{int(feature)}@{int(pos)}"


def node_levels(feature_layer: np.ndarray, error_layer: np.ndarray, n_tokens: int,
                n_logits: int, n_layers: int) -> np.ndarray:
    """[node] a level per node, in graph order, such that every edge goes from a lower level to a
    higher one: a feature or error node its layer (a feature reads the residual stream before its
    layer's MLP, where only lower layers have written), a token -1, a target n_layers. Edges
    within a layer would break this; `attribution.influence.influence` checks it as it goes."""
    return np.concatenate([np.asarray(feature_layer, np.int64), np.asarray(error_layer, np.int64),
                           np.full(n_tokens, -1), np.full(n_logits, n_layers)])


def error_nodes(n_layers: int, n_pos: int, bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """(layer, pos) of the error nodes in graph order: layer-major, the BOS position left out."""
    first = 1 if bos else 0
    layer, pos = np.meshgrid(np.arange(n_layers), np.arange(first, n_pos), indexing="ij")
    return layer.ravel().astype(np.int32), pos.ravel().astype(np.int32)


__all__ = [
    "EDGE_ATOL_OF_ROW_MAX",
    "EDGE_RTOL",
    "GRAPH_SCHEMA_VERSION",
    "KINDS",
    "FullGraph",
    "Graph",
    "LeftOutFeatures",
    "NodeRanges",
    "Scores",
    "error_nodes",
    "feature_name",
    "node_levels",
]
