"""Case study (f): neurons vs features — the same prompts traced with the model's own MLP neurons
(`cltrace trace --neurons`) and with the transcoder, side by side (SmolLM2-135M and its bundled
transcoder by default).

"Circuit Tracing" (Ameisen et al., 2025) measures its transcoder features against a baseline of
the model's own neurons. Here both graphs of each prompt are traced with the same node / edge
thresholds (and the same cap on feature nodes, when one is given), and compared on:

* nodes after pruning: the feature and error nodes (a neuron graph's error nodes are its "other
  neurons", the units not kept) that `attribution.prune.prune` keeps at `--node-threshold` /
  `--edge-threshold`;
* N80: the smallest number of feature (or neuron) nodes whose summed influence on the logit
  targets reaches 80% (`--share`) of the total influence of all the graph's feature nodes;
  influence is `attribution.prune.node_influence`, and the count is pruning's own rule
  (`attribution.prune.find_threshold`: the nodes at or above the cut, ties kept); also as a share
  of the graph's feature nodes;
* replacement and completeness scores, unpruned and pruned (`attribution.prune.score`, stored in
  every graph);
* card readability of the `--top` most influential feature nodes: each card's top activating
  examples (`viewer.features`, the neurons' cards from `neuron_cards` over the same text as the
  transcoder's cards) and the token each fires on. *one-token*: at least half of its top examples
  fire on one token (stripped, case-folded); *on prompt token*: the token the node fires on in the
  prompt is among its top examples' tokens; the cards' automatic labels are listed for a reader to
  judge.

Graphs are full by default (`--max-feature-nodes N` caps both: circuit-tracer's greedy choice of
the N most influential features, which changes N80 and the scores).
Neurons per layer and position (`--neuron-top-k`): by default as many as the transcoder graph of
that prompt has active features per layer and position (rounded, at least 1), so both graphs start
from about as many candidate nodes; the rest of each MLP is folded into its "other neurons" node.
Neuron cards are scanned once over the contexts stored in the transcoder's cards file (the text its
cards cite) and kept in the output folder (`neuron_cards.npz`, reused when present).

Usage: python scripts/cases/neurons_vs_features.py [--prompts 5] [--neuron-top-k K] [--docs]
Writes out/cases/neurons_vs_features/report.md, results.json and each graph's page (`--docs`:
copies the report and results to docs/cases/neurons_vs_features.md/.json).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from common import Study, parser  # first: puts the repository on sys.path

from attribution.graph import feature_name
from attribution.prune import find_threshold, node_influence, prune
from viewer.features import FeatureCards, FeaturesConfig, default_path, neuron_cards

ROOT = Path(__file__).resolve().parents[2]
NAME = "neurons_vs_features"


def default_prompts() -> list[str]:
    """The 20 short prompts of `scripts/bench_prompts.py` (one home for them)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_prompts import PROMPTS
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return list(PROMPTS)


# --- the numbers -----------------------------------------------------------------------------------
def n_for_share(graph, share: float = 0.8) -> int:
    """N80 (module docstring): the feature nodes at or above pruning's cut at `share` of the
    total influence of the graph's feature nodes."""
    infl = node_influence(graph)[graph.ranges.feature]
    if infl.size == 0 or infl.sum() <= 0:
        return 0
    return int((infl >= find_threshold(infl, share)).sum())


def graph_numbers(graph, node_threshold: float, edge_threshold: float, share: float) -> dict:
    """Node counts (in the graph, after pruning), N80 and the scores of one graph."""
    r = graph.ranges
    traced_at = (graph.config.get("node_threshold"), graph.config.get("edge_threshold"))
    pruned = graph.pruned if graph.pruned is not None and traced_at == (
        node_threshold, edge_threshold) else prune(graph, node_threshold, edge_threshold)
    kept = pruned.node_mask
    n_feat = r.feature.stop - r.feature.start
    n80 = n_for_share(graph, share)
    s = graph.scores
    return {"feature_nodes": n_feat, "active": int(graph.n_active_total),
            "error_nodes": r.error.stop - r.error.start,
            "pruned_features": int(kept[r.feature].sum()),
            "pruned_errors": int(kept[r.error].sum()),
            "n80": n80, "n80_share": n80 / n_feat if n_feat else 0.0,
            "replacement": s.replacement, "completeness": s.completeness,
            "pruned_replacement": s.pruned_replacement,
            "pruned_completeness": s.pruned_completeness}


