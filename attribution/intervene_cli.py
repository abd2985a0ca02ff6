"""Commands that test a graph: `cltrace steer`, `cltrace direction`, `cltrace lens`.

    cltrace steer "PROMPT" --transcoder PATH --set 12:345@5=0 --max-new-tokens 20
    cltrace steer "PROMPT" --vector v.npy --layer 10 --alpha 8
    cltrace direction --positive pos.txt --negative neg.txt --layer 10 -o v.npy
    cltrace lens "PROMPT" --k 3 --html lens.html
"""

from __future__ import annotations

import html as _html
import json
from pathlib import Path

import numpy as np

from clt.configs import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "steer", help="Intervene on features (or steer with a direction) and compare outputs.",
        description="Run PROMPT with and without interventions: the next-token top-k of both and "
        "the change in probabilities, and both continuations side by side. Feature edits: "
        "--set L:F@POS=V, --scale L:F@POS=FACTOR, --add L:F@POS=DELTA, --zero L:F@POS; POS counts "
        "the prepended BOS as 0 (printed with the tokens), 'P+' means P and every later position "
        "(generated ones included), 'all' or nothing means every position.")
    p.add_argument("prompt")
    p.add_argument("--model", default="smollm2-135m", help="Model name or path.")
    p.add_argument("--transcoder", default=None,
                   help="Transcoder for feature edits (default: the one bundled for the model).")
    for op in ("set", "scale", "add"):
        p.add_argument(f"--{op}", action="append", default=[], metavar="L:F@POS=V",
                       help=f"{op} a feature's activation (repeatable).")
    p.add_argument("--zero", action="append", default=[], metavar="L:F@POS",
                   help="Zero a feature's activation (repeatable).")
    p.add_argument("--mode", choices=["free", "frozen"], default="free",
                   help="free: downstream features and attention recompute (errors kept); "
                   "frozen: patterns, norms, errors and other features fixed (direct effects, = "
                   "graph edges; next token only).")
    p.add_argument("--vector", default=None, help="Steer with this direction (.npy [d_model]).")
    p.add_argument("--feature-direction", default=None, metavar="L:F",
                   help="Steer along feature F of layer L's decoder into layer L.")
    p.add_argument("--layer", type=int, default=None, help="Steering: after this block.")
    p.add_argument("--alpha", type=float, default=4.0, help="Steering strength.")
    p.add_argument("--from-pos", type=int, default=0, help="Steering: from this position on.")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--k", type=int, default=5, help="Top-k next tokens to show.")
    p.add_argument("--out", default=None, help="Also write the comparison as JSON.")
    p.set_defaults(run=_steer)

    p = sub.add_parser("direction", help="Difference-of-means steering vector from two prompt "
                       "sets (one prompt per line).")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--positive", required=True, help="Text file, one prompt per line.")
    p.add_argument("--negative", required=True, help="Text file, one prompt per line.")
    p.add_argument("--layer", type=int, required=True, help="Residual stream after this block.")
    p.add_argument("--position", choices=["last", "mean"], default="last")
    p.add_argument("-o", "--out", required=True, help="Output .npy file.")
    p.set_defaults(run=_direction)

    p = sub.add_parser("lens", help="Logit lens: top tokens decoded from every layer and "
                       "position of the residual stream.")
    p.add_argument("prompt")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--html", default=None, help="Also write a heatmap page here.")
    p.add_argument("--every", type=int, default=1, help="Show every n-th layer in the table.")
    p.set_defaults(run=_lens)


def _prompt_ids(model, prompt: str) -> list[int]:
    from attribution.replacement import prepend_bos

    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    ids, _ = prepend_bos(model.cfg, model.tokenizer.encode(prompt, add_bos=False))
    if len(ids) > model.cfg.max_position:
        raise ConfigError(f"the prompt has {len(ids)} tokens but the model's context is "
                          f"{model.cfg.max_position}; shorten it")
    return ids


def _edits(args):
    from attribution.interventions import parse_edit

    specs = [s for s in args.set] + [s.replace("=", "*", 1) for s in args.scale] + \
        [s.replace("=", "+", 1) for s in args.add] + [s + "=0" for s in args.zero]
    return tuple(parse_edit(s) for s in specs)


