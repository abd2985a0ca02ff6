"""The summary of a batch of traced prompts (`cltrace trace --prompts FILE`): one row per prompt
(its targets, sizes, scores and most influential features) as JSON, and a Markdown table."""

from __future__ import annotations

import numpy as np

from attribution.graph import feature_name

TOP_FEATURES = 5


def top_features(graph, pruned, cards=None, k: int = TOP_FEATURES) -> list[dict]:
    """The graph's k features of largest influence on its targets: name (`L:F@P`), token,
    share of all nodes' influence, activation, and the card's label when there are cards."""
    r = graph.ranges
    infl = np.asarray(pruned.influence, np.float64)
    total = graph.influence_total() or float(infl.sum())
    feat = infl[r.feature]
    out = []
    for i in np.argsort(-feat, kind="stable")[:k]:
        if feat[i] <= 0:
            break
        layer, index, pos = (int(graph.feature_layer[i]), int(graph.feature_index[i]),
                             int(graph.feature_pos[i]))
        row = {"name": feature_name(layer, index, pos), "token": graph.token_strings[pos],
               "influence_share": round(float(feat[i]) / total, 5) if total > 0 else 0.0,
               "activation": round(float(graph.activation[i]), 5)}
        if cards is not None:
            row["label"] = cards.card(layer, index)["label"]
        out.append(row)
    return out


def summary_row(item, graph, pruned, cards, seconds: float) -> dict:
    """One prompt's row of summary.json."""
    s, r = graph.scores, graph.ranges
    targets = graph.info.get("targets") or [
        {"name": n, "kind": "token", "prob": float(p)}
        for n, p in zip(graph.logit_strings, graph.logit_probs)]
    targets = [{**t, "prob": float(t.get("prob", 0.0))} for t in targets]
    full = graph.full_graph
    return {
        "index": item.index, "name": item.name, "line": item.line, "prompt": graph.prompt,
        "folder": item.folder, "tokens": int(graph.n_pos), "targets": targets,
        "features": int(full.features if graph.streamed else r.feature.stop),
        "nodes": int(full.nodes if graph.streamed else graph.n_nodes),
        "pruned_nodes": int(pruned.node_mask.sum()), "pruned_edges": pruned.n_edges,
        "replacement": round(float(s.replacement), 5),
        "completeness": round(float(s.completeness), 5),
        "pruned_replacement": round(float(s.pruned_replacement), 5),
        "pruned_completeness": round(float(s.pruned_completeness), 5),
        "top_features": top_features(graph, pruned, cards), "seconds": round(seconds, 3)}


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "⏎")


def summary_markdown(summary: dict) -> str:
    """summary.json as a Markdown table, a row per prompt."""
    lines = [f"# {len(summary['prompts'])} prompts traced",
             "",
             (f"model `{summary['model']}`, transcoder `{summary['transcoder']}`, "
              f"{summary['processes']} process(es)"),
             "",
             ("| # | prompt | top target (p) | features | pruned nodes | replacement | "
              "completeness | most influential features |"),
             "|---|---|---|---|---|---|---|---|"]
    for row in summary["prompts"]:
        t = row["targets"][0]
        feats = ", ".join(f"{f['name']} {f['token']!r}" + (f" ({f['label']})" if f.get("label")
                                                           else "")
                          for f in row["top_features"][:3])
        lines.append(f"| {row['index']} | [{_cell(row['name'])}]({row['folder']}/graph.html) | "
                     f"{_cell(repr(t['name']))} ({t['prob']:.3f}) | {row['features']} | "
                     f"{row['pruned_nodes']} | {row['replacement']:.3f} | "
                     f"{row['completeness']:.3f} | {_cell(feats)} |")
    return "\n".join(lines) + "\n"


__all__ = ["summary_markdown", "summary_row", "top_features"]
