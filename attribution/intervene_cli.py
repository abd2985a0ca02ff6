"""Commands that test a graph: `cltrace steer`, `cltrace direction`, `cltrace probe` (flags
generated from `attribution.interventions.SteerConfig` / `DirectionConfig` and
`attribution.probe.ProbeConfig`; `cltrace lens`, which draws a page, is in `viewer.cli`).

    cltrace steer "PROMPT" --transcoder PATH --set 12:345@5=0 --max-new-tokens 20
    cltrace steer "PROMPT" --transcoder SAE_DIR --set 6:12=10x   (10 x its card's max activation)
    cltrace steer "PROMPT" --vector v.npy --layer 10 --alpha 0.3
    cltrace direction --positive pos.txt --negative neg.txt --layer 10 -o v.npy
    cltrace probe --positive fr.txt --negative en.txt -o out/probe   (attribution.probe)

Every value is checked by the config dataclasses (one-line ConfigError) and every path before the
model loads; the prompt's length is checked right after tokenising, before any generation; the
JSON written by --out and the .npy of `direction` are written atomically (`clt.io`).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clt.configs import ConfigError, add_arguments, from_arguments

if TYPE_CHECKING:
    from clt.transcoder import TranscoderConfig


def register(sub) -> None:
    from attribution.interventions import DirectionConfig, SteerConfig
    from attribution.probe import ProbeConfig
    from attribution.probe import run as run_probe

    p = sub.add_parser(
        "steer", help="Intervene on features (or steer with a direction) and compare outputs.",
        description="Run PROMPT with and without interventions: the next-token top-k of both and "
        "the change in probabilities, and both continuations side by side. Feature edits: "
        "--set L:F@POS=V, --scale L:F@POS=FACTOR, --add L:F@POS=DELTA, --zero L:F@POS; POS counts "
        "the prepended BOS as 0 (printed with the tokens), 'P+' means P and every later position "
        "(generated ones included), 'all' or nothing means every position. Steering "
        "(--vector / --feature-direction, --layer, --alpha) adds the direction scaled to alpha "
        "times the mean residual norm after that block; edits and steering are separate runs.")
    add_arguments(p, SteerConfig)
    p.set_defaults(run=_steer)

    p = sub.add_parser("direction", help="Difference-of-means steering vector from two prompt "
                       "sets (one prompt per line).")
    add_arguments(p, DirectionConfig)
    p.set_defaults(run=_direction)

    p = sub.add_parser(
        "probe", help="Logistic-regression probe at every layer: where is a property linearly "
        "readable?", description="Fit one L2-regularised logistic regression per point of the "
        "residual stream (the embeddings, then after every block) on labelled texts, one example "
        "per line of --positive (label 1) and --negative (label 0), or per row of --data JSONL "
        "({\"text\": ..., \"label\": 0/1}). Each example is read at its last token (--pool last) "
        "or as the mean over its tokens, BOS left out (--pool mean). Prints train and held-out "
        "accuracy per layer and the chance level; writes results.json, accuracy.svg, probe.npz, "
        "config.json and directions/layerL.npy, a vector for `cltrace steer --vector ... "
        "--layer L` (towards label 1).")
    add_arguments(p, ProbeConfig)
    p.set_defaults(run=run_probe)


def _prompt_ids(model, prompt: str) -> list[int]:
    from attribution.replacement import prompt_ids

    if model.tokenizer is None:
        raise ConfigError(f"the model {model.source} has no tokenizer; give a model directory "
                          "with tokenizer.json or a GGUF file")
    return prompt_ids(model, prompt)


def _steer(args) -> int:
    from attribution import interventions as iv
    from clt.io import check_output_file

    sc = from_arguments(iv.SteerConfig, args)  # values, edit specs, combinations: no model yet
    out = check_output_file(sc.out) if sc.out else None
    if sc.cards and not Path(sc.cards).expanduser().exists():
        raise ConfigError(f"--cards {sc.cards}: no such file; build it with `cltrace features`")
    raw_vector = _read_vector(sc.vector) if sc.vector else None
    return _run_steer(sc, out, raw_vector)


def _read_vector(path: str) -> np.ndarray:
    """A steering vector file, read before the model loads: a 1-d, finite, non-zero .npy."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--vector {p}: no such file" + (" (a directory)" if p.is_dir() else ""))
    try:
        v = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"--vector {p} is not a readable .npy array ({type(e).__name__}); "
                          "write it with `cltrace direction` or numpy.save") from None
    if not isinstance(v, np.ndarray) or v.ndim != 1 or not np.issubdtype(v.dtype, np.number):
        raise ConfigError(f"--vector {p} holds {getattr(v, 'shape', '?')} "
                          f"{getattr(v, 'dtype', '')}; it must be one numeric vector [d_model]")
    v = v.astype(np.float32)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(v).all() or norm == 0:
        raise ConfigError(f"--vector {p} is all zeros or holds non-finite values (norm {norm}); "
                          "it has no direction to steer along")
    return v


