"""The pipeline command, above the stages: `cltrace trace "PROMPT" --model NAME --transcoder PATH
--out DIR` traces (stage 2, `attribution.trace`), prunes and exports the Neuronpedia JSON
(`attribution.export`) and draws the offline HTML page (stage 3, `viewer`)."""

from __future__ import annotations

from pathlib import Path

from clt.configs import add_arguments, field_help, from_arguments


def register(sub) -> None:
    from dataclasses import fields

    from attribution.trace import TraceConfig

    help_prompt = field_help(next(f for f in fields(TraceConfig) if f.name == "prompt"))
    p = sub.add_parser("trace", help="Attribution graph of a prompt's next token.",
                       description="Trace PROMPT through the local replacement model of MODEL "
                       "with TRANSCODER; write the graph (.npz + config.json) and its "
                       "Neuronpedia JSON.")
    p.add_argument("prompt", help=help_prompt)
    add_arguments(p, TraceConfig, skip=("prompt",))
    p.add_argument("--out", "-o", default="out/trace",
                   help="Output directory (graph.npz, config.json, graph.json), or a .npz path "
                   "(the JSON goes beside it). Default: out/trace")
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
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
    from rich.console import Console

    from attribution.export import write_neuronpedia
    from attribution.prune import prune
    from attribution.trace import TraceConfig, trace
    from clt.configs import ConfigError
    from clt.io import check_output_file
    from viewer import write_html
    from viewer.html import resolve_cards

    config = from_arguments(TraceConfig, args, prompt=args.prompt)
    console = Console(stderr=True)
    graph_path, json_path = _paths(args.out)
    if Path(args.out).suffix not in ("", ".npz") and Path(args.out).exists() \
            and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is an existing file; give a directory or a .npz path")
    for path, what in ((graph_path, "graph file"), (json_path, "graph JSON"),
                       (graph_path.with_suffix(".html"), "page")):
        check_output_file(path, what)  # before the model loads
    if config.dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 traces need it; the flag asks for it
    graph = trace(config, progress=not args.no_progress)
    r = graph.ranges
    with console.status("pruning", spinner="dots") as status:
        pruned = graph.pruned or prune(graph, config.node_threshold, config.edge_threshold)
        s = graph.scores  # the tracer's (attribution.prune.score)
        status.update(f"writing {graph_path}")
        graph.save(graph_path, full=config.save_full, pruned=pruned)
        status.update(f"writing {json_path}")
        cards, _ = resolve_cards(graph, None)  # feature labels for the JSON's clerps
        write_neuronpedia(graph, json_path, pruned=pruned, node_threshold=config.node_threshold,
                          labels=cards.clerp if cards is not None else None)
        status.update("writing the page")
        page = write_html(graph, graph_path.with_suffix(".html"))
    n_feat = r.feature.stop
    if graph.streamed:
        full = graph.full_graph
        print(f"full graph: {full.nodes} nodes ({full.features} features), {full.edges} edges; "
              f"stored: its {n_feat} most influential features (--stream-features)")
    print(f"nodes: {graph.n_nodes} ({n_feat} features of {graph.n_active_total} active, "
          f"{r.error.stop - r.error.start} errors, {graph.n_pos} tokens, "
          f"{len(graph.logit_tokens)} logits); edges: {graph.n_edges}")
    print(f"pruned: {int(pruned.node_mask.sum())} nodes, {int(pruned.edge_mask.sum())} edges "
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
    return 0
