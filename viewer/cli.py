"""Commands of stage 3: `cltrace view GRAPH -o PAGE.html`, `cltrace features ...` and
`cltrace lens PROMPT --html PAGE.html` (pages drawn from what stage 2 computes)."""

from __future__ import annotations

from pathlib import Path

from clt.configs import ConfigError, add_arguments, from_arguments


def register(sub) -> None:
    from viewer.embed import ViewConfig
    from viewer.features import FeaturesConfig

    p = sub.add_parser(
        "view", help="Write a graph's self-contained offline HTML page.",
        description="Write GRAPH as one HTML file that opens offline (vis-network inlined). "
        "Feature cards come from --cards, else from feature_cards.npz in the graph's transcoder "
        "directory when there is one.")
    p.add_argument("graph", help="A graph .npz from `cltrace trace` (or its directory), or a "
                   "Neuronpedia / circuit-tracer graph .json.")
    p.add_argument("-o", "--out", default=None,
                   help="Output .html (default: the graph's path with .html).")
    p.add_argument("--cards", default=None, help="Feature cards file from `cltrace features`.")
    p.add_argument("--no-cards", action="store_true", help="Embed no feature cards.")
    p.add_argument("--labels", default=None,
                   help='Feature labels, a JSON object {"layer_feature": "label"}.')
    add_arguments(p, ViewConfig)
    p.set_defaults(run=_view)

    p = sub.add_parser(
        "features", help="Feature cards: top activating examples, density, top output tokens.",
        description="Scan a corpus once through MODEL and TRANSCODER and store, per feature, its "
        "top activating contexts, random samples across its range, its activation density and "
        "its top output tokens, in one compact file next to the transcoder.")
    add_arguments(p, FeaturesConfig)
    p.add_argument("--no-progress", action="store_true", help="No progress bar.")
    p.set_defaults(run=_features)

    from attribution.interventions import LensConfig

    p = sub.add_parser("lens", help="Logit lens: top tokens decoded from every layer and "
                       "position of the residual stream.")
    add_arguments(p, LensConfig)
    p.set_defaults(run=_lens)


def _view(args) -> int:
    from clt.io import check_output_file
    from viewer.embed import ViewConfig
    from viewer.html import load_graph, read_labels, write_html
    from viewer.neuronpedia import from_neuronpedia

    config = from_arguments(ViewConfig, args)  # bad flags: refused before reading anything
    src = Path(args.graph)
    if not src.exists():
        raise ConfigError(f"no graph at {src}")
    out = Path(args.out) if args.out else (src / "graph.html" if src.is_dir()
                                           else src.with_suffix(".html"))
    check_output_file(out, "output page")
    labels = read_labels(args.labels) if args.labels else None
    from rich.console import Console

    with Console(stderr=True).status(f"reading {src}", spinner="dots") as status:
        graph = (from_neuronpedia(src, config.max_json_nodes) if src.suffix == ".json"
                 else load_graph(src))
        cards = False if args.no_cards else args.cards
        status.update(f"writing {out}")
        report = write_html(graph, out, cards=cards, config=config, labels=labels)
    print(f"page: {report.summary()}")
    return 0


def _features(args) -> int:
    from clt.io import check_output_file
    from viewer.features import FeaturesConfig, build, default_path

    config = from_arguments(FeaturesConfig, args)  # every value checked: nothing loaded yet
    # Paths before any compute: the text to scan, the cards file to write.
    _check_data(config.data)
    out = Path(config.out) if config.out else default_path(config.transcoder)
    if out is not None:
        check_output_file(out, "feature cards file")
    if config.explain_graph and not Path(config.explain_graph).expanduser().is_file():
        raise ConfigError(f"--explain-graph {config.explain_graph}: no such graph file")
    cards, path = build(config, progress=not args.no_progress)
    m = cards.meta
    where = f"{m['n_layers']} layers" if list(cards.layers) == list(range(cards.n_layers)) \
        else f"layers {', '.join(map(str, cards.layers))}"
    print(f"feature cards: {path} ({path.stat().st_size / 2**20:.1f} MB): {where} "
          f"x {m['n_features']} features from {m['n_tokens']} tokens in {m['n_contexts']} "
          f"contexts ({m['seconds']:.1f}s)")
    return 0


def _check_data(source: str) -> None:
    """`--data` names some local text (or a streamed hf: dataset), checked before the model
    loads (`clt.data` reads it: files, directories, globs, comma-separated)."""
    import glob

    if source.startswith("hf:"):
        return
    for part in (s.strip() for s in source.split(",") if s.strip()):
        p = Path(part).expanduser()
        if not (p.exists() or glob.glob(str(p), recursive=True)):
            raise ConfigError(f"--data: no text found at '{part}': give .txt/.jsonl files, a "
                              "directory, a glob, or hf:DATASET")


def _lens(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from attribution.interventions import LensConfig, logit_lens
    from attribution.replacement import prompt_ids
    from clt.io import atomic_write, check_output_file
    from clt.lm.loading import load_model
    from viewer.lens import render_lens

    lc = from_arguments(LensConfig, args)  # every value checked: nothing loaded yet
    html = check_output_file(lc.html, "--html page") if lc.html else None
    model = load_model(lc.model)
    tok = model.tokenizer
    if tok is None:
        raise ConfigError(f"the model {model.source} has no tokenizer; give a model directory "
                          "with tokenizer.json or a GGUF file")
    if lc.k > model.cfg.vocab_size:
        raise ConfigError(f"LensConfig.k must be in 1..{model.cfg.vocab_size} (the "
                          f"vocabulary), got {lc.k}")
    ids = prompt_ids(model, lc.prompt)
    top, probs = logit_lens(model.params, model.cfg, ids, lc.k)
    L = model.cfg.n_layers
    names = [f"in {layer}" for layer in range(L)] + ["out"]
    strings = tok.token_strings(ids)
    table = Table(title=f"logit lens (top-1 per layer and position; {model.cfg.name})")
    table.add_column("layer")
    for s in strings:
        table.add_column(repr(s)[1:-1], overflow="fold")
    for i in [i for i in range(L + 1) if i % lc.every == 0 or i == L]:
        table.add_row(names[i], *[f"{tok.decode([int(top[i, p, 0])])!r} {probs[i, p, 0]:.2f}"
                                  for p in range(len(ids))])
    Console().print(table)
    if html is not None:
        atomic_write(html, render_lens(names, strings, top, probs, lambda t: tok.decode([t]),
                                       model.cfg.name))
        print(f"wrote {html}")
    return 0
