"""The graph JSON schema of circuit-tracer / Neuronpedia, written once: node ids, node records,
metadata and qParams, and the whole (pruned) graph's JSON. `viewer.neuronpedia` (pinned subgraphs,
reading JSON back) and the page (which embeds the records of its nodes) use these functions.

Schema, as read from circuit-tracer (`frontend/graph_models.py`, `utils/create_graph_files.py`):
`{"metadata": {slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold,
schema_version}, "qParams": {pinnedIds, supernodes, linkType, clickedId, sg_pos}, "nodes": [...],
"links": [{source, target, weight}]}`; a node has node_id, feature, layer (a string), ctx_idx,
feature_type, token_prob, is_target_logit, run_idx, reverse_ctx_idx, jsNodeId, clerp, influence,
activation. Node ids cannot collide between kinds: features `{layer}_{feature}_{pos}` (feature
>= 0), errors `{layer}_-1_{pos}`, embeddings `E_{token id}_{pos}`, logits `{n_layers+1}_{token
id}_{pos}` (layer n_layers + 1 is no feature layer). User-chosen targets (`attribution.trace.Targets`) are logit nodes all marked
`is_target_logit`, their clerp `Target NAME`; a logit difference carries its first token's id, a
direction -1. `feature` is the Cantor pairing of (layer,
feature index) for features, as circuit-tracer does, so that it is unique across layers.
A neuron graph (`attribution.neurons`) keeps the schema's feature types; its error nodes' clerp
names them ("other neurons L3 @5", `Graph.label`) and its metadata's info says `neurons`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attribution.graph import Graph
from attribution.prune import PruneResult, prune
from clt.io import atomic_write

NEURONPEDIA_SCHEMA_VERSION = 1
NODE_FIELDS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
               "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence",
               "activation")
QPARAMS_FIELDS = ("pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos")
FEATURE_TYPE = {"feature": "cross layer transcoder", "error": "mlp reconstruction error",
                "token": "embedding", "logit": "logit"}


def cantor(x: int, y: int) -> int:
    """Cantor pairing: a feature's `feature` number, unique across layers."""
    return (x + y) * (x + y + 1) // 2 + y


def node_record(graph: Graph, node: int, cumulative: np.ndarray | None = None,
                label: str = "") -> dict:
    """The Neuronpedia record of one graph node (fields `NODE_FIELDS`); `cumulative`: every
    node's cumulative influence share (`influence`; none for logits), `label` a feature's
    `clerp`. The whole-graph export, pinned subgraphs and the page's export all write this."""
    r = graph.ranges
    kind = r.kind_of(node)
    i = node - getattr(r, kind).start
    infl = None if cumulative is None else float(cumulative[node])
    rec = {"node_id": "", "feature": 0,
           "layer": "", "ctx_idx": 0, "feature_type": FEATURE_TYPE[kind], "token_prob": 0.0,
           "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "",
           "clerp": "", "influence": infl, "activation": None}
    if kind == "feature":
        a, f, p = (int(graph.feature_layer[i]), int(graph.feature_index[i]),
                   int(graph.feature_pos[i]))
        rec.update(node_id=f"{a}_{f}_{p}", feature=cantor(a, f), layer=str(a), ctx_idx=p,
                   jsNodeId=f"{a}_{f}-0", activation=float(graph.activation[i]), clerp=label)
    elif kind == "error":
        a, p = int(graph.error_layer[i]), int(graph.error_pos[i])
        # A neuron graph's error nodes are the units not kept: named so (feature_type stays
        # the schema's, which readers of the JSON sort nodes by).
        rec.update(node_id=f"{a}_-1_{p}", feature=-1, layer=str(a), ctx_idx=p,
                   jsNodeId=f"{a}_-1-{p}", clerp=graph.label(node) if graph.neurons else "")
    elif kind == "token":
        t = int(graph.tokens[i])
        rec.update(node_id=f"E_{t}_{i}", feature=i, layer="E", ctx_idx=i, jsNodeId=f"E_{t}-{i}")
    else:
        t, prob, last = _target_id(graph, i), float(graph.logit_probs[i]), graph.n_pos - 1
        # User-chosen targets are all marked as targets; of the most probable tokens, the top
        # one (as circuit-tracer does).
        clerp = (f"Target {graph.logit_strings[i]}" if graph.custom_targets
                 else f'Output "{graph.logit_strings[i]}" (p={prob:.3f})')
        rec.update(node_id=f"{graph.n_layers + 1}_{t}_{last}", feature=t,
                   layer=str(graph.n_layers + 1), ctx_idx=last, jsNodeId=f"L_{t}-{last}",
                   token_prob=prob, is_target_logit=graph.custom_targets or i == 0,
                   influence=None, clerp=clerp)
    return rec


def metadata(graph: Graph, node_threshold: float = 0.8, slug: str = "graph",
             scan: str = "cltrace") -> dict:
    """The `metadata` block of every graph JSON we write (the graph's info and scores
    included; `transcoder_list` names its transcoder as the graph records it, so that feature
    cards are found from the JSON too)."""
    tc = graph.config.get("transcoder") or ""
    return {"slug": slug, "scan": scan, "transcoder_list": [tc] if tc else [],
            "prompt_tokens": list(graph.token_strings), "prompt": graph.prompt,
            "node_threshold": node_threshold, "schema_version": NEURONPEDIA_SCHEMA_VERSION,
            "bos": bool(graph.bos), "info": graph.summary()}


