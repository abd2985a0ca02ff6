"""Linear probes: where in the residual stream does the model make a property linearly readable?

`cltrace probe` fits one logistic-regression classifier per point of the residual stream (the
embeddings, then the residual after every block) on labelled texts, and reports train and
held-out accuracy per layer against the chance level ("linear classifier probes", Alain & Bengio
2016; Belinkov 2022 for what probes do and do not show). Each probe's weight vector, mapped back
to raw residual coordinates, is a direction `cltrace steer --vector` can add after that block. It
is a readout direction (the gradient of the probe's logit), weighted towards low-variance
coordinates; to steer, a difference of means (`cltrace direction`) usually moves the model more
gently (Li et al. 2023, "Inference-time intervention", found the same).

    cltrace probe --positive fr.txt --negative en.txt --model gemma3-270m -o out/probe

The steps, as `run` reads:
1. Examples: one per non-blank line of --positive (label 1) and --negative (label 0), or one per
   row {"text": ..., "label": 0 or 1} of --data; at least `MIN_PER_CLASS` of each, checked before
   the model loads (`read_examples`).
2. A stratified held-out split drawn with --seed (`heldout_split`).
3. One vector per example at every stream: the last token's residual, or the mean over the tokens
   with the BOS left out (`attribution.interventions.residual_streams`, which `cltrace direction`
   also reads).
4. Per stream: features standardised with the training split's mean and standard deviation, then
   L2-regularised logistic regression by full-batch L-BFGS (`fit_logistic`, deterministic);
   accuracy on both splits (`fit_probes`).
5. Outputs (atomic, `clt.io`): results.json, accuracy.svg, probe.npz, directions/*.npy and
   config.json.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from clt.configs import ConfigError, doc

MIN_PER_CLASS = 4  # the held-out split takes at least one of each class, training keeps three
RESULTS_VERSION = 1
# L-BFGS stops when the gradient's norm (of the mean loss, standardised features) falls below
# this: ~10x float32's rounding noise in a gradient summed over a few hundred examples.
_GRAD_TOL = 1e-5


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class ProbeConfig:
    """`cltrace probe`: logistic-regression probes at every layer of the residual stream."""

    out: str = doc("Output directory: results.json, accuracy.svg, probe.npz, directions/ (one "
                   ".npy per layer for `cltrace steer --vector`) and config.json.", short="-o")
    positive: str | None = doc("Text file of label-1 examples, one per line.", default=None)
    negative: str | None = doc("Text file of label-0 examples, one per line.", default=None)
    data: str | None = doc('Instead of --positive/--negative: a JSONL file, one {"text": ..., '
                           '"label": 0 or 1} per line.', default=None)
    model: str = doc("Model name or path.", default="smollm2-135m")
    pool: Literal["last", "mean"] = doc(
        "Which residual of each example: last = its last token; mean = the mean over its "
        "tokens, the BOS left out.", default="last")
    heldout: float = doc("Fraction of each class held out for testing (stratified).",
                         default=0.25)
    l2: float = doc("L2 penalty on the weights (bias free) added to the mean log-loss, in "
                    "standardised feature units: loss + l2/2 |w|^2.", default=1e-2)
    seed: int = doc("Seed of the held-out split (the fit itself is deterministic).", default=0)
    max_iter: int = doc("Most L-BFGS iterations per layer.", default=1000)
    batch_size: int = doc("Examples per forward pass.", default=16)

    def __post_init__(self):
        c = "ProbeConfig"
        for name in ("out", "model", "positive", "negative", "data"):
            v = getattr(self, name)
            _need((v is None and name not in ("out", "model"))
                  or (isinstance(v, str) and v.strip() != ""),
                  f"{c}.{name} must be a non-empty string, got {v!r}")
        texts = self.positive is not None or self.negative is not None
        _need(not (texts and self.data is not None),
              f"{c}: give --data or --positive/--negative, not both")
        _need(texts or self.data is not None, f"{c}: nothing to probe: give --positive and "
              "--negative text files, or --data labelled.jsonl")
        _need(self.data is not None or (self.positive is not None and self.negative is not None),
              f"{c}: --positive and --negative go together (one text file per class)")
        _need(self.pool in ("last", "mean"),
              f"{c}.pool must be one of ['last', 'mean'], got {self.pool!r}")
        _need(_number(self.heldout) and 0 < self.heldout < 1,
              f"{c}.heldout must be a fraction in (0, 1), got {self.heldout!r}")
        _need(_number(self.l2) and math.isfinite(self.l2) and self.l2 >= 0,
              f"{c}.l2 must be a finite number >= 0, got {self.l2!r}")
        for name, low in (("seed", 0), ("max_iter", 1), ("batch_size", 1)):
            v = getattr(self, name)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= low,
                  f"{c}.{name} must be an integer >= {low}, got {v!r}")


# --- 1. examples -----------------------------------------------------------------------------------
def _read_jsonl(path: str) -> tuple[list[str], list[int]]:
    """Texts and labels of a labelled JSONL file; one-line errors name the line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--data {p}: " + ("a directory, not a JSONL file" if p.is_dir()
                                            else "no such file"))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--data {p} is not readable UTF-8 text ({type(e).__name__})") from None
    texts, labels = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"--data {p} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{where} is not JSON; write one "
                              '{"text": "...", "label": 0 or 1} per line') from None
        _need(isinstance(row, dict) and "text" in row and "label" in row,
              f'{where} must be an object with "text" and "label", got {line.strip()[:60]!r}')
        _need(isinstance(row["text"], str) and row["text"].strip() != "",
              f'{where}: "text" must be a non-empty string')
        _need(type(row["label"]) is int and row["label"] in (0, 1),
              f'{where}: "label" must be 0 or 1, got {row["label"]!r}')
        texts.append(row["text"].strip())
        labels.append(row["label"])
    _need(bool(texts), f'--data {p} holds no rows (one {{"text": ..., "label": 0/1}} per line)')
    return texts, labels