def _run_steer(sc, out: Path | None, raw_vector: np.ndarray | None) -> int:
    import jax
    import jax.numpy as jnp
    from rich.console import Console
    from rich.table import Table

    from attribution import interventions as iv
    from attribution.replacement import build
    from clt.io import atomic_write
    from clt.lm.loading import load_model
    from clt.lm.model import forward

    console = Console()
    model = load_model(sc.model)
    tok = model.tokenizer
    params, model_cfg = model.params, model.cfg
    _check_model_fit(sc, model_cfg)
    ids = _prompt_ids(model, sc.prompt)
    P = len(ids)
    # Checks that need the prompt's length, before any generation.
    if sc.steering and sc.from_pos >= P:
        raise ConfigError(f"SteerConfig.from_pos must be in 0..{P - 1} (the prompt's positions, "
                          f"BOS = 0), got {sc.from_pos}")
    if P + sc.max_new_tokens > model_cfg.max_position:
        raise ConfigError(f"SteerConfig.max_new_tokens must be <= {model_cfg.max_position - P} "
                          f"(the prompt has {P} tokens, the model's context is "
                          f"{model_cfg.max_position}), got {sc.max_new_tokens}")
    edits = sc.edits()
    console.print("tokens: " + " ".join(f"[dim]{i}[/dim]{s!r}" for i, s in
                                        enumerate(tok.token_strings(ids))))

    def original(t):
        return forward(params, model_cfg, t[None])[0][0]

    tc_cfg = tc_params = None
    if sc.neurons:
        from attribution.neurons import neuron_transcoder

        tc_cfg = neuron_transcoder(params, model_cfg)[0]  # layers x units, for the edits' checks
        for e in edits:
            e.check(tc_cfg, P)
    elif edits or sc.feature_direction:
        from attribution.replacement import check_transcoder
        from clt.circuit_tracer_io import open_transcoder

        ref, tc_cfg, tc_params = open_transcoder(sc.transcoder, model_cfg)
        for e in edits:
            e.check(tc_cfg, P)
        if edits and sc.mode == "frozen":
            check_transcoder(tc_cfg)  # an SAE has no local replacement model to freeze
        edits = _resolve_multiples(sc, ref, tc_cfg, edits)
    steering = None
    if sc.steering:
        if raw_vector is not None:
            v = raw_vector
        else:
            layer, feature = sc.feature_ref()
            v = iv.feature_direction(tc_cfg, tc_params, layer, feature)
        steering = iv.steering_vector(params, model_cfg, ids, v, sc.layer, sc.alpha)
        s = steering.summary()
        console.print(f"steering after block {sc.layer} from position {sc.from_pos}: "
                      f"alpha {sc.alpha:g} x reference norm {s['reference_norm']:.3g} = added "
                      f"norm {s['added_norm']:.3g} (raw vector norm {s['raw_vector_norm']:.3g}; "
                      "unit: mean residual norm after that block over the prompt, BOS excluded)")
        added = jnp.asarray(steering.vector)

        def intervened(t):
            return iv.steered_logits(params, model_cfg, t, added, sc.layer, 1.0, sc.from_pos)
    elif sc.neurons:
        def intervened(t):
            return iv.neuron_edit_logits(params, model_cfg, edits, t)
    elif sc.mode == "frozen":
        rm, acts = build(params, model_cfg, tc_cfg, tc_params, np.asarray(ids))
        frozen = iv.frozen_logits(params, model_cfg, tc_cfg, tc_params, rm, acts, edits)

        def intervened(t):
            return frozen
    else:
        # An SAE is spliced with its error recomputed on the run: no replacement to build.
        rm = None if tc_cfg.is_sae else build(params, model_cfg, tc_cfg, tc_params,
                                              np.asarray(ids))[0]

        def intervened(t):
            return iv.free_logits(params, model_cfg, tc_cfg, tc_params, rm, edits, tokens=t)

    before = original(jnp.asarray(ids))[P - 1]
    after = intervened(jnp.asarray(ids))[P - 1]
    pb, pa = (np.asarray(jax.nn.softmax(x.astype(jnp.float32))) for x in (before, after))
    union = list(dict.fromkeys(list(np.argsort(-pb)[:sc.k]) + list(np.argsort(-pa)[:sc.k])))
    table = Table(title="next token: probability before -> after")
    for col in ("token", "before", "after", "change"):
        table.add_column(col)
    for i in sorted(union, key=lambda i: -pa[i]):
        table.add_row(repr(tok.decode([int(i)])), f"{pb[i]:.4f}", f"{pa[i]:.4f}",
                      f"{pa[i] - pb[i]:+.4f}")
    console.print(table)
    result = {"prompt": sc.prompt, "tokens": tok.token_strings(ids),
              "edits": [e.__dict__ for e in edits], "mode": "steer" if steering else sc.mode,
              "steering": None if steering is None else {
                  **steering.summary(), "from_pos": sc.from_pos, "vector": sc.vector,
                  "feature_direction": sc.feature_direction},
              "top_before": [(tok.decode([int(i)]), float(pb[i])) for i in np.argsort(-pb)[:sc.k]],
              "top_after": [(tok.decode([int(i)]), float(pa[i])) for i in np.argsort(-pa)[:sc.k]]}
    if sc.mode == "free" or steering:
        eos = tuple(model_cfg.eos_token_ids)
        gen_a = iv.greedy_continue(original, ids, sc.max_new_tokens, eos)
        gen_b = iv.greedy_continue(intervened, ids, sc.max_new_tokens, eos)
        side = Table(title="continuations")
        side.add_column("original")
        side.add_column("intervened")
        side.add_row(tok.decode(gen_a), tok.decode(gen_b))
        console.print(side)
        result.update(original=tok.decode(gen_a), intervened=tok.decode(gen_b))
    else:
        console.print("frozen mode: next token only (no continuation is generated)")
    if out is not None:
        atomic_write(out, json.dumps(result, indent=2, default=str))
        print(f"wrote {out}")
    return 0


