"""The pipeline command, above the stages: `cltrace trace "PROMPT" --model NAME --transcoder PATH
--out DIR` traces (stage 2, `attribution.trace`), prunes and exports the Neuronpedia JSON
(`attribution.export`) and draws the offline HTML page (stage 3, `viewer`)."""

from __future__ import annotations

import json
from pathlib import Path

from clt.configs import add_arguments, field_help, from_arguments


def register(sub) -> None:
    from dataclasses import fields

    from attribution.trace import TraceConfig
    from clt import distributed

    help_prompt = field_help(next(f for f in fields(TraceConfig) if f.name == "prompt"))
    p = sub.add_parser("trace", help="Attribution graph of a prompt's next token.",
                       description="Trace PROMPT (or every prompt of --prompts FILE) through the "
                       "local replacement model of MODEL with TRANSCODER; write the graph (.npz "
                       "+ config.json), its Neuronpedia JSON and its page.")
    p.add_argument("prompt", nargs="?", default=None, help=help_prompt)
    add_arguments(p, TraceConfig, skip=("prompt",))
    p.add_argument("--prompts", metavar="FILE", default=None,
                   help="Trace every prompt of FILE in one process (the model, transcoder and "
                   "compiled programs loaded once): one prompt per line, or JSONL objects "
                   "{\"prompt\", \"name\", \"target\", \"minus\", \"target_vector\"} (fields "
                   "left out come from the flags). Writes --out/NNN-name/ per prompt and "
                   "--out/summary.json + summary.md.")
    p.add_argument("--out", "-o", default="out/trace",
                   help="Output directory (graph.npz, config.json, graph.json), or a .npz path "
                   "(the JSON goes beside it). Default: out/trace")
    p.add_argument("--plan", action="store_true",
                   help="Print the predicted peak memory, disk and time of a dense, a streamed "
                   "and a capped trace of PROMPT on this device (after the forward pass and one "
                   "measured batch of rows), and stop: nothing is traced or written.")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    distributed.add_arguments(p, "split --prompts over the processes (each traces every n-th "
                              "prompt; process 0 writes the summary)")
    p.set_defaults(run=_trace)


def _paths(out: str) -> tuple[Path, Path]:
    o = Path(out)
    if o.suffix == ".npz":
        return o, o.with_suffix(".json")
    return o / "graph.npz", o / "graph.json"


def _target_text(t: dict) -> str:
    if t["kind"] == "token":
        return f"{t['name']!r} p={t['prob']:.4g}"
    if t["kind"] == "logit difference":
        a, b = t["probs"]
        return f"{t['name']!r}: logit difference {t['logit_difference']:+.3f} (p {a:.4g} vs {b:.4g})"
    return t["name"]


def _trace(args) -> int:
    from attribution.trace import TraceConfig
    from clt import distributed
    from clt.configs import ConfigError

    distributed.check_arguments(args)
    if (args.prompt is None) == (args.prompts is None):
        raise ConfigError("give a PROMPT or --prompts FILE (one of the two)")
    if args.distributed and args.prompts is None:
        raise ConfigError("--distributed splits --prompts over processes: give --prompts FILE")
    config = from_arguments(TraceConfig, args, prompt=args.prompt or "")
    if args.plan and args.prompts is not None:
        raise ConfigError("--plan predicts one prompt's trace: give a PROMPT, not --prompts")
    if args.prompts is not None:
        return _trace_many(config, args)
    if args.plan:
        return _plan(config, args)
    from attribution.trace import trace

    graph_path, json_path = _check_outputs(args.out)
    if config.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 traces need it; the flag asks for it
    graph = trace(config, progress=not args.no_progress)
    _write(graph, config, graph_path, json_path, progress=not args.no_progress)
    return 0