def read_examples(cfg: ProbeConfig) -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, labels [n] of 0/1, flag of each example's source) from --positive/--negative or
    --data, with at least `MIN_PER_CLASS` examples per class; before any model loads."""
    from attribution.intervene_cli import read_lines

    if cfg.data is not None:
        texts, labels = _read_jsonl(cfg.data)
        counts = [labels.count(0), labels.count(1)]
        _need(min(counts) >= MIN_PER_CLASS,
              f"--data {cfg.data} has {counts[1]} rows of label 1 and {counts[0]} of label 0; a "
              f"probe needs both classes, at least {MIN_PER_CLASS} of each")
        return texts, np.asarray(labels, np.int32), ["--data"] * len(texts)
    pos = read_lines(cfg.positive, "--positive", "examples")
    neg = read_lines(cfg.negative, "--negative", "examples")
    for flag, path, lines in (("--positive", cfg.positive, pos), ("--negative", cfg.negative, neg)):
        _need(len(lines) >= MIN_PER_CLASS,
              f"{flag} {path} has {len(lines)} example(s); a probe needs at least "
              f"{MIN_PER_CLASS} per class (one per line)")
    labels = np.array([1] * len(pos) + [0] * len(neg), np.int32)
    return pos + neg, labels, ["--positive"] * len(pos) + ["--negative"] * len(neg)


# --- 2. held-out split ---------------------------------------------------------------------------------
def heldout_split(labels: Int[np.ndarray, " example"], fraction: float,
                  seed: int) -> Bool[np.ndarray, " example"]:
    """True for held-out examples: fraction x n of each class (halves rounded up) drawn with
    `seed`, at least one and leaving at least one for training."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = np.zeros(labels.shape, bool)
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise ConfigError(f"class {c} has {len(idx)} example(s); a held-out split needs 2")
        k = min(max(1, math.floor(fraction * len(idx) + 0.5)), len(idx) - 1)
        held[rng.permutation(idx)[:k]] = True
    return held


# --- 4. logistic regression ------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("max_iter",))
def fit_logistic(X: Float[Array, "example feature"], y: Float[Array, " example"],
                 l2: float | Float[Array, ""], max_iter: int = 1000) -> tuple[Float[Array, " feature"], Float[Array, ""],
                                                Int[Array, ""], Float[Array, ""]]:
    """Minimise mean_i [softplus(z_i) - y_i z_i] + l2/2 |w|^2 with z = X w + b (the bias is not
    penalised): the log-loss of P(y = 1) = sigmoid(z). Full-batch L-BFGS from zero, until the
    gradient's norm is below `_GRAD_TOL` or `max_iter` steps; deterministic. Returns (w, b,
    iterations, final gradient norm)."""

    def loss(p):
        z = X @ p["w"] + p["b"]
        return jnp.mean(jax.nn.softplus(z) - y * z) + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    import optax  # here: every command's parser imports this module (~0.1 s for optax)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        p, state, i, _ = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), state, i + 1, optax.tree_utils.tree_norm(grad)

    def keep_going(carry):
        _, _, i, gnorm = carry
        return (i < max_iter) & (gnorm > _GRAD_TOL)

    p0 = {"w": jnp.zeros(X.shape[1], X.dtype), "b": jnp.zeros((), X.dtype)}
    carry = (p0, opt.init(p0), jnp.asarray(0), jnp.asarray(jnp.inf, X.dtype))
    p, _, iters, _ = jax.lax.while_loop(keep_going, step, carry)
    gnorm = optax.tree_utils.tree_norm(jax.grad(loss)(p))
    return p["w"], p["b"], iters, gnorm


