"""Commands that test a graph: `cltrace steer`, `cltrace direction` (flags generated from
`attribution.interventions.SteerConfig` / `DirectionConfig`; `cltrace lens`, which draws a page,
is in `viewer.cli`).

    cltrace steer "PROMPT" --transcoder PATH --set 12:345@5=0 --max-new-tokens 20
    cltrace steer "PROMPT" --vector v.npy --layer 10 --alpha 8
    cltrace direction --positive pos.txt --negative neg.txt --layer 10 -o v.npy
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clt.configs import ConfigError, add_arguments, from_arguments


def register(sub) -> None:
    from attribution.interventions import DirectionConfig, SteerConfig

    p = sub.add_parser(
        "steer", help="Intervene on features (or steer with a direction) and compare outputs.",
        description="Run PROMPT with and without interventions: the next-token top-k of both and "
        "the change in probabilities, and both continuations side by side. Feature edits: "
        "--set L:F@POS=V, --scale L:F@POS=FACTOR, --add L:F@POS=DELTA, --zero L:F@POS; POS counts "
        "the prepended BOS as 0 (printed with the tokens), 'P+' means P and every later position "
        "(generated ones included), 'all' or nothing means every position.")
    add_arguments(p, SteerConfig)
    p.set_defaults(run=_steer)

    p = sub.add_parser("direction", help="Difference-of-means steering vector from two prompt "
                       "sets (one prompt per line).")
    add_arguments(p, DirectionConfig)
    p.set_defaults(run=_direction)


def _prompt_ids(model, prompt: str) -> list[int]:
    from attribution.replacement import prompt_ids

    return prompt_ids(model, prompt)


def _edits(sc):
    from attribution.interventions import parse_edit

    return tuple(parse_edit(s) for s in sc.edit_specs())


def _steer(args) -> int:
    import jax
    import jax.numpy as jnp
    from rich.console import Console
    from rich.table import Table

    from attribution import interventions as iv
    from attribution.replacement import build
    from clt.lm.loading import load_model
    from clt.lm.model import forward

    args = from_arguments(iv.SteerConfig, args)
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
    params, model_cfg = model.params, model.cfg

    def original(t):
        return forward(params, model_cfg, t[None])[0][0]

    tc_cfg = tc_params = None
    if edits or args.feature_direction:
        from clt.circuit_tracer_io import open_transcoder

        _, tc_cfg, tc_params = open_transcoder(args.transcoder, model_cfg)
        for e in edits:
            e.check(tc_cfg, len(ids))
    if steering:
        if args.layer is None:
            raise ConfigError("steering needs --layer (the block after which to add the vector)")
        if args.vector:
            v = jnp.asarray(np.load(args.vector))
            if v.shape != (model_cfg.d_model,):
                raise ConfigError(f"{args.vector} holds shape {v.shape}, the model needs "
                                  f"({model_cfg.d_model},)")
        else:
            layer, feature = (int(x) for x in args.feature_direction.split(":"))
            v = iv.feature_direction(tc_cfg, tc_params, layer, feature)

        def intervened(t):
            return iv.steered_logits(params, model_cfg, t, v, args.layer, args.alpha, args.from_pos)
    elif args.mode == "frozen":
        rm, acts = build(params, model_cfg, tc_cfg, tc_params, np.asarray(ids))
        frozen = iv.frozen_logits(params, model_cfg, tc_cfg, tc_params, rm, acts, edits)

        def intervened(t):
            return frozen
    else:
        rm, _ = build(params, model_cfg, tc_cfg, tc_params, np.asarray(ids))

        def intervened(t):
            return iv.free_logits(params, model_cfg, tc_cfg, tc_params, rm, edits, tokens=t)

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
        eos = tuple(model_cfg.eos_token_ids)
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
    from attribution.interventions import DirectionConfig, diff_of_means
    from clt.lm.loading import load_model

    args = from_arguments(DirectionConfig, args)
    model = load_model(args.model)
    pos = [_prompt_ids(model, s) for s in _read_prompts(args.positive)]
    neg = [_prompt_ids(model, s) for s in _read_prompts(args.negative)]
    v = np.asarray(diff_of_means(model.params, model.cfg, pos, neg, args.layer, args.position))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, v)
    print(f"wrote {args.out}: difference of means after block {args.layer} "
          f"({len(pos)} vs {len(neg)} prompts), norm {np.linalg.norm(v):.3f}")
    return 0