def _norm(token: str) -> str:
    """A token as readability compares it: stripped, case-folded; whitespace as its repr."""
    s = token.strip()
    return s.casefold() if s else repr(token)


def _md(text: str) -> str:
    """Text for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "⏎")


def readability(card: dict, vocab: dict[int, str], prompt_token: str) -> dict:
    """How one card reads (module docstring): the tokens its top examples fire on, the share of
    them on its most common one, whether that is at least half, and whether the prompt's token is
    among them."""
    fired = [_norm(vocab.get(toks[at], "?")) for _, toks, _, at in card["top"]]
    top, count = Counter(fired).most_common(1)[0] if fired else ("", 0)
    share = count / len(fired) if fired else 0.0
    return {"label": card["label"], "fired": fired, "top_token": top, "top_share": share,
            "one_token": bool(fired) and share >= 0.5,
            "on_prompt_token": _norm(prompt_token) in fired, "density": card["d"]}


def top_nodes(study: Study, graph, cards: FeatureCards | None, k: int) -> list[dict]:
    """The k most influential feature nodes, each with its card's readability (when cards)."""
    vocab = cards.vocab() if cards is not None else {}
    rows = []
    for _, layer, pos, idx, act, infl in study.key_features(graph, k=k):
        row = {"name": feature_name(layer, idx, pos), "token": graph.token_strings[pos],
               "activation": act, "influence": infl}
        if cards is not None:
            row |= readability(cards.card(layer, idx), vocab, graph.token_strings[pos])
        rows.append(row)
    return rows


def card_summary(rows: list[dict]) -> dict:
    if not rows or "one_token" not in rows[0]:
        return {}
    return {"one_token": float(np.mean([r["one_token"] for r in rows])),
            "on_prompt_token": float(np.mean([r["on_prompt_token"] for r in rows])),
            "top_share": float(np.mean([r["top_share"] for r in rows])),
            "never_active": float(np.mean([not r["fired"] for r in rows]))}


# --- cards -----------------------------------------------------------------------------------------
def transcoder_cards(study: Study) -> FeatureCards | None:
    path = default_path(study.args.transcoder)
    if path is None or not path.exists():
        return None
    cards = FeatureCards.load(path)
    cards.check(study.tc_cfg.n_layers, study.tc_cfg.n_features, "transcoder")
    return cards


def neuron_cards_for(study: Study, tc_cards: FeatureCards | None) -> FeatureCards | None:
    """The neurons' cards over the text the transcoder's cards cite, with their settings; read
    from the output folder when a scan of the same contexts is there."""
    if tc_cards is None:
        return None
    path = Path(study.args.neuron_cards or study.out / "neuron_cards.npz")
    contexts = tc_cards.arrays["contexts"][:study.args.card_contexts or None]
    m = study.model
    if path.exists():
        cards = FeatureCards.load(path)
        if (cards.meta.get("model") == m.cfg.name and cards.n_features == m.cfg.d_mlp
                and cards.meta.get("n_contexts") == len(contexts)):
            print(f"neuron cards: {path} (reused)")
            return cards
    c = tc_cards.meta["config"]
    config = FeaturesConfig(
        transcoder="neurons", model=m.cfg.name, n_contexts=len(contexts),
        context_length=contexts.shape[1], batch_size=c["batch_size"], top_k=c["top_k"],
        n_samples=c["n_samples"], window=c["window"], n_output_tokens=c["n_output_tokens"],
        seed=c["seed"])
    cards = neuron_cards(m, contexts, config, progress=True)
    cards.save(path)
    print(f"neuron cards: {path} ({cards.meta['seconds']:.0f} s)")
    return cards


# --- one prompt ------------------------------------------------------------------------------------
def compare(study: Study, prompt: str, slug: str, cards: dict) -> dict:
    """Both graphs of one prompt: their numbers and top nodes."""
    a = study.args
    kw = {"node_threshold": a.node_threshold, "edge_threshold": a.edge_threshold}
    out = {"prompt": prompt}
    tg, _, tpage = study.trace(prompt, f"{slug}_transcoder", **kw)
    per_site = tg.n_active_total / max(len(tg.error_layer), 1)  # active per layer and position
    k = a.neuron_top_k if a.neuron_top_k is not None else max(1, round(per_site))
    ng, _, npage = study.trace(prompt, f"{slug}_neurons", neurons=k,
                               cards=cards["neurons"] or False, **kw)
    for kind, g, page in (("transcoder", tg, tpage), ("neurons", ng, npage)):
        rows = top_nodes(study, g, cards[kind], a.top)
        out[kind] = {**graph_numbers(g, a.node_threshold, a.edge_threshold, a.share),
                     "cards": card_summary(rows), "top_nodes": rows,
                     "page": page.name if page is not None else None,
                     "top_logits": [[s, float(p)] for s, p in zip(g.logit_strings[:3],
                                                                   g.logit_probs[:3])]}
    out["neuron_top_k"] = k
    out["transcoder_active_per_site"] = per_site
    return out