@dataclass(frozen=True)
class ProbeFit:
    """Probes at every stream, in raw residual coordinates: logit = x . weights[s] + bias[s]
    (standardisation folded in: weights = w / scale, bias = b - (mean / scale) . w)."""

    weights: Float[np.ndarray, "stream d_model"]  # also the steering directions
    bias: Float[np.ndarray, " stream"]
    mean: Float[np.ndarray, "stream d_model"]  # the training split's, used to standardise
    scale: Float[np.ndarray, "stream d_model"]
    train_accuracy: Float[np.ndarray, " stream"]
    heldout_accuracy: Float[np.ndarray, " stream"]
    iterations: Int[np.ndarray, " stream"]
    grad_norm: Float[np.ndarray, " stream"]
    chance: float  # held-out accuracy of always answering the training split's majority class

    def logits(self, acts: Float[np.ndarray, "example stream d_model"]
               ) -> Float[np.ndarray, "example stream"]:
        return np.einsum("nsd,sd->ns", acts, self.weights) + self.bias


def _standardise(x: Float[np.ndarray, "example d_model"]):
    """Mean and scale of the training features; a (near-)constant feature keeps scale 1-ish
    rather than being blown up (its L2-penalised weight stays small)."""
    mean = x.mean(0)
    std = x.std(0)
    return mean, np.maximum(std, 1e-4 * max(float(std.mean()), 1e-30))


def fit_probes(acts: Float[np.ndarray, "example stream d_model"],
               labels: Int[np.ndarray, " example"], heldout: Bool[np.ndarray, " example"],
               l2: float, max_iter: int = 1000) -> ProbeFit:
    """One standardised logistic regression per stream on the training examples (`~heldout`),
    scored on both splits."""
    acts = np.asarray(acts, np.float64)
    labels = np.asarray(labels)
    heldout = np.asarray(heldout, bool)
    train = ~heldout
    if not (0 < labels[train].sum() < train.sum()):
        raise ConfigError("the training split needs examples of both classes")
    y = jnp.asarray(labels[train], jnp.float32)
    S, D = acts.shape[1], acts.shape[2]
    W, B = np.zeros((S, D), np.float64), np.zeros(S, np.float64)
    M, Z = np.zeros((S, D), np.float64), np.ones((S, D), np.float64)
    iters, gnorms = np.zeros(S, np.int64), np.zeros(S, np.float64)
    for s in range(S):
        x = acts[train, s]
        M[s], Z[s] = _standardise(x)
        w, b, it, g = fit_logistic(jnp.asarray((x - M[s]) / Z[s], jnp.float32), y, float(l2),
                                   max_iter)
        W[s] = np.asarray(w, np.float64) / Z[s]
        B[s] = float(b) - float(np.dot(M[s], W[s]))
        iters[s], gnorms[s] = int(it), float(g)
    fit = ProbeFit(W.astype(np.float32), B, M, Z, np.zeros(S), np.zeros(S), iters, gnorms, 0.0)
    correct = (fit.logits(acts) > 0) == (labels[:, None] == 1)
    majority = int(labels[train].mean() >= 0.5)
    return ProbeFit(fit.weights, B, M, Z, correct[train].mean(0), correct[heldout].mean(0),
                    iters, gnorms, float((labels[heldout] == majority).mean()))


def stream_names(n_layers: int) -> list[str]:
    """`residual_streams`' order: the embeddings, then after each block (its `steer --layer`)."""
    return ["emb"] + [str(layer) for layer in range(n_layers)]


