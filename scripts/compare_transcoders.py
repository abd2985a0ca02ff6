"""Compare transcoders of one model: held-out reconstruction and the graphs they give.

    python scripts/compare_transcoders.py plt=out/train/smollm2_plt/transcoder \
        wclt3=out/train/smollm2_wclt3/transcoder clt=out/train/smollm2_clt64/transcoder \
        --json docs/results/compare_smollm2.json

For each transcoder (NAME=PATH; any layout `cltrace trace` reads):
- size: parameters and bytes of its files (the bundle size);
- held-out statistics from `clt.evaluate.evaluate` on `--contexts` contexts of `--data`: NMSE,
  L0 per layer, KL(original || spliced), top-1 agreement, delta CE;
- graph scores over a prompt set (the 20 built-in prompts below, or `--prompts FILE`, one per
  line, `\\n` for a newline): replacement and completeness scores of the unpruned and the pruned
  graph (circuit-tracer's definitions, `attribution.prune.score`), as mean and minimum;
  graphs hold at most `--max-feature-nodes` features (7,500, circuit-tracer's default), chosen
  by influence on the logits.

Prints one table (Markdown) and writes everything, per prompt included, to `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.prune import prune  # noqa: E402
from attribution.trace import TraceConfig, trace_tokens  # noqa: E402
from clt.circuit_tracer_io import open_transcoder  # noqa: E402
from clt.data import open_contexts  # noqa: E402
from clt.evaluate import evaluate  # noqa: E402
from clt.lm.loading import load_model  # noqa: E402

# Varied on purpose: facts, two-hop facts, the multilingual antonym, rhyme, code, arithmetic,
# sequences, quotations, plain narrative.
PROMPTS = [
    "The capital of France is",
    "Fact: the capital of the state containing Dallas is",
    'The opposite of "small" is "',
    'Le contraire de "petit" est "',
    '"小"的反义词是"',
    "He saw a carrot and had to grab it,\nHis hunger was like a starving",
    "The Eiffel Tower is located in the city of",
    "def add(a, b):\n    return a",
    "In the beginning God created the heaven and the",
    "Monday, Tuesday, Wednesday,",
    "Michael Jordan plays the sport of",
    "The chemical symbol for gold is",
    "import numpy as",
    "The sun rises in the east and sets in the",
    "Romeo and Juliet was written by William",
    "The first president of the United States was George",
    "A, B, C, D,",
    "Water freezes at zero degrees",
    "2 + 2 = 4, 3 + 3 =",
    "She opened the door, looked outside and said",
]


def bundle_bytes(path: str) -> int | None:
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix == ".safetensors")


def n_params(params) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(params)))


def compare_one(name: str, path: str, model, contexts, prompts, args) -> dict:
    """One transcoder's row; per-prompt results are kept in `--work-dir/NAME.json` as they come,
    so an interrupted comparison resumes where it stopped."""
    _, tc_cfg, tc_params = open_transcoder(path, model.cfg)
    work = Path(args.work_dir) / f"{name}.json"
    key = {"path": str(Path(path).resolve()), "max_feature_nodes": args.max_feature_nodes,
           "update_interval": args.update_interval,
           "contexts": int(len(contexts)), "data": args.data}
    saved = json.loads(work.read_text()) if work.exists() else {}
    if saved.get("key") != key:
        saved = {"key": key}
    if "eval" not in saved:
        t0 = time.perf_counter()
        ev = evaluate(model, tc_cfg, tc_params, contexts, batch_size=8, progress=False)
        saved.update(eval=ev.to_dict(), eval_seconds=time.perf_counter() - t0, prompts={})
        _write(work, saved)
    tok = model.tokenizer
    for prompt in prompts:
        if prompt in saved["prompts"]:
            continue
        ids = tok.encode(prompt, add_bos=False)
        config = TraceConfig(prompt=prompt, model=args.model, transcoder=path,
                             max_feature_nodes=args.max_feature_nodes,
                             update_interval=args.update_interval)
        t0 = time.perf_counter()
        graph = trace_tokens(model.params, model.cfg, tc_cfg, tc_params, ids, config,
                             token_strings=tok.token_strings(ids, merge=True),
                             logit_strings=lambda t: tok.token_strings([int(i) for i in t]))
        s = graph.scores  # computed by the tracer (attribution.prune.score)
        repl, compl, repl_p, compl_p = (s.replacement, s.completeness, s.pruned_replacement,
                                      s.pruned_completeness)
        pruned = prune(graph, config.node_threshold, config.edge_threshold)  # its node count
        saved["prompts"][prompt] = {
            "prompt": prompt, "seconds": time.perf_counter() - t0,
            "features": graph.ranges.feature.stop, "active": graph.n_active_total,
            "pruned_nodes": int(pruned.node_mask.sum()), "top_logit": graph.logit_strings[0],
            "replacement": repl, "completeness": compl,
            "pruned_replacement": repl_p, "pruned_completeness": compl_p}
        _write(work, saved)
        del graph, pruned
        print(f"  {name}: {prompt[:40]!r:44} repl {repl:.3f} compl {compl:.3f} "
              f"({saved['prompts'][prompt]['seconds']:.1f}s)", file=sys.stderr)
    per_prompt = [saved["prompts"][p] for p in prompts]
    scores = {k: [p[k] for p in per_prompt] for k in
              ("replacement", "completeness", "pruned_replacement", "pruned_completeness")}
    cfg = tc_cfg
    return {
        "name": name, "path": path,
        "kind": ("PLT" if cfg.max_reach == 1 else "CLT" if cfg.max_reach is None
                 else f"CLT reach {cfg.max_reach}"),
        "n_features": cfg.n_features, "activation": cfg.activation,
        "params": n_params(tc_params), "bytes": bundle_bytes(path),
        "eval": saved["eval"], "eval_seconds": saved["eval_seconds"],
        "mean": {k: float(np.mean(v)) for k, v in scores.items()},
        "min": {k: float(np.min(v)) for k, v in scores.items()},
        "prompts": per_prompt,
    }


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def table(rows: list[dict]) -> str:
    head = ("| transcoder | kind | features/layer | MB | NMSE | L0/layer | KL | top-1 | ΔCE | "
            "replacement | completeness | pruned repl. | pruned compl. |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        e, m = r["eval"], r["mean"]
        mb = f"{r['bytes'] / 2**20:.1f}" if r["bytes"] else "-"
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['n_features']} | {mb} | {e['nmse_mean']:.3f} | "
            f"{e['l0_total'] / len(e['nmse_per_layer']):.1f} | {e['kl']:.2f} | "
            f"{e['top1_agreement']:.3f} | {e['delta_ce']:+.2f} | "
            f"{m['replacement']:.3f} (min {r['min']['replacement']:.3f}) | "
            f"{m['completeness']:.3f} | {m['pruned_replacement']:.3f} | "
            f"{m['pruned_completeness']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("transcoders", nargs="+", help="NAME=PATH of each transcoder.")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="data/corpus-heldout",
                    help="Held-out text for NMSE/L0/KL (default data/corpus-heldout, from "
                    "`make corpus`).")
    ap.add_argument("--contexts", type=int, default=64, help="Held-out contexts (default 64).")
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--prompts", default=None, help="File of prompts, one per line.")
    ap.add_argument("--limit", type=int, default=None, help="Only the first N prompts.")
    ap.add_argument("--max-feature-nodes", type=int, default=7500,
                    help="Feature cap of each graph (default 7500, circuit-tracer's default; 0: "
                    "none, the full graph, whose dense adjacency can take many GB).")
    ap.add_argument("--update-interval", type=int, default=32,
                    help="Batches of rows between re-rankings of the features left (default 32: "
                    "a coarser ranking than `cltrace trace`'s 4, several times faster on a CPU).")
    ap.add_argument("--work-dir", default="out/compare",
                    help="Per-transcoder results as they come (an interrupted run resumes).")
    ap.add_argument("--json", default=None, help="Write all figures here.")
    args = ap.parse_args(argv)

    pairs = []
    for item in args.transcoders:
        name, sep, path = item.partition("=")
        if not sep:
            ap.error(f"give each transcoder as NAME=PATH, got {item!r}")
        pairs.append((name, path))
    prompts = PROMPTS
    if args.prompts:
        prompts = [line.rstrip("\n").replace("\\n", "\n")
                   for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    prompts = prompts[:args.limit]
    args.max_feature_nodes = args.max_feature_nodes or None
    model = load_model(args.model)
    source = open_contexts(args.data, model.tokenizer, args.context_length, split="train")
    contexts = np.asarray(source.contexts[:args.contexts])
    rows = [compare_one(name, path, model, contexts, prompts, args) for name, path in pairs]
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"model": args.model, "data": args.data, "contexts": int(len(contexts)),
             "context_length": args.context_length,
             "max_feature_nodes": args.max_feature_nodes,
             "update_interval": args.update_interval, "transcoders": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