# --- the report ------------------------------------------------------------------------------------
KINDS = (("transcoder", "transcoder features"), ("neurons", "MLP neurons"))
ROWS = [  # (summary label, key, format)
    ("feature nodes in the graph", "feature_nodes", "{:.0f}"),
    ("features after pruning", "pruned_features", "{:.1f}"),
    ("error / other-neuron nodes after pruning", "pruned_errors", "{:.1f}"),
    ("N80 (feature nodes for 80% of their influence)", "n80", "{:.1f}"),
    ("N80 / feature nodes", "n80_share", "{:.3f}"),
    ("replacement score", "replacement", "{:.3f}"),
    ("completeness score", "completeness", "{:.3f}"),
    ("pruned replacement", "pruned_replacement", "{:.3f}"),
    ("pruned completeness", "pruned_completeness", "{:.3f}"),
]
CARD_ROWS = [
    ("top nodes whose card fires on one token (>= half its top examples)", "one_token"),
    ("top nodes whose card fires on the node's prompt token", "on_prompt_token"),
    ("mean share of a card's top examples on its most common token", "top_share"),
    ("top nodes never active in the scanned text", "never_active"),
]


def means(results: list[dict]) -> dict:
    out = {}
    for kind, _ in KINDS:
        out[kind] = {key: float(np.mean([r[kind][key] for r in results])) for _, key, _ in ROWS}
        cards = [r[kind]["cards"] for r in results if r[kind]["cards"]]
        out[kind]["cards"] = ({key: float(np.mean([c[key] for c in cards]))
                               for _, key in CARD_ROWS} if cards else {})
    return out