# --- 5. outputs ---------------------------------------------------------------------------------
def accuracy_svg(names: list[str], train: list[float], heldout: list[float], chance: float,
                 title: str, width: int = 720, height: int = 360) -> str:
    """Train and held-out accuracy per stream with the chance level, as one standalone SVG
    (no plotting dependency; the style of scripts/plot_training.py)."""
    left, right, top, bottom = 55, 20, 40, 55
    lo = max(0.0, math.floor(min([chance, *train, *heldout]) * 10 - 1e-9) / 10)
    lo = min(lo, 0.9)

    def px(i):
        return left + (i / max(1, len(names) - 1)) * (width - left - right)

    def py(v):
        return top + (1 - (v - lo) / (1 - lo)) * (height - top - bottom)

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            'font-family="sans-serif">'), '<rect width="100%" height="100%" fill="white"/>',
           (f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="13">'
            f'{html.escape(title)}</text>'),
           (f'<rect x="{left}" y="{top}" width="{width - left - right}" '
            f'height="{height - top - bottom}" fill="none" stroke="#999"/>')]
    for k in range(round(lo * 10), 11):
        v = k / 10
        out.append(f'<line x1="{left}" y1="{py(v):.1f}" x2="{width - right}" y2="{py(v):.1f}" '
                   'stroke="#eee"/>')
        out.append(f'<text x="{left - 5}" y="{py(v) + 3:.1f}" text-anchor="end" '
                   f'font-size="10">{v:.1f}</text>')
    for i, n in enumerate(names):
        out.append(f'<text x="{px(i):.1f}" y="{height - bottom + 15}" text-anchor="middle" '
                   f'font-size="10">{html.escape(n)}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle" font-size="11">'
               'residual stream: embeddings, then after block L (steer --layer L)</text>')
    out.append(f'<text x="14" y="{(top + height - bottom) / 2}" font-size="11" '
               f'text-anchor="middle" transform="rotate(-90 14 {(top + height - bottom) / 2})">'
               'accuracy</text>')
    out.append(f'<line x1="{left}" y1="{py(chance):.1f}" x2="{width - right}" '
               f'y2="{py(chance):.1f}" stroke="#d62728" stroke-dasharray="4 3"/>')
    for values, colour, dash in ((train, "#ff7f0e", ' stroke-dasharray="6 3"'),
                                 (heldout, "#1f77b4", "")):
        pts = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(values))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" '
                   f'stroke-width="2"{dash}/>')
        out += [f'<circle cx="{px(i):.1f}" cy="{py(v):.1f}" r="3" fill="{colour}"/>'
                for i, v in enumerate(values)]
    # The legend mid-right: between chance and the top, where accuracy is rarely.
    for k, (label, colour, dash) in enumerate((
            ("held-out", "#1f77b4", ""), ("train", "#ff7f0e", ' stroke-dasharray="6 3"'),
            (f"chance {chance:.2f}", "#d62728", ' stroke-dasharray="4 3"'))):
        y = top + 0.4 * (height - top - bottom) + 15 * k
        out.append(f'<line x1="{width - right - 120}" y1="{y - 4:.1f}" '
                   f'x2="{width - right - 100}" y2="{y - 4:.1f}" stroke="{colour}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<text x="{width - right - 95}" y="{y:.1f}" font-size="11">{label}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_outputs(out: Path, cfg: ProbeConfig, fit: ProbeFit, names: list[str],
                  labels: np.ndarray, heldout: np.ndarray, model_name: str) -> dict:
    """results.json, accuracy.svg, probe.npz, directions/<stream>.npy and config.json."""
    from clt.configs import save_config
    from clt.io import atomic_write, check_output_dir

    check_output_dir(out / "directions")
    files = []
    for s, name in enumerate(names):
        rel = f"directions/{'emb' if name == 'emb' else 'layer' + name}.npy"
        atomic_write(out / rel, lambda f, v=fit.weights[s]: np.save(f, v))
        files.append(rel)
    atomic_write(out / "probe.npz", lambda f: np.savez(
        f, weights=fit.weights, bias=fit.bias, mean=fit.mean, scale=fit.scale,
        streams=np.array(names)))

    def counts(mask):
        return {"0": int(((labels == 0) & mask).sum()), "1": int(((labels == 1) & mask).sum())}

    layers = [{"stream": name, "steer_layer": None if name == "emb" else int(name),
               "train_accuracy": float(fit.train_accuracy[s]),
               "heldout_accuracy": float(fit.heldout_accuracy[s]),
               "iterations": int(fit.iterations[s]), "grad_norm": float(fit.grad_norm[s]),
               "direction": files[s]} for s, name in enumerate(names)]
    best = max(layers, key=lambda r: (r["heldout_accuracy"], -names.index(r["stream"])))
    source = ({"data": cfg.data} if cfg.data else
              {"positive (label 1)": cfg.positive, "negative (label 0)": cfg.negative})
    results = {
        "kind": "probe", "version": RESULTS_VERSION, "model": model_name, "pool": cfg.pool,
        "source": source, "examples": {"train": counts(~heldout), "heldout": counts(heldout)},
        "chance": fit.chance, "l2": cfg.l2, "seed": cfg.seed, "best": best, "layers": layers,
        "directions": ("probe weights in raw residual coordinates (logit = x . w + b, label 1 "
                       "positive); directions/layerL.npy is the residual after block L: "
                       "`cltrace steer --vector directions/layerL.npy --layer L` steers towards "
                       "label 1 (negative --alpha: towards label 0); emb.npy has no steer layer")}
    atomic_write(out / "results.json", json.dumps(results, indent=2))
    title = (f"linear probe per layer: {model_name}, pool {cfg.pool}, "
             f"{sum(counts(heldout).values())} held-out examples")
    atomic_write(out / "accuracy.svg", accuracy_svg(
        names, [r["train_accuracy"] for r in layers], [r["heldout_accuracy"] for r in layers],
        fit.chance, title))
    save_config(cfg, out / "config.json", kind="probe")
    return results


