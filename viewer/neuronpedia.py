"""Viewer-side Neuronpedia / circuit-tracer JSON: pinned subgraphs with supernodes, and reading a
graph JSON back into our `Graph`.

The schema (circuit-tracer's `frontend/graph_models.py`) is written once, in `attribution.export`
(node records, metadata, qParams); this module uses it, and adds what a viewer session
produces: the nodes a researcher pinned, grouped into named supernodes, as a graph JSON whose
`qParams` (`pinnedIds`, `supernodes` as `[name, id, id, ...]` lists, `clickedId`, `linkType`,
`sg_pos`) a Neuronpedia graph page accepts. The page's own export (viewer.js `exportSubgraph`) writes the same
records from what the page embeds; the browser test checks that the two agree.

`from_neuronpedia` reads such a JSON (ours or circuit-tracer's) back into a `Graph` holding the
nodes and links it lists: features, errors, embeddings and logits, with the links as the adjacency.
What the JSON does not carry (pruned nodes and edges, error nodes left out) is absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from attribution.export import (  # the schema's one home; re-exported here
    FEATURE_TYPE,
    NEURONPEDIA_SCHEMA_VERSION,
    NODE_FIELDS,
    QPARAMS_FIELDS,
    metadata,
    node_ids,
    node_record,
    qparams,
)
from attribution.graph import Graph
from clt.configs import ConfigError

MAX_JSON_BYTES = 2**31  # parsing JSON takes several times its size in memory
_LOGIT_CLERP = re.compile(r'^Output "(.*)" \(p=[^)]*\)$', re.DOTALL)


def pinned_subgraph(graph: Graph, pinned: list[str], supernodes: list[list[str]] = (),
                    clicked_id: str = "", cumulative: np.ndarray | None = None,
                    labels: dict[tuple[int, int], str] | None = None,
                    node_threshold: float = 0.8, slug: str = "graph") -> dict:
    """A Neuronpedia graph JSON of the pinned nodes (ids as in `node_ids`), every nonzero edge
    among them, and `qParams` naming the pins and supernodes ([name, id, ...] lists)."""
    index = {nid: n for n, nid in enumerate(node_ids(graph))}
    missing = [p for p in pinned if p not in index]
    if missing:
        raise ConfigError(f"pinned node id(s) {missing[:3]} are not in the graph")
    for group in supernodes:
        if len(group) < 2 or any(m not in pinned for m in group[1:]):
            raise ConfigError(f"supernode {group[:1]} must be [name, pinned id, ...]")
    labels = labels or {}
    r = graph.ranges
    nodes = []
    for nid in pinned:
        n = index[nid]
        lab = ""
        if r.kind_of(n) == "feature":
            i = n - r.feature.start
            lab = labels.get((int(graph.feature_layer[i]), int(graph.feature_index[i])), "")
        nodes.append(node_record(graph, n, cumulative, lab))
    sel = np.array([index[p] for p in pinned], np.int64)
    sub = graph.adjacency[np.ix_(sel, sel)]
    links = [{"source": pinned[s], "target": pinned[t], "weight": float(sub[t, s])}
             for t, s in zip(*np.nonzero(sub))]
    return {"metadata": metadata(graph, node_threshold, slug),
            "qParams": qparams(pinned, supernodes, clicked_id), "nodes": nodes, "links": links}


# --- reading a graph JSON ------------------------------------------------------------------------
def read_json(source: str | Path | dict) -> dict:
    """A graph JSON from a dict, a path or JSON text; one-line errors for unreadable input."""
    if isinstance(source, dict):
        return source
    text, where = source, "graph JSON"
    if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip()
                                    .startswith("{")):
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"no graph JSON at {path}")
        if path.is_dir():
            raise ConfigError(f"{path} is a directory, not a graph JSON")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ConfigError(f"{path} is {path.stat().st_size / 2**30:.1f} GiB, larger than a "
                              f"graph JSON this reader parses ({MAX_JSON_BYTES / 2**30:.0f} GiB)")
        text, where = path.read_text(encoding="utf-8", errors="replace"), str(path)
    try:
        data = json.loads(text)
    except RecursionError:
        raise ConfigError(f"{where} is nested too deeply to be a graph JSON") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON (truncated? {e.msg} at character "
                          f"{e.pos})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is not a graph JSON object")
    return data


def _check(data: dict) -> None:
    for key, kind in (("metadata", dict), ("nodes", list), ("links", list)):
        if key not in data:
            raise ConfigError(f"not a Neuronpedia graph JSON: no '{key}'")
        if not isinstance(data[key], kind):
            raise ConfigError(f"graph JSON '{key}' must be a {'list' if kind is list else 'object'}"
                              f", got {type(data[key]).__name__}")
    if not all(isinstance(n, dict) for n in data["nodes"]) or \
            not all(isinstance(lk, dict) for lk in data["links"]):
        raise ConfigError("graph JSON nodes and links must be objects")
    version = data["metadata"].get("schema_version", NEURONPEDIA_SCHEMA_VERSION)
    if version != NEURONPEDIA_SCHEMA_VERSION:
        raise ConfigError(f"graph JSON schema_version {version!r} is not supported (this "
                          f"version reads {NEURONPEDIA_SCHEMA_VERSION})")
    for n, node in enumerate(data["nodes"]):
        for key in ("node_id", "layer", "ctx_idx", "feature_type"):
            if key not in node:
                raise ConfigError(f"graph JSON node {n} lacks field '{key}'")


def _int_part(node_id: str, k: int) -> int:
    try:
        return int(node_id.split("_")[k])
    except (IndexError, ValueError):
        raise ConfigError(f"graph JSON node id '{node_id}' is malformed") from None


MAX_JSON_NODES = 16384  # a dense adjacency of 16,384 nodes is 1 GiB in float32


def from_neuronpedia(source: str | Path | dict, max_nodes: int = MAX_JSON_NODES) -> Graph:
    """A `Graph` of the nodes and links of a Neuronpedia / circuit-tracer graph JSON. The graph
    holds a dense adjacency, so a JSON of more than `max_nodes` nodes is refused before any
    allocation; a JSON of any other shape than the schema's is one line, never a traceback."""
    data = read_json(source)
    _check(data)
    n = len(data["nodes"])
    if n > max_nodes:
        raise ConfigError(f"graph JSON has {n:,} nodes, more than the {max_nodes:,} a page is "
                          f"built from (its dense adjacency would take {n * n * 4 / 2**30:.1f} "
                          "GiB); raise --max-json-nodes to read it anyway")
    try:
        return _from_checked(data)
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ConfigError(f"graph JSON does not follow the schema ({type(e).__name__}: "
                          f"{str(e)[:100]})") from None