def write_report(study: Study, results: list[dict], summary: dict, n_contexts: int) -> None:
    a, say = study.args, study.say
    share = f"{a.share:.0%}"
    source = " (from `scripts/bench_prompts.py`)" if not a.prompt else ""
    say(f"{len(results)} prompt{'s' * (len(results) != 1)}{source}, each traced twice with "
        f"node_threshold {a.node_threshold}, edge_threshold {a.edge_threshold} and "
        + (f"at most {a.max_feature_nodes} feature nodes" if a.max_feature_nodes is not None
           else "every active feature or unit kept (no cap)")
        + ": once with the transcoder, once with the model's "
        "MLP neurons (`--neurons`; "
        + (f"{a.neuron_top_k} units" if a.neuron_top_k is not None else
           "as many units as the transcoder graph has active features")
        + " per layer and position, the rest folded into 'other neurons' nodes). N80: the "
        f"fewest feature nodes holding {share} of the influence of all the graph's feature nodes "
        "on the targets (pruning's own rule, ties kept). Cards: the top "
        f"{a.top} feature nodes by influence; neuron cards scanned over the same {n_contexts} "
        "contexts the transcoder's cards cite, with the same settings.\n")
    say("## Summary (means over the prompts)\n")
    say("| | " + " | ".join(t for _, t in KINDS) + " |")
    say("|---|---|---|")
    for label, key, fmt in ROWS:
        say(f"| {label} | " + " | ".join(fmt.format(summary[k][key]) for k, _ in KINDS) + " |")
    if summary["transcoder"]["cards"]:
        for label, key in CARD_ROWS:
            say(f"| {label} | " + " | ".join(f"{summary[k]['cards'][key]:.2f}"
                                             for k, _ in KINDS) + " |")
    t, n = summary["transcoder"], summary["neurons"]
    if t["n80"] > 0:
        say(f"\nOn these prompts a neuron graph needs {n['n80'] / t['n80']:.2f}x the feature nodes "
            f"of the transcoder graph to hold {share} of its feature nodes' influence "
            f"({n['n80']:.1f} vs {t['n80']:.1f}), and pruning keeps {n['pruned_features']:.1f} "
            f"neurons vs {t['pruned_features']:.1f} features. Replacement scores: "
            f"{n['replacement']:.3f} (neurons) vs {t['replacement']:.3f} (transcoder).")
    say("\n## Per prompt\n")
    say("| prompt | graph | top logit | feature nodes | pruned (features + errors) | N80 | "
        "replacement | completeness | one-token cards | on prompt token |")
    say("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for kind, title in KINDS:
            g = r[kind]
            c = g["cards"]
            top = g["top_logits"][0] if g["top_logits"] else ["", 0.0]
            what = title if kind == "transcoder" else f"{title} (k={r['neuron_top_k']})"
            say(f"| {_md(repr(r['prompt']))} | {what} | {_md(repr(top[0]))} {top[1]:.2f} | "
                f"{g['feature_nodes']} | {g['pruned_features']} + {g['pruned_errors']} | "
                f"{g['n80']} | "
                f"{g['replacement']:.3f} | {g['completeness']:.3f} | "
                + (f"{c['one_token']:.2f} | {c['on_prompt_token']:.2f} |" if c else "- | - |"))
    for r in results[:a.detail]:
        say(f"\n## {r['prompt']!r}: top nodes\n")
        for kind, title in KINDS:
            g = r[kind]
            page = f" ([page]({g['page']}))" if g["page"] else ""
            say(f"{title}{page}:\n")
            say("| node | token | influence | card label | top-example tokens | one-token |")
            say("|---|---|---|---|---|---|")
            for row in g["top_nodes"]:
                fired = ", ".join(row.get("fired", [])[:8]) or "-"
                say(f"| {row['name']} | {_md(repr(row['token']))} | {row['influence']:.4f} | "
                    f"{_md(row.get('label', '-'))} | {_md(fired)} | "
                    f"{'yes' if row.get('one_token') else 'no'} |")
            say("")


def main(argv=None) -> Path:
    ap = parser(__doc__)
    ap.add_argument("--prompts", type=int, default=5,
                    help="How many of the 20 prompts of scripts/bench_prompts.py.")
    ap.add_argument("--prompt", action="append", default=None,
                    help="A prompt of your own (repeatable; replaces --prompts).")
    ap.add_argument("--neuron-top-k", type=int, default=None,
                    help="Units per layer and position kept as nodes (default: the transcoder "
                         "graph's active features per layer and position).")
    ap.add_argument("--node-threshold", type=float, default=0.8)
    ap.add_argument("--edge-threshold", type=float, default=0.98)
    ap.add_argument("--share", type=float, default=0.8, help="N80's share of the influence.")
    ap.add_argument("--card-contexts", type=int, default=0,
                    help="Contexts of the transcoder's cards to scan for the neuron cards "
                         "(0: all of them).")
    ap.add_argument("--neuron-cards", default="",
                    help="Neuron cards file (default: OUT/neuron_cards.npz, made if missing).")
    ap.add_argument("--detail", type=int, default=3, help="Prompts whose top nodes are listed.")
    ap.add_argument("--docs", action="store_true",
                    help="Copy the report and results to docs/cases/.")
    # Full graphs by default (no cap on feature nodes): a cap keeps the most influential
    # features only, which changes N80 and the scores of both graphs.
    ap.set_defaults(top=10, max_feature_nodes=None)
    s = Study(NAME, ap.parse_args(argv))
    a = s.args
    prompts = a.prompt or default_prompts()[:a.prompts]
    tc_cards = transcoder_cards(s)
    cards = {"transcoder": tc_cards, "neurons": neuron_cards_for(s, tc_cards)}
    results = [compare(s, p, f"graph{i:02d}", cards) for i, p in enumerate(prompts)]
    summary = means(results)
    n_ctx = cards["neurons"].meta["n_contexts"] if cards["neurons"] is not None else 0
    write_report(s, results, summary, n_ctx)
    report = s.write("Case study: neurons vs features")
    out = {"model": a.model, "transcoder": a.transcoder, "node_threshold": a.node_threshold,
           "edge_threshold": a.edge_threshold, "share": a.share,
           "max_feature_nodes": a.max_feature_nodes, "neuron_top_k": a.neuron_top_k,
           "top": a.top, "card_contexts": n_ctx, "summary": summary, "prompts": results}
    (s.out / "results.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    print(f"results: {s.out / 'results.json'}")
    if a.docs:
        docs = ROOT / "docs" / "cases"
        shutil.copy(report, docs / f"{NAME}.md")
        shutil.copy(s.out / "results.json", docs / f"{NAME}.json")
    return report


if __name__ == "__main__":
    main()
