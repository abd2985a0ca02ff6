"""Graph JSON in the circuit-tracer / Neuronpedia schema (the pruned graph, ready for its viewer).

Schema, as read from circuit-tracer (`frontend/graph_models.py`, `utils/create_graph_files.py`):
`{"metadata": {slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold,
schema_version}, "qParams": {pinnedIds, supernodes, linkType, clickedId, sg_pos}, "nodes": [...],
"links": [{source, target, weight}]}`; a node has node_id, feature, layer (a string), ctx_idx,
feature_type, token_prob, is_target_logit, run_idx, reverse_ctx_idx, jsNodeId, clerp, influence,
activation. Node ids cannot collide between kinds: features `{layer}_{feature}_{pos}` (feature
>= 0), errors `{layer}_-1_{pos}`, embeddings `E_{token id}_{pos}`, logits `{n_layers+1}_{token
id}_{pos}` (layer n_layers + 1 is no feature layer). `feature` is the Cantor pairing of (layer,
feature index) for features, as circuit-tracer does, so that it is unique across layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from attribution.graph import Graph
from attribution.prune import PruneResult, prune


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id, feature, layer, pos, kind, js, influence=None, activation=None, **extra):
    out = {"node_id": node_id, "feature": int(feature), "layer": str(layer), "ctx_idx": int(pos),
           "feature_type": kind, "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
           "reverse_ctx_idx": 0, "jsNodeId": js, "clerp": "",
           "influence": None if influence is None else float(influence),
           "activation": None if activation is None else float(activation)}
    out.update(extra)
    return out


def node_ids(graph: Graph) -> list[str]:
    """The Neuronpedia node id of every node, in graph order."""
    L = graph.n_layers
    ids = [f"{a}_{f}_{p}" for a, f, p in zip(graph.feature_layer, graph.feature_index,
                                             graph.feature_pos)]
    ids += [f"{a}_-1_{p}" for a, p in zip(graph.error_layer, graph.error_pos)]
    ids += [f"E_{t}_{p}" for p, t in enumerate(graph.tokens)]
    ids += [f"{L + 1}_{t}_{graph.n_pos - 1}" for t in graph.logit_tokens]
    return ids


def to_neuronpedia(graph: Graph, pruned: PruneResult | None = None, slug: str = "graph",
                   scan: str = "cltrace", node_threshold: float = 0.8,
                   edge_threshold: float = 0.98) -> dict:
    """The pruned graph as a Neuronpedia / circuit-tracer graph JSON dict."""
    if pruned is None:
        pruned = prune(graph, node_threshold, edge_threshold)
    r, L = graph.ranges, graph.n_layers
    ids = node_ids(graph)
    infl = pruned.cumulative_scores
    nodes = []
    for n in np.nonzero(pruned.node_mask)[0]:
        kind = r.kind_of(int(n))
        i = int(n) - getattr(r, kind).start
        if kind == "feature":
            a, f, p = (int(graph.feature_layer[i]), int(graph.feature_index[i]),
                       int(graph.feature_pos[i]))
            nodes.append(_node(ids[n], _cantor(a, f), a, p, "cross layer transcoder",
                               f"{a}_{f}-0", infl[n], graph.activation[i]))
        elif kind == "error":
            a, p = int(graph.error_layer[i]), int(graph.error_pos[i])
            nodes.append(_node(ids[n], -1, a, p, "mlp reconstruction error", f"{a}_-1-{p}",
                               infl[n]))
        elif kind == "token":
            t = int(graph.tokens[i])
            nodes.append(_node(ids[n], i, "E", i, "embedding", f"E_{t}-{i}", infl[n]))
        else:
            t, prob = int(graph.logit_tokens[i]), float(graph.logit_probs[i])
            last = graph.n_pos - 1
            nodes.append(_node(ids[n], t, L + 1, last, "logit", f"L_{t}-{last}",
                               token_prob=prob, is_target_logit=i == 0,
                               clerp=f'Output "{graph.logit_strings[i]}" (p={prob:.3f})'))
    tgt, src = np.nonzero(pruned.edge_mask)
    links = [{"source": ids[s], "target": ids[t], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(tgt, src)]
    used = {lk["source"] for lk in links} | {lk["target"] for lk in links}
    nodes = [nd for nd in nodes if nd["node_id"] in used
             or nd["feature_type"] in ("embedding", "logit")]
    meta = {"slug": slug, "scan": scan, "transcoder_list": [],
            "prompt_tokens": list(graph.token_strings), "prompt": graph.prompt,
            "node_threshold": node_threshold, "schema_version": 1, "bos": bool(graph.bos),
            "info": {k: v for k, v in graph.info.items() if not isinstance(v, dict)}}
    return {"metadata": meta,
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                        "sg_pos": ""},
            "nodes": nodes, "links": links}


def write_neuronpedia(graph: Graph, path: str | Path, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_neuronpedia(graph, **kw)))
    return path


__all__ = ["node_ids", "to_neuronpedia", "write_neuronpedia"]