def _steer(args) -> int:
    import jax
    import jax.numpy as jnp
    from rich.console import Console
    from rich.table import Table

    from attribution import interventions as iv
    from attribution.replacement import build
    from clt.lm.loading import load_model
    from clt.lm.model import forward

    console = Console()
    model = load_model(args.model)
    tok = model.tokenizer
    ids = _prompt_ids(model, args.prompt)
    edits = _edits(args)
    steering = args.vector is not None or args.feature_direction is not None
    if not edits and not steering:
        raise ConfigError("nothing to do: give feature edits (--set/--scale/--add/--zero) or a "
                          "direction (--vector / --feature-direction with --layer)")
    console.print("tokens: " + " ".join(f"[dim]{i}[/dim]{s!r}" for i, s in
                                        enumerate(tok.token_strings(ids))))
    params, cfg = model.params, model.cfg

    def original(t):
        return forward(params, cfg, t[None])[0][0]

    tc_cfg = tc_params = None
    if edits or args.feature_direction:
        from clt.circuit_tracer_io import open_transcoder

        args.transcoder, tc_cfg, tc_params = open_transcoder(args.transcoder, cfg)
        for e in edits:
            e.check(tc_cfg, len(ids))
    if steering:
        if args.layer is None:
            raise ConfigError("steering needs --layer (the block after which to add the vector)")
        if args.vector:
            v = jnp.asarray(np.load(args.vector))
            if v.shape != (cfg.d_model,):
                raise ConfigError(f"{args.vector} holds shape {v.shape}, the model needs "
                                  f"({cfg.d_model},)")
        else:
            layer, feature = (int(x) for x in args.feature_direction.split(":"))
            v = iv.feature_direction(tc_cfg, tc_params, layer, feature)

        def intervened(t):
            return iv.steered_logits(params, cfg, t, v, args.layer, args.alpha, args.from_pos)
    elif args.mode == "frozen":
        rm, acts = build(params, cfg, tc_cfg, tc_params, np.asarray(ids))
        frozen = iv.frozen_logits(params, cfg, tc_cfg, tc_params, rm, acts, edits)

        def intervened(t):
            return frozen
    else:
        rm, _ = build(params, cfg, tc_cfg, tc_params, np.asarray(ids))

        def intervened(t):
            return iv.free_logits(params, cfg, tc_cfg, tc_params, rm, edits, tokens=t)

    P = len(ids)
    before = original(jnp.asarray(ids))[P - 1]
    after = intervened(jnp.asarray(ids))[P - 1]
    pb, pa = (np.asarray(jax.nn.softmax(x.astype(jnp.float32))) for x in (before, after))
    union = list(dict.fromkeys(list(np.argsort(-pb)[:args.k]) + list(np.argsort(-pa)[:args.k])))
    table = Table(title="next token: probability before -> after")
    for col in ("token", "before", "after", "change"):
        table.add_column(col)
    for i in sorted(union, key=lambda i: -pa[i]):
        table.add_row(repr(tok.decode([int(i)])), f"{pb[i]:.4f}", f"{pa[i]:.4f}",
                      f"{pa[i] - pb[i]:+.4f}")
    console.print(table)
    result = {"prompt": args.prompt, "tokens": tok.token_strings(ids),
              "edits": [e.__dict__ for e in edits], "mode": args.mode,
              "top_before": [(tok.decode([int(i)]), float(pb[i])) for i in np.argsort(-pb)[:args.k]],
              "top_after": [(tok.decode([int(i)]), float(pa[i])) for i in np.argsort(-pa)[:args.k]]}
    if args.mode == "free" or steering:
        eos = tuple(cfg.eos_token_ids)
        gen_a = iv.greedy_continue(original, ids, args.max_new_tokens, eos)
        gen_b = iv.greedy_continue(intervened, ids, args.max_new_tokens, eos)
        side = Table(title="continuations")
        side.add_column("original")
        side.add_column("intervened")
        side.add_row(tok.decode(gen_a), tok.decode(gen_b))
        console.print(side)
        result.update(original=tok.decode(gen_a), intervened=tok.decode(gen_b))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


def _read_prompts(path: str) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    lines = [x.strip() for x in p.read_text().splitlines() if x.strip()]
    if not lines:
        raise ConfigError(f"{p} holds no prompts (one per line)")
    return lines


def _direction(args) -> int:
    from attribution.interventions import diff_of_means
    from clt.lm.loading import load_model

    model = load_model(args.model)
    pos = [_prompt_ids(model, s) for s in _read_prompts(args.positive)]
    neg = [_prompt_ids(model, s) for s in _read_prompts(args.negative)]
    v = np.asarray(diff_of_means(model.params, model.cfg, pos, neg, args.layer, args.position))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, v)
    print(f"wrote {args.out}: difference of means after block {args.layer} "
          f"({len(pos)} vs {len(neg)} prompts), norm {np.linalg.norm(v):.3f}")
    return 0


def _lens(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from attribution.interventions import logit_lens
    from clt.lm.loading import load_model

    model = load_model(args.model)
    tok = model.tokenizer
    ids = _prompt_ids(model, args.prompt)
    top, probs = logit_lens(model.params, model.cfg, ids, args.k)
    L = model.cfg.n_layers
    names = [f"in {layer}" for layer in range(L)] + ["out"]
    strings = tok.token_strings(ids)
    table = Table(title=f"logit lens (top-1 per layer and position; {model.cfg.name})")
    table.add_column("layer")
    for s in strings:
        table.add_column(repr(s)[1:-1], overflow="fold")
    rows = [i for i in range(L + 1) if i % args.every == 0 or i == L]
    for i in rows:
        table.add_row(names[i], *[f"{tok.decode([int(top[i, p, 0])])!r} {probs[i, p, 0]:.2f}"
                                  for p in range(len(ids))])
    Console().print(table)
    if args.html:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(_lens_html(names, strings, top, probs, tok))
        print(f"wrote {args.html}")
    return 0


def _lens_html(names, strings, top, probs, tok) -> str:
    """A self-contained heatmap: cell colour = top-1 probability, tooltip = top-k."""
    esc = _html.escape
    head = "".join(f"<th>{esc(s)}</th>" for s in strings)
    body = []
    for i in reversed(range(len(names))):
        cells = []
        for p in range(len(strings)):
            pr = float(probs[i, p, 0])
            tip = esc(", ".join(f"{tok.decode([int(t)])!r} {q:.2f}"
                                for t, q in zip(top[i, p], probs[i, p])))
            cells.append(f'<td title="{tip}" style="background:rgba(31,119,180,{pr:.3f})">'
                         f'{esc(tok.decode([int(top[i, p, 0])]))}</td>')
        body.append(f"<tr><th>{esc(names[i])}</th>{''.join(cells)}</tr>")
    return ("<!doctype html><meta charset='utf-8'><title>logit lens</title><style>"
            "body{font-family:sans-serif}td,th{border:1px solid #ddd;padding:2px 4px;"
            "font-size:12px;white-space:pre}</style><h3>Logit lens: top-1 token per layer and "
            "position (shade = probability; hover for top-k)</h3><table><tr><th></th>"
            f"{head}</tr>{''.join(body)}</table>")