def _plan(config, args) -> int:
    """`--plan`: the predicted cost of each mode, as a table; nothing written."""
    from rich.console import Console
    from rich.table import Table

    from attribution.trace import Tracer, check_prompt

    check_prompt(config)
    if config.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
    st, plans = Tracer(config, not args.no_progress).plan(config)
    t = Table(title=f"plan: {st.n_pos} tokens, {st.n_all} active features, {st.n_err} error "
              f"nodes, {st.n_logit} targets; batch {st.batch}")
    for c in ("mode", "features kept", "rows", "batches", "compilations", "peak memory",
              "disk (--save-full)", "time", "of which rows", ""):
        t.add_column(c, justify="left" if c in ("mode", "") else "right")
    for p in plans:
        note = ("refused: " + p.refused.split(";")[0]) if p.refused else (
            "<- this command" if p.chosen else "")
        t.add_row(p.mode, str(p.features_kept), str(p.rows), str(p.batches),
                  str(p.compilations), f"{p.peak_gb:.2f} GB", f"{p.disk_mb:.1f} MB",
                  f"{p.seconds:.0f} s", f"{p.seconds_rows:.0f} s", note)
    Console(width=160).print(t)
    print("predicted after the forward pass and one measured batch of rows on this device "
          "(attribution/plan.py); the default graph file holds the pruned graph only")
    return 0


def _check_outputs(out: str) -> tuple[Path, Path]:
    """(graph file, JSON file) of --out, every output path checked before the model loads."""
    from clt.configs import ConfigError
    from clt.io import check_output_file

    graph_path, json_path = _paths(out)
    if Path(out).suffix not in ("", ".npz") and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out} is an existing file; give a directory or a .npz path")
    for path, what in ((graph_path, "graph file"), (json_path, "graph JSON"),
                       (graph_path.with_suffix(".html"), "page")):
        check_output_file(path, what)
    return graph_path, json_path


class _Cards:
    """Feature cards per transcoder, read once (a batch of prompts shares one)."""

    def __init__(self):
        self._by_ref = {}

    def __call__(self, graph):
        from viewer.html import resolve_cards

        ref = str(graph.config.get("transcoder", ""))
        if ref not in self._by_ref:
            self._by_ref[ref] = resolve_cards(graph, None)[0]
        return self._by_ref[ref]


def _write(graph, config, graph_path: Path, json_path: Path, *, cards=None, progress=True,
           quiet: bool = False):
    """Prune, write graph.npz (+ config.json), the Neuronpedia JSON and the page; print what
    was written (one line under `quiet`). Returns the pruning."""
    from rich.console import Console

    from attribution.export import write_neuronpedia
    from attribution.prune import prune
    from viewer import write_html

    console = Console(stderr=True)
    r = graph.ranges
    cards = (cards or _Cards())(graph)
    with console.status("pruning", spinner="dots") as status:
        pruned = graph.pruned or prune(graph, config.node_threshold, config.edge_threshold)
        s = graph.scores  # the tracer's (attribution.prune.score)
        status.update(f"writing {graph_path}")
        graph.save(graph_path, full=config.save_full, pruned=pruned)
        status.update(f"writing {json_path}")
        write_neuronpedia(graph, json_path, pruned=pruned, node_threshold=config.node_threshold,
                          labels=cards.clerp if cards is not None else None)
        status.update("writing the page")
        page = write_html(graph, graph_path.with_suffix(".html"), cards=cards)
    if quiet:
        return pruned
    n_feat = r.feature.stop
    if graph.streamed:
        full = graph.full_graph
        print(f"full graph: {full.nodes} nodes ({full.features} features), {full.edges} edges; "
              f"stored: its {n_feat} most influential features (--stream-features)")
    units = "neurons" if graph.info.get("neurons") else "features"
    errors = "'other neurons' nodes" if graph.info.get("neurons") else "errors"
    # The edges as the page counted them (counting a full graph's adjacency again: 0.2 s).
    print(f"nodes: {graph.n_nodes} ({n_feat} {units} of {graph.n_active_total} active, "
          f"{r.error.stop - r.error.start} {errors}, {graph.n_pos} tokens, "
          f"{len(graph.logit_tokens)} logits); edges: {page.details['edges_in_graph']}")
    print(f"pruned: {int(pruned.node_mask.sum())} nodes, {pruned.n_edges} edges "
          f"(node threshold {config.node_threshold}, edge threshold {config.edge_threshold})")
    print(f"replacement score {s.replacement:.4f}, completeness score {s.completeness:.4f} "
          f"(unpruned); {s.pruned_replacement:.4f}, {s.pruned_completeness:.4f} (pruned)")
    if graph.custom_targets:
        print("targets: " + "; ".join(_target_text(t) for t in graph.info.get("targets", [])))
    else:
        print("top logits: " + ", ".join(f"{s!r} {p:.3f}" for s, p in
                                         zip(graph.logit_strings, graph.logit_probs)))
    first = graph.info.get("seconds_to_first_rows")
    console.print(f"[dim]rows in {graph.info.get('seconds_rows', 0):.1f}s"
                  + (f"; first rows {first:.1f}s after the command started" if first else "")
                  + "[/dim]")
    kind = "every node and edge" if config.save_full else "the pruned graph"
    print(f"graph: {graph_path} ({graph_path.stat().st_size / 2**20:.1f} MB, {kind}; + "
          f"{graph_path.parent / 'config.json'})")
    print(f"neuronpedia json: {json_path}")
    print(f"page: {page.summary()}")
    return pruned


