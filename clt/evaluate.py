"""Evaluation of a trained transcoder (`cltrace eval`): reconstruction, sparsity, spliced model.

Reconstruction and sparsity are measured on the model's own activations (each layer's transcoder
input and MLP output from one clean forward pass):
- NMSE per layer, sum over tokens of ||y_hat - y||^2 / sum over tokens of ||y - y_bar||^2, y_bar
  that layer's mean MLP output over the evaluated tokens (the fraction of variance unexplained);
  the mean NMSE is the mean over layers.
- L0: active features per token, per layer and summed over layers.
- Dead features (never active on the evaluation tokens) and dense ones (active on more than a
  given fraction of them), as fractions of all layers' features.

The spliced replacement model replaces every MLP by the transcoder, reading the spliced model's
own activations, so errors compound through the layers as in "Circuit Tracing" (Ameisen et al.,
2025, section on the replacement model). A sparse autoencoder on the residual stream (`kind`
sae) is evaluated the same way: NMSE of its reconstruction of the residual stream it reads, and
the spliced model with that residual stream replaced by the reconstruction (`clt.splice`).
`splice_layers` splices only some layers of a per-layer dictionary (one, for an SAE's usual
per-layer KL). An SAE on some layers only (`TranscoderConfig.layers`) is measured at those:
per-layer metrics are listed in the order of its dictionaries (`EvalResult.layers` names their
model layers), and its spliced model replaces those residual streams (or the ones of
`splice_layers`, model layers it covers). The spliced model is compared with the original model on next-token
predictions: KL(original || spliced), top-1 agreement, cross-entropy of both and their difference.

Sums over tokens are accumulated exactly across batches (means and centred sums of squares are
merged with Chan et al.'s pairwise formula in float64), so results do not depend on `batch_size`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from clt.configs import ConfigError, doc
from clt.lm.loading import LoadedModel
from clt.lm.model import forward as lm_forward
from clt.splice import SplicedTranscoder
from clt.train_config import check_encoding, check_range, check_text, check_types
from clt.transcoder import (
    TranscoderConfig,
    TranscoderParams,
    check_model,
    check_params,
    init_pending,
    layer_step,
)


@dataclass(frozen=True)
class EvalConfig:
    """`cltrace eval`: which transcoder, model and held-out text."""

    transcoder: str = doc("Transcoder directory (ours or circuit-tracer layout) or hub repo.")
    model: str | None = doc("Model (default: the one named in the transcoder's config).",
                            default=None)
    data: str = doc("Text files/globs or hf:DATASET.", default="data/corpus")
    text_field: str = doc("Field holding the text in .jsonl / dataset rows.", default="text")
    encoding: str = doc("Encoding of the local text files (a file that is not valid text in it "
                        "is refused, naming the file).", default="utf-8")
    text_errors: Literal["strict", "replace"] = doc(
        "Bytes not valid in `encoding`: strict (refuse the file) or replace (read them as "
        "U+FFFD).", default="strict")
    split: Literal["heldout", "train", "all"] = doc(
        "Which contexts of local text: the held-out fraction (as in training), the rest, or "
        "all.", default="heldout")
    holdout: float = doc("Held-out fraction, as given to `cltrace train`.", default=0.01)
    contexts: int = doc("Contexts to evaluate.", default=64)
    context_length: int = doc("Tokens per context.", default=128)
    batch_size: int = doc("Contexts per batch.", default=8)
    splice_layers: tuple[int, ...] = doc(
        "Layers the spliced model replaces (a PLT's MLPs, an SAE's residual streams; the rest "
        "stay the model's own); empty: every layer (an SAE's: every layer it covers). Model "
        "layers, which an SAE must cover. A CLT is spliced whole.", default=())
    out: str | None = doc("Write the metrics as JSON here.", default=None)

    def __post_init__(self):
        check_types(self)
        for layer in self.splice_layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                raise ConfigError(f"EvalConfig.splice_layers must be layer indices >= 0, got "
                                  f"{list(self.splice_layers)}")
        check_text(self, "transcoder", "data", "text_field")
        check_text(self, "model", "out", optional=True)
        check_encoding(self)
        for name in ("contexts", "batch_size"):
            check_range(self, name, 1, integer=True)
        check_range(self, "context_length", 2, integer=True)  # BOS and one token to predict
        check_range(self, "holdout", 0, 1, hi_open=True)
        if self.split == "heldout" and self.holdout <= 0:
            raise ConfigError("EvalConfig.split heldout needs holdout > 0 (--holdout)")


def training_overlap(ec: EvalConfig) -> str | None:
    """A warning when the held-out contexts asked for are not the ones the transcoder's training
    held out (its info.json records its TrainConfig): other data, holdout or context length."""
    info = Path(ec.transcoder) / "info.json"
    if ec.split != "heldout" or not info.is_file():
        return None
    try:
        tc = json.loads(info.read_text()).get("train_config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    diff = [f"{k}={tc[k]!r}" for k in ("data", "holdout", "context_length", "text_field")
            if k in tc and tc[k] != getattr(ec, k)]
    if not diff:
        return None
    return (f"the transcoder was trained with {', '.join(diff)}: these held-out contexts may "
            "include its training data")


# --- per-batch sums (jit) ---------------------------------------------------------------------
@partial(jax.jit, static_argnames=("cfg", "tc_cfg", "layers"))
def _batch_sums(params, cfg, tc_params: TranscoderParams, tc_cfg: TranscoderConfig,
                tokens: Int[Array, "batch pos"], rows: Float[Array, " batch"], drop_bos,
                layers: tuple[int, ...] | None = None):
    """Sums over one batch's tokens (rows with weight 0 are padding) of every metric's terms."""
    logits, cap = lm_forward(params, cfg, tokens,
                             capture=(tc_cfg.input_point, tc_cfg.output_point))
    spliced, _ = lm_forward(params, cfg, tokens,
                            mlp_hook=SplicedTranscoder(tc_cfg, layers=layers),
                            hook_params=tc_params)
    x, y = getattr(cap, tc_cfg.input_point), getattr(cap, tc_cfg.output_point)
    B, T = tokens.shape
    # drop_bos: the attention-sink position has outlier norms that would dominate the statistics.
    w = rows[:, None] * jnp.where(drop_bos & (jnp.arange(T) == 0), 0.0, 1.0)
    n = w.sum()
    pending = init_pending(tc_cfg, tc_params, x[0])
    sq_err, mean, m2, active = [], [], [], []
    for index, layer in enumerate(tc_cfg.model_layers):  # dictionary index, model layer
        acts, recon, pending = layer_step(tc_cfg, tc_params, index, x[layer], pending)
        yl = y[layer].astype(jnp.float32)
        sq_err.append(jnp.sum(w * jnp.sum(jnp.square(recon - yl), -1)))
        mu = jnp.sum(w[..., None] * yl, (0, 1)) / jnp.maximum(n, 1.0)
        mean.append(mu)
        m2.append(jnp.sum(w * jnp.sum(jnp.square(yl - mu), -1)))  # centred within the batch
        active.append(jnp.sum((acts != 0) & (w[..., None] > 0), (0, 1), dtype=jnp.int32))
    # Next-token predictions at positions 0..T-2 (all kept: drop_bos only concerns activations).
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    logq = jax.nn.log_softmax(spliced[:, :-1], -1)
    pw = jnp.broadcast_to(rows[:, None], (B, T - 1))
    target = tokens[:, 1:, None]
    nll_p = -jnp.take_along_axis(logp, target, -1)[..., 0]
    nll_q = -jnp.take_along_axis(logq, target, -1)[..., 0]
    return {
        "n": n, "sq_err": jnp.stack(sq_err), "mean": jnp.stack(mean), "m2": jnp.stack(m2),
        "active": jnp.stack(active), "n_pred": pw.sum(),
        "kl": jnp.sum(pw * jnp.sum(jnp.exp(logp) * (logp - logq), -1)),
        "agree": jnp.sum(pw * (logp.argmax(-1) == logq.argmax(-1))),
        "ce_orig": jnp.sum(pw * nll_p), "ce_spliced": jnp.sum(pw * nll_q),
    }


class _Totals:
    """Float64 host accumulators; per-layer mean and centred sum of squares merged exactly."""

    def __init__(self, n_layers: int, d_model: int, n_features: int):
        self.n = 0.0
        self.mean = np.zeros((n_layers, d_model))
        self.m2 = np.zeros(n_layers)
        self.sq_err = np.zeros(n_layers)
        self.active = np.zeros((n_layers, n_features), np.int64)
        self.scalars = dict.fromkeys(("n_pred", "kl", "agree", "ce_orig", "ce_spliced"), 0.0)

    def add(self, s: dict) -> None:
        nb = float(s["n"])
        if nb > 0:  # Chan, Golub & LeVeque (1979): merge (n, mean, M2) of two sets
            delta = np.asarray(s["mean"], np.float64) - self.mean
            tot = self.n + nb
            self.m2 += np.asarray(s["m2"], np.float64) + (delta ** 2).sum(-1) * self.n * nb / tot
            self.mean += delta * nb / tot
            self.n = tot
        self.sq_err += np.asarray(s["sq_err"], np.float64)
        self.active += np.asarray(s["active"], np.int64)
        for k in self.scalars:
            self.scalars[k] += float(s[k])


# --- the result --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalResult:
    """Metrics of a transcoder on held-out text (see the module docstring for definitions)."""

    nmse_per_layer: list[float]
    nmse_mean: float
    l0_per_layer: list[float]
    l0_total: float
    dead_fraction: float
    dense_fraction: float
    kl: float  # KL(original || spliced), nats per predicted token
    top1_agreement: float
    ce_original: float  # nats per predicted token
    ce_spliced: float
    delta_ce: float  # ce_spliced - ce_original
    n_tokens: int  # tokens in the activation statistics (BOS dropped if asked)
    n_predictions: int  # next-token predictions in KL / top-1 / CE
    spliced_layers: list[int] | None = None  # the layers spliced (None: all it covers)
    layers: list[int] | None = None  # model layers of the per-layer lists (None: 0..L-1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self):
        """A rich Table of the metrics (per-layer lists on one line each)."""
        from rich.table import Table

        def row(values):
            return " ".join(f"{v:.3g}" for v in values)

        where = "" if self.spliced_layers is None else \
            f", layers {', '.join(map(str, self.spliced_layers))} spliced"
        at = "" if self.layers is None else f" (layers {', '.join(map(str, self.layers))})"
        table = Table(title=f"Transcoder evaluation ({self.n_tokens} tokens, "
                            f"{self.n_predictions} predictions{where})")
        table.add_column("metric")
        table.add_column("value", overflow="fold")
        for name, value in (
                ("NMSE (mean over layers)", f"{self.nmse_mean:.4f}"),
                ("NMSE per layer" + at, row(self.nmse_per_layer)),
                ("L0 (total over layers)", f"{self.l0_total:.1f}"),
                ("L0 per layer" + at, row(self.l0_per_layer)),
                ("dead features", f"{self.dead_fraction:.2%}"),
                ("dense features", f"{self.dense_fraction:.2%}"),
                ("KL(original || spliced)", f"{self.kl:.4f}"),
                ("top-1 agreement", f"{self.top1_agreement:.2%}"),
                ("CE original", f"{self.ce_original:.4f}"),
                ("CE spliced", f"{self.ce_spliced:.4f}"),
                ("ΔCE", f"{self.delta_ce:+.4f}")):
            table.add_row(name, value)
        return table


def _result(t: _Totals, dense_threshold: float, layers=None, covered=None) -> EvalResult:
    n, s = t.n, t.scalars
    # A layer whose MLP output is constant has no variance to explain: NMSE is then undefined.
    nmse = [float(e / v) if v > 0 else float("nan") for e, v in zip(t.sq_err, t.m2)]
    l0 = [float(a.sum() / n) if n else float("nan") for a in t.active]
    npred = s["n_pred"]
    ce_o = s["ce_orig"] / npred
    ce_s = s["ce_spliced"] / npred
    return EvalResult(
        nmse_per_layer=nmse, nmse_mean=float(np.mean(nmse)), l0_per_layer=l0,
        l0_total=float(np.sum(l0)), dead_fraction=float(np.mean(t.active == 0)),
        dense_fraction=float(np.mean(t.active > dense_threshold * n)),
        kl=float(s["kl"] / npred), top1_agreement=float(s["agree"] / npred),
        ce_original=float(ce_o), ce_spliced=float(ce_s), delta_ce=float(ce_s - ce_o),
        n_tokens=int(n), n_predictions=int(npred),
        spliced_layers=None if layers is None else list(layers),
        layers=None if covered is None else list(covered))


def evaluate(model: LoadedModel, tc_cfg: TranscoderConfig, tc_params: TranscoderParams,
             contexts: np.ndarray, batch_size: int = 8, drop_bos: bool = True,
             dense_threshold: float = 0.1, progress: bool = True,
             splice_layers: tuple[int, ...] | None = None) -> EvalResult:
    """Evaluate a transcoder (or SAE) on `contexts` ([n, T] token ids of held-out text).

    drop_bos: leave position 0 (BOS, an attention sink with outlier activations) out of NMSE,
      L0, dead and dense statistics. The spliced model still runs on it, and KL / top-1 / CE
      cover every next-token prediction (positions 0..T-2 predicting 1..T-1).
    dense_threshold: a feature is dense when active on more than this fraction of tokens.
    splice_layers: splice only these model layers (a PLT or SAE; None or empty: all it covers).
    The last batch is padded (padding rows carry weight 0), so one compilation serves all.
    """
    check_model(tc_cfg, model.cfg)
    check_params(tc_cfg, tc_params)
    layers = tuple(sorted(set(splice_layers))) if splice_layers else None
    SplicedTranscoder(tc_cfg, layers=layers)  # refuses bad layers before any compute
    contexts = np.asarray(contexts)
    if contexts.ndim != 2 or not np.issubdtype(contexts.dtype, np.integer):
        raise ValueError(f"contexts must be an [n, T] integer array of token ids, got shape "
                         f"{contexts.shape} and dtype {contexts.dtype}")
    n_ctx, T = contexts.shape
    if n_ctx == 0 or T < 2:
        raise ValueError(f"contexts must hold at least one sequence of at least 2 tokens, got "
                         f"shape {contexts.shape}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    from clt.progress import progress_bar

    batch_size = min(batch_size, n_ctx)
    totals = _Totals(tc_cfg.n_layers, tc_cfg.d_model, tc_cfg.n_features)
    starts = range(0, n_ctx, batch_size)
    with progress_bar(progress, transient=False) as bar:
        task = bar.add_task("evaluating", total=len(starts))
        for start in starts:
            chunk = contexts[start:start + batch_size]
            rows = np.zeros(batch_size, np.float32)
            rows[:len(chunk)] = 1.0
            pad = np.repeat(chunk[:1], batch_size - len(chunk), axis=0)
            tokens = jnp.asarray(np.concatenate([chunk, pad]), jnp.int32)
            sums = _batch_sums(model.params, model.cfg, tc_params, tc_cfg, tokens,
                               jnp.asarray(rows), jnp.asarray(drop_bos), layers)
            totals.add(jax.device_get(sums))
            bar.advance(task)
    return _result(totals, dense_threshold, layers, tc_cfg.layers or None)


__all__ = ["EvalConfig", "EvalResult", "SplicedTranscoder", "evaluate"]