def _from_checked(data: dict) -> Graph:
    meta = data["metadata"]
    by_kind: dict[str, list[dict]] = {"feature": [], "error": [], "token": [], "logit": []}
    for node in data["nodes"]:
        t = node["feature_type"]
        kind = ("feature" if "transcoder" in t else "error" if "error" in t else
                "token" if t == "embedding" else "logit" if t == "logit" else None)
        if kind is None:
            raise ConfigError(f"graph JSON node '{node['node_id']}' has unknown feature_type "
                              f"{t!r}")
        by_kind[kind].append(node)
    prompt_tokens = list(meta.get("prompt_tokens", []))
    n_pos = max([len(prompt_tokens)] + [int(n["ctx_idx"]) + 1 for ns in by_kind.values()
                                         for n in ns])
    tokens = np.full(n_pos, -1, np.int32)
    for n in by_kind["token"]:
        tokens[int(n["ctx_idx"])] = _int_part(n["node_id"], 1)
    logits = by_kind["logit"]
    if logits:
        n_layers = int(logits[0]["layer"]) - 1
    else:
        n_layers = 1 + max([int(n["layer"]) for n in by_kind["feature"] + by_kind["error"]],
                           default=-1)
    strings = []
    for n in logits:
        clerp = n.get("clerp", "")
        m = _LOGIT_CLERP.match(clerp)
        strings.append(m.group(1) if m else clerp[len("Target "):]
                       if clerp.startswith("Target ") else str(_int_part(n["node_id"], 1)))
    feats, errs = by_kind["feature"], by_kind["error"]
    sources = feats + errs
    bos = meta.get("bos", bool(prompt_tokens) and all(int(n["ctx_idx"]) > 0 for n in sources))
    graph = Graph(
        tokens=tokens, token_strings=prompt_tokens + [""] * (n_pos - len(prompt_tokens)),
        feature_layer=np.array([int(n["layer"]) for n in feats], np.int32),
        feature_pos=np.array([int(n["ctx_idx"]) for n in feats], np.int32),
        feature_index=np.array([_int_part(n["node_id"], 1) for n in feats], np.int32),
        activation=np.array([n.get("activation") or 0.0 for n in feats], np.float32),
        error_layer=np.array([int(n["layer"]) for n in errs], np.int32),
        error_pos=np.array([int(n["ctx_idx"]) for n in errs], np.int32),
        logit_tokens=np.array([_int_part(n["node_id"], 1) for n in logits], np.int32),
        logit_strings=strings,
        logit_probs=np.array([n.get("token_prob", 0.0) for n in logits], np.float32),
        adjacency=np.zeros((len(sources) + n_pos + len(logits),) * 2, np.float32),
        n_layers=n_layers, bos=bool(bos), prompt=meta.get("prompt", ""),
        config={"node_threshold": float(meta.get("node_threshold") or 0.8),
                "transcoder": (meta.get("transcoder_list") or [""])[0]},
        target_weights=(np.full(len(logits), 1.0 / len(logits), np.float32)
                        if logits and all(n.get("clerp", "").startswith("Target ")
                                          for n in logits) else None),
        info={**meta.get("info", {}), "source": "neuronpedia json", "slug": meta.get("slug")})
    index = {nid: i for i, nid in enumerate(node_ids(graph))}
    for link in data["links"]:
        try:
            graph.adjacency[index[link["target"]], index[link["source"]]] = link["weight"]
        except KeyError as e:
            raise ConfigError(f"graph JSON link {link!r:.80} names unknown node {e}") from None
    return graph


__all__ = ["FEATURE_TYPE", "MAX_JSON_NODES", "NODE_FIELDS", "QPARAMS_FIELDS", "from_neuronpedia", "metadata",
           "node_record", "pinned_subgraph", "read_json"]