def _trace_many(base, args) -> int:
    """`--prompts FILE`: every prompt traced by one loaded tracer (or split over processes)."""
    import time

    import jax

    from attribution.prompts import read_prompts
    from attribution.trace import Tracer
    from clt import distributed
    from clt.configs import ConfigError
    from clt.io import atomic_write, check_output_dir, check_output_file
    from cltrace.batch import summary_markdown, summary_row

    items = read_prompts(args.prompts, base)  # every line checked before the model loads
    if Path(args.out).suffix == ".npz":
        raise ConfigError("--prompts writes one folder per prompt: give --out a directory")
    out = check_output_dir(args.out)
    for name in ("summary.json", "summary.md"):
        check_output_file(out / name, "summary")
    if base.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    distributed.initialize(args)
    rank, size = jax.process_index(), jax.process_count()
    mine = items[rank::size]
    progress = not args.no_progress
    tracer = Tracer(base, progress)
    for item in mine:  # tokens, targets and lengths of every prompt, before the first trace
        try:
            tracer.prepare(item.config)
        except ConfigError as e:
            raise ConfigError(f"{args.prompts}:{item.line}: {e}") from None
    if size > 1:
        print(f"process {rank} of {size}: {len(mine)} of {len(items)} prompts")
    cards, rows = _Cards(), []
    t_all = time.perf_counter()
    for item in mine:
        t0 = time.perf_counter()
        folder = out / item.folder
        graph = tracer.trace(item.config, progress)
        folder.mkdir(parents=True, exist_ok=True)
        pruned = _write(graph, item.config, folder / "graph.npz", folder / "graph.json",
                        cards=cards, progress=progress, quiet=True)
        row = summary_row(item, graph, pruned, cards(graph), time.perf_counter() - t0)
        rows.append(row)
        top = row["targets"][0]
        print(f"[{item.index + 1}/{len(items)}] {item.name!r}: {top['name']!r} "
              f"{top['prob']:.3f}; {row['features']} features, {row['pruned_nodes']} nodes "
              f"pruned; replacement {row['replacement']:.3f}, completeness "
              f"{row['completeness']:.3f} ({row['seconds']:.1f}s) -> {folder}")
    seconds = time.perf_counter() - t_all
    every = distributed.gather_json({"rows": rows, "seconds": seconds})
    if rank != 0:
        return 0
    rows = sorted((r for part in every for r in part["rows"]), key=lambda r: r["index"])
    summary = {"prompts_file": str(Path(args.prompts).resolve()), "model": base.model,
               "transcoder": tracer.ref, "processes": size,
               "seconds_tracing": [round(p["seconds"], 3) for p in every], "prompts": rows}
    atomic_write(out / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False))
    atomic_write(out / "summary.md", summary_markdown(summary))
    print(f"summary: {out / 'summary.json'}, {out / 'summary.md'} ({len(rows)} prompts, "
          f"{max(p['seconds'] for p in every):.1f}s of tracing)")
    return 0