def run(args) -> int:
    """`cltrace probe`: the steps of the module docstring."""
    from rich.console import Console
    from rich.table import Table

    from attribution.intervene_cli import prompt_token_lists
    from attribution.interventions import residual_streams
    from clt.configs import from_arguments
    from clt.io import check_output_dir
    from clt.lm.loading import load_model

    cfg = from_arguments(ProbeConfig, args)
    texts, labels, flags = read_examples(cfg)  # 1. before the model loads
    out = check_output_dir(cfg.out, create=False)
    heldout = heldout_split(labels, cfg.heldout, cfg.seed)  # 2.
    model = load_model(cfg.model)
    ids = []  # 3.
    for flag in dict.fromkeys(flags):
        ids += prompt_token_lists(model, [t for t, f in zip(texts, flags) if f == flag], flag)
    acts = residual_streams(model.params, model.cfg, ids, cfg.pool, cfg.batch_size)
    fit = fit_probes(acts, labels, heldout, cfg.l2, cfg.max_iter)  # 4.
    names = stream_names(model.cfg.n_layers)
    results = write_outputs(out, cfg, fit, names, labels, heldout, model.cfg.name)  # 5.

    console = Console()
    ex = results["examples"]
    table = Table(title=f"probe accuracy per layer ({model.cfg.name}, pool {cfg.pool}; train "
                  f"{ex['train']['1']}+{ex['train']['0']}, held-out {ex['heldout']['1']}+"
                  f"{ex['heldout']['0']} examples of label 1+0)")
    for col in ("stream", "train", "held-out", ""):
        table.add_column(col, justify="right" if col != "" else "left")
    for r in results["layers"]:
        stream = "emb" if r["stream"] == "emb" else f"after block {r['stream']}"
        table.add_row(stream, f"{r['train_accuracy']:.3f}", f"{r['heldout_accuracy']:.3f}",
                      "#" * round(20 * r["heldout_accuracy"]))
    console.print(table)
    best = results["best"]
    where = "the embeddings" if best["stream"] == "emb" else f"after block {best['stream']}"
    print(f"chance (majority class) {fit.chance:.3f}; best held-out {best['heldout_accuracy']:.3f}"
          f" {where}")
    slow = fit.iterations >= cfg.max_iter
    if slow.any():
        print(f"note: {slow.sum()} layer(s) stopped at --max-iter {cfg.max_iter} with gradient "
              f"norm up to {fit.grad_norm[slow].max():.1e} (target {_GRAD_TOL:g})")
    steerable = [r for r in results["layers"] if r["steer_layer"] is not None]
    top = max(steerable, key=lambda r: r["heldout_accuracy"])
    print(f"wrote {out}: results.json, accuracy.svg, probe.npz, config.json, directions/ "
          f"(e.g. cltrace steer PROMPT --model {cfg.model} --vector {out / top['direction']} "
          f"--layer {top['steer_layer']})")
    return 0


__all__ = ["MIN_PER_CLASS", "ProbeConfig", "ProbeFit", "accuracy_svg", "fit_logistic",
           "fit_probes", "heldout_split", "read_examples", "run", "stream_names",
           "write_outputs"]