def qparams(pinned=(), supernodes=(), clicked_id: str = "") -> dict:
    """The `qParams` block: pinned node ids, supernodes as [name, id, ...] lists."""
    return {"pinnedIds": list(pinned), "supernodes": [list(g) for g in supernodes],
            "linkType": "both", "clickedId": clicked_id, "sg_pos": ""}


def node_ids(graph: Graph) -> list[str]:
    """The Neuronpedia node id of every node, in graph order."""
    L = graph.n_layers
    ids = [f"{a}_{f}_{p}" for a, f, p in zip(graph.feature_layer, graph.feature_index,
                                             graph.feature_pos)]
    ids += [f"{a}_-1_{p}" for a, p in zip(graph.error_layer, graph.error_pos)]
    ids += [f"E_{t}_{p}" for p, t in enumerate(graph.tokens)]
    ids += [f"{L + 1}_{_target_id(graph, i)}_{graph.n_pos - 1}"
            for i in range(len(graph.logit_tokens))]
    return ids


def _target_id(graph: Graph, i: int) -> int:
    """The token id in a target's node id; a direction (no token) gets -1 - i, unique."""
    t = int(graph.logit_tokens[i])
    return t if t >= 0 else -1 - i


def to_neuronpedia(graph: Graph, pruned: PruneResult | None = None, slug: str = "graph",
                   scan: str = "cltrace", node_threshold: float = 0.8,
                   edge_threshold: float = 0.98, labels=None) -> dict:
    """The pruned graph as a Neuronpedia / circuit-tracer graph JSON dict; `labels(layer,
    feature) -> str` gives each feature's clerp (e.g. `viewer.features.FeatureCards.clerp`)."""
    head, ids, tgt, src, weights = _parts(graph, pruned, slug, scan, node_threshold,
                                          edge_threshold, labels)
    links = [{"source": ids[s], "target": ids[t], "weight": w}
             for t, s, w in zip(tgt.tolist(), src.tolist(), weights)]
    return {**head, "links": links}


def _parts(graph: Graph, pruned: PruneResult | None, slug: str, scan: str,
           node_threshold: float, edge_threshold: float, labels):
    """`to_neuronpedia`'s JSON less its links, and the links as arrays: (head {metadata,
    qParams, nodes}, every node's id, the kept edges' targets and sources, their weights)."""
    if pruned is None:
        pruned = prune(graph, node_threshold, edge_threshold)
    ids = node_ids(graph)
    r = graph.ranges

    def clerp(n: int) -> str:
        if labels is None or not r.feature.start <= n < r.feature.stop:
            return ""
        return labels(int(graph.feature_layer[n]), int(graph.feature_index[n]))

    tgt, src = pruned.edges()
    # Weights to 6 significant digits (float32 edges hold ~7): a third of the file's size.
    weights = [float(f"{w:.6g}") for w in graph.adjacency[tgt, src].astype(np.float64).tolist()]
    # (at once: per-entry numpy reads and casts took most of the time)
    # The kept nodes with an edge kept, and every embedding and logit node.
    used = np.zeros(graph.n_nodes, bool)
    used[tgt], used[src], used[r.token.start:] = True, True, True
    nodes = [node_record(graph, int(n), pruned.cumulative_scores, clerp(int(n)))
             for n in np.nonzero(pruned.node_mask & used)[0]]
    head = {"metadata": metadata(graph, node_threshold, slug, scan), "qParams": qparams(),
            "nodes": nodes}
    return head, ids, tgt, src, weights


def write_neuronpedia(graph: Graph, path: str | Path, pruned: PruneResult | None = None,
                      slug: str = "graph", scan: str = "cltrace", node_threshold: float = 0.8,
                      edge_threshold: float = 0.98, labels=None) -> Path:
    """Write `to_neuronpedia`'s JSON (compact) to `path`. Its links are written as text, the
    same bytes as `json.dumps` of their dicts in half the time (0.95 -> 0.54 s for the demo's
    550k links): a graph JSON is mostly links."""
    head, ids, tgt, src, weights = _parts(graph, pruned, slug, scan, node_threshold,
                                          edge_threshold, labels)
    quoted = [json.dumps(i) for i in ids]
    if all(np.isfinite(weights)):  # repr is json's float text, but for nan and infinities
        links = ",".join([f'{{"source":{quoted[s]},"target":{quoted[t]},"weight":{w!r}}}'
                          for t, s, w in zip(tgt.tolist(), src.tolist(), weights)])
    else:
        links = ",".join([json.dumps({"source": ids[s], "target": ids[t], "weight": w},
                                     separators=(",", ":"))
                          for t, s, w in zip(tgt.tolist(), src.tolist(), weights)])
    text = json.dumps(head, separators=(",", ":"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text[:-1] + ',"links":[' + links + "]}")
    return path


__all__ = ["FEATURE_TYPE", "NEURONPEDIA_SCHEMA_VERSION", "NODE_FIELDS", "QPARAMS_FIELDS", "cantor",
           "metadata", "node_ids", "node_record", "qparams", "to_neuronpedia",
           "write_neuronpedia"]
