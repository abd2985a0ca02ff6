"""Slim graph files: what `Graph.save` stores by default.

A full graph's dense adjacency grows with the square of its active features (142 MB for the
6-token demo, ~1 GB for an 11-token prompt), while what a reader looks at is the pruned graph. A
slim graph is a partial graph, like a streamed one (`attribution.graph`), holding

* the features of the graph pruned at its trace's node and edge thresholds, every error, token
  and target node, and the pruned graph's edges only (stored sparse by `Graph.save`);
* for every stored node, its influence on the targets, its |A| row sum and its error share in the
  full graph, so that the page's node ranking and edge scores are the full graph's;
* the features not stored, with their activation and full-graph influence
  (`Graph.left_out`), and the full graph's counts and scores (`Graph.full_graph`), marked with
  the thresholds it was pruned at.

`attribution.prune.prune` on a slim graph at those thresholds gives back what was stored; at
looser ones it warns that the file cannot hold more (`--save-full` keeps everything).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from attribution.graph import FullGraph, Graph, LeftOutFeatures
from attribution.influence import RowSums
from attribution.prune import PruneResult, graph_scores, prune


def thresholds(graph: Graph) -> tuple[float, float]:
    """The node and edge thresholds of the graph's trace (the defaults when it has none)."""
    return (float(graph.config.get("node_threshold", 0.8)),
            float(graph.config.get("edge_threshold", 0.98)))


def slim(graph: Graph, pruned: PruneResult | None = None) -> Graph:
    """The graph as a slim file stores it (module docstring); a slim graph is returned as is."""
    if graph.full_graph is not None and graph.full_graph.slim:
        return graph
    nt, et = thresholds(graph)
    if pruned is None:  # the tracer's own pruning, made at these thresholds, if it is there
        pruned = graph.pruned if graph.pruned is not None else prune(graph, nt, et)
    r = graph.ranges
    infl = pruned.influence
    feats = np.nonzero(pruned.node_mask[r.feature])[0]
    keep = np.concatenate([feats, np.arange(r.error.start, graph.n_nodes)])
    adjacency = graph.adjacency[np.ix_(keep, keep)] * pruned.edges_among(keep)
    if graph.streamed:
        sums, err_sums = graph.input_abs[keep], graph.input_error_abs[keep]
    else:  # those pruning took with the influence, the others summed here
        known = RowSums.reuse(pruned.sums, graph.n_nodes, r.error)
        sums, err_sums = known.at(graph.adjacency, keep)

    dropped = np.setdiff1d(np.arange(r.feature.stop), feats)
    left = LeftOutFeatures(graph.feature_layer[dropped], graph.feature_pos[dropped],
                           graph.feature_index[dropped], graph.activation[dropped],
                           infl[dropped].astype(np.float32))
    if graph.left_out is not None:  # a streamed graph's own left-out features
        left = LeftOutFeatures(*(np.concatenate([getattr(left, f.name),
                                                 getattr(graph.left_out, f.name)])
                                 for f in dataclasses.fields(LeftOutFeatures)))
    old = graph.full_graph
    if old is None:
        scores = graph.scores
        replacement, completeness = ((scores.replacement, scores.completeness) if scores
                                     else graph_scores(graph))
        old = FullGraph(features=r.feature.stop, nodes=graph.n_nodes, edges=graph.n_edges,
                        features_left_out=0, influence_left_out=0.0,
                        replacement_score=replacement, completeness_score=completeness)
    full = dataclasses.replace(
        old, features_left_out=old.features_left_out + len(dropped),
        influence_left_out=old.influence_left_out + float(infl[dropped].sum()),
        pruned_node_threshold=nt, pruned_edge_threshold=et)
    return dataclasses.replace(
        graph, feature_layer=graph.feature_layer[feats], feature_pos=graph.feature_pos[feats],
        feature_index=graph.feature_index[feats], activation=graph.activation[feats],
        adjacency=adjacency, influence=infl[keep], input_abs=np.asarray(sums),
        input_error_abs=np.asarray(err_sums), full_graph=full, left_out=left, pruned=None)


__all__ = ["slim", "thresholds"]