# Feature cards are stage 3's artifact (`viewer.features`), whose reader registers here on import
# (`viewer` imports `attribution`, never the reverse): (transcoder ref, --cards path or None,
# its TranscoderConfig) -> (each feature's maximum activation [dictionary, feature], source name).
CardMaxima = Callable[[str, "str | None", "TranscoderConfig"], "tuple[np.ndarray, str]"]
_card_maxima: CardMaxima | None = None


def register_card_maxima(reader: CardMaxima) -> None:
    global _card_maxima
    _card_maxima = reader


def _resolve_multiples(sc, ref: str, tc_cfg, edits: tuple) -> tuple:
    """Edit values written Nx made absolute from the features' cards (maximum activation)."""
    if not any(e.of_max for e in edits):
        return edits
    from attribution.interventions import resolve_multiples

    if _card_maxima is None:  # only when this module runs without the `cltrace` command
        raise ConfigError("values written Nx need the feature cards' reader: run `cltrace steer`")
    maxima, source = _card_maxima(ref, sc.cards, tc_cfg)
    return resolve_multiples(edits, maxima, source, tc_cfg)


def _check_model_fit(sc, model_cfg) -> None:
    """Checks that need the model's config (not its prompt): layer and k ranges."""
    if sc.layer is not None and not 0 <= sc.layer < model_cfg.n_layers:
        raise ConfigError(f"SteerConfig.layer must be in 0..{model_cfg.n_layers - 1} (the "
                          f"model's blocks), got {sc.layer}")
    if sc.k > model_cfg.vocab_size:
        raise ConfigError(f"SteerConfig.k must be in 1..{model_cfg.vocab_size} (the "
                          f"vocabulary), got {sc.k}")


def read_lines(path: str, flag: str, what: str = "prompts") -> list[str]:
    """The non-blank lines of a UTF-8 text file given by `flag`, stripped: one prompt (or
    example) each; one-line errors for a missing, unreadable or empty file (before any model
    loads). Shared by `cltrace direction` and `cltrace probe`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{flag} {p}: " + ("a directory, not a text file" if p.is_dir()
                                            else "no such file"))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {p} is not readable UTF-8 text ({type(e).__name__})") from None
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if not lines:
        raise ConfigError(f"{flag} {p} holds no {what} (one per line)")
    return lines


def prompt_token_lists(model, prompts: list[str], flag: str) -> list[list[int]]:
    """Each prompt's token ids (BOS prepended); a prompt too long for the model is named by its
    flag and number."""
    if model.tokenizer is None:
        _prompt_ids(model, "x")  # the one-line "no tokenizer" error
    out = []
    for i, s in enumerate(prompts, 1):
        try:
            out.append(_prompt_ids(model, s))
        except ConfigError as e:
            raise ConfigError(f"{flag}: prompt {i}: {e}") from None
    return out


def _direction(args) -> int:
    from attribution.interventions import DirectionConfig, diff_of_means
    from clt.io import atomic_write, check_output_file
    from clt.lm.loading import load_model

    dc = from_arguments(DirectionConfig, args)
    out = check_output_file(dc.out)
    positive = read_lines(dc.positive, "--positive")
    negative = read_lines(dc.negative, "--negative")
    model = load_model(dc.model)
    if dc.layer >= model.cfg.n_layers:
        raise ConfigError(f"DirectionConfig.layer must be in 0..{model.cfg.n_layers - 1} (the "
                          f"model's blocks), got {dc.layer}")
    pos = prompt_token_lists(model, positive, "--positive")
    neg = prompt_token_lists(model, negative, "--negative")
    v = np.asarray(diff_of_means(model.params, model.cfg, pos, neg, dc.layer, dc.position),
                   np.float32)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(v).all() or norm == 0:
        raise ConfigError(f"the two prompt sets give the same mean residual after block "
                          f"{dc.layer} (difference norm {norm}): no direction; nothing written")
    atomic_write(out, lambda f: np.save(f, v))
    print(f"wrote {out}: difference of means after block {dc.layer} ({len(pos)} vs "
          f"{len(neg)} prompts), norm {norm:.3f} (`cltrace steer --vector` uses only its "
          "direction; --alpha sets the size)")
    return 0
