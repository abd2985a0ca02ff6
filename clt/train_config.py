"""`TrainConfig`: everything `cltrace train` needs, saved as config.json in the run directory,
and the check that a run directory may be resumed with a given config.

The transcoder to train is a nested `TranscoderConfig` (width and depth left 0: the model's);
its fields are given flat on the command line and in config files (`clt.configs`, `flatten`).

Every field is checked in `__post_init__` (type, range, finiteness, choices: `check_types`,
`check_range`), so the command line, config files and the Python API refuse the same values with
the same one-line message naming the field and what it may be, before any model is loaded.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal, get_args, get_origin

from clt.configs import ConfigError, doc, from_dict, load_config, to_dict
from clt.transcoder import TranscoderConfig, check_layers


# --- field checks (shared with EvalConfig) --------------------------------------------------------
@cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _type_ok(tp, value) -> bool:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(a, value) for a in get_args(tp))
    if origin is Literal:
        return value in get_args(tp)
    if origin is tuple:
        return isinstance(value, tuple)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _kind(tp) -> str:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_kind(a) for a in get_args(tp))
    if origin is Literal:
        return f"one of {list(get_args(tp))}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            type(None): "None"}.get(tp, getattr(tp, "__name__", str(tp)))


def check_types(cfg) -> None:
    """Every field of the dataclass `cfg` holds its annotated type (a Literal: one of its
    choices), as `clt.configs.from_dict` requires of files and flags; the Python API gets the
    same refusal."""
    name = type(cfg).__name__
    for f in dataclasses.fields(cfg):
        tp, value = _hints(type(cfg))[f.name], getattr(cfg, f.name)
        if not _type_ok(tp, value):
            raise ConfigError(f"{name}.{f.name} must be {_kind(tp)}, got {value!r}")


def _num(v) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


def check_range(cfg, field: str, lo=None, hi=None, *, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False, allow: tuple = ()) -> None:
    """`cfg.field` is finite (floats) and within [lo, hi] (`lo_open` / `hi_open`: excluded), or
    one of `allow` (e.g. -1 for "all", inf for "no limit"); else one ConfigError naming the
    field and the allowed range."""
    v = getattr(cfg, field)
    if v in allow and not (isinstance(v, float) and math.isnan(v)):
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (lo is None or (v > lo if lo_open else v >= lo))
    ok = ok and (hi is None or (v < hi if hi_open else v <= hi))
    if ok:
        return
    what = "an integer" if integer else "a finite number"
    if lo is not None and hi is not None:
        rng = f"{what} in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f"{what} {'>' if lo_open else '>='} {_num(lo)}"
    elif hi is not None:
        rng = f"{what} {'<' if hi_open else '<='} {_num(hi)}"
    else:
        rng = what
    if allow:
        rng += f" (or {' or '.join(str(a) for a in allow)})"
    raise ConfigError(f"{type(cfg).__name__}.{field} must be {rng}, got {v!r}")


def check_text(cfg, *fields: str, optional: bool = False) -> None:
    """Text fields (paths, names) are not empty."""
    for field in fields:
        v = getattr(cfg, field)
        if (v is None and not optional) or (v is not None and not str(v).strip()):
            raise ConfigError(f"{type(cfg).__name__}.{field} must not be empty, got {v!r}")


def check_encoding(cfg, field: str = "encoding") -> None:
    try:
        codecs.lookup(getattr(cfg, field))
    except LookupError:
        raise ConfigError(f"{type(cfg).__name__}.{field} must be a text encoding Python knows "
                          f"(utf-8, latin-1, cp1252, ...), got {getattr(cfg, field)!r}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Everything `cltrace train` needs; saved as config.json in the run directory."""

    # --- what to train on ---
    model: str = doc("Model to train on: embedded name, .gguf, Hugging Face dir or hub id.",
                     default="smollm2-135m")
    data: str = doc("Text: .txt/.jsonl files, directories or globs (comma-separated), or "
                    "hf:DATASET[:CONFIG][:SPLIT] (streamed).", default="data/corpus")
    text_field: str = doc("Field holding the text in .jsonl / dataset rows.", default="text")
    encoding: str = doc("Encoding of the local text files. A file that is not valid text in it "
                        "(a binary file, Latin-1 read as UTF-8) is refused, naming the file.",
                        default="utf-8")
    text_errors: Literal["strict", "replace"] = doc(
        "What to do with bytes that are not valid in `encoding`: strict (refuse the file) or "
        "replace (read them as U+FFFD and train on the rest).", default="strict")
    holdout: float = doc("Fraction of local contexts held out of training (for `cltrace eval`).",
                         default=0.01)
    context_length: int = doc("Tokens per context, BOS included.", default=128)
    # --- transcoder architecture ---
    kind: Literal["transcoder", "sae"] = doc(
        "What to train: a transcoder (features read the residual stream or the MLP input and "
        "write MLP outputs; --max-reach 1 a PLT, unset a CLT), or a sparse autoencoder on the "
        "residual stream before every layer's MLP, or those of --layers (input point = output "
        "point = resid_mid, one dictionary per layer: the transcoder's max_reach 1 and no skip "
        "are implied).",
        default="transcoder")
    layers: tuple[int, ...] = doc(
        "Kind sae: the model layers to train dictionaries at, increasing (e.g. --layers 3 7; "
        "the model runs only up to the last of them). Empty: every layer. A transcoder covers "
        "every layer.", default=())
    transcoder: TranscoderConfig = doc(
        "The transcoder to train (its width and depth are the model's). Its fields are given "
        "flat: flags --n-features, --max-reach, --activation, --k, --skip, --input-point, and "
        "keys of the same names in a config file.", default=TranscoderConfig(n_features=2048),
        flatten=("n_features", "max_reach", "activation", "k", "skip", "input_point"))
    threshold_init: float = doc("Initial JumpReLU threshold ('Circuit Tracing': 0.03).",
                                default=0.03)
    jumprelu_bandwidth: float = doc(
        "Width of the rectangle kernel of JumpReLU's straight-through gradient, in normalised "
        "units (Gemma Scope: 0.001; wider trains the threshold on fewer tokens faster).",
        default=0.01)
    # --- loss ---
    sparsity_coef: float = doc("Final lambda of the tanh sparsity penalty.", default=1e-3)
    sparsity_c: float = doc("c inside tanh(c * ||W_dec|| * a) ('Circuit Tracing': 4).",
                            default=4.0)
    sparsity_ramp: float = doc("Fraction of the steps over which lambda ramps linearly from 0 "
                               "('Circuit Tracing': the whole run).", default=1.0)
    decoder_norm: Literal["concat", "sum"] = doc(
        "||W_dec,i||: L2 norm of the concatenated decoders, or the sum of per-layer L2 norms.",
        default="concat")
    preact_coef: float = doc("Coefficient of the pre-activation loss on dead features "
                             "('Circuit Tracing': 3e-6).", default=3e-6)
    # --- optimisation ---
    steps: int = doc("Optimizer steps.", default=1000)
    batch_tokens: int = doc("Tokens per batch.", default=1024)
    lr: float = doc("Peak learning rate of Adam.", default=2e-4)
    warmup_steps: int = doc("Linear learning-rate warm-up steps.", default=100)
    decay: Literal["cosine", "linear", "constant"] = doc(
        "Learning-rate decay after warm-up.", default="cosine")
    final_lr_fraction: float = doc("Learning rate at the end, as a fraction of lr.", default=0.1)
    beta1: float = doc("Adam beta1.", default=0.9)
    beta2: float = doc("Adam beta2.", default=0.999)
    grad_clip: float = doc("Clip gradients to this global norm (0: off).", default=1.0)
    seed: int = doc("Seed for initialisation and data order (0 to 2^32 - 1).", default=0)
    init_from: str | None = doc(
        "Start from this transcoder's weights (a directory `cltrace train` wrote, such as a "
        "bundled one) instead of a random initialisation, with fresh optimizer state: how a "
        "run continues on another machine or in another session without its checkpoints.",
        default=None)
    sparse: Literal["auto", "on", "off"] = doc(
        "Sparse step (the decoder touches only the active features; same parameters as the "
        "dense step up to float32 rounding): on, off, or auto (on where scripts/bench_train.py "
        "measured it faster: when the support fits in a quarter of the features and the device "
        "has fast kernels: XLA on GPU/TPU, numba on a single CPU device).", default="auto")
    sparse_kernels: Literal["auto", "xla", "cpu"] = doc(
        "Kernels of the sparse step: xla (any device and mesh), cpu (numba, one CPU device), "
        "auto (cpu on a single CPU device when numba is installed, else xla).", default="auto")
    sparse_capacity: int = doc(
        "Support entries per token and layer the sparse step holds (0: k for topk/batchtopk, "
        "else sized from the measured support and resized as it changes). A batch over "
        "capacity runs densely.", default=0)
    # --- activations ---
    round_contexts: int = doc("Contexts per round of activation generation (the shuffle "
                              "buffer holds their tokens).", default=64)
    data_reuse: int = doc("Passes over each round of activations (reshuffled each pass): "
                          "optimiser steps per generated token.", default=1)
    prefetch: Literal["auto", "on", "off"] = doc(
        "Generate the next round of activations in a background thread while training on this "
        "one (auto: on for GPU/TPU; on a CPU both share the same cores).", default="auto")
    model_batch: int = doc("Contexts per forward pass of the language model.", default=8)
    outlier_factor: float = doc("Drop tokens whose input norm exceeds this multiple of the "
                                "layer's median (at least 1; inf keeps every token).",
                                default=10.0)
    norm_rounds: int = doc("Rounds used to estimate normalisation constants.", default=1)
    activation_dtype: Literal["float32", "bfloat16"] = doc(
        "dtype of stored activations (training math is float32).", default="float32")
    cache_activations: str | None = doc("Directory to cache rounds of activations and replay "
                                        "them.", default=None)
    # --- mesh ---
    mesh_data: int = doc("Devices along the mesh's 'data' axis (-1: all left).", default=-1)
    mesh_feature: int = doc("Devices along the 'feature' axis (parameters sharded).", default=1)
    # --- run directory ---
    out: str = doc("Run directory: checkpoints, metrics.jsonl, exported transcoder.",
                   default="out/train")
    checkpoint_every: int = doc("Steps between checkpoints.", default=500)
    keep_checkpoints: int = doc("Checkpoints kept (at least 1: the latest is what a run resumes "
                                "from).", default=3)
    async_checkpoints: bool = doc("Write checkpoints in the background while training goes on.",
                                  default=True)
    log_every: int = doc("Steps between metric lines.", default=10)
    export_dtype: Literal["float32", "float16", "bfloat16"] = doc(
        "dtype of the exported transcoder's weights.", default="float32")
    schema_version: int = doc("Version of this config's JSON layout.", default=1)

    def __post_init__(self):
        check_types(self)
        check_types(self.transcoder)
        check_text(self, "model", "data", "text_field", "out")
        check_text(self, "init_from", "cache_activations", optional=True)
        check_encoding(self)
        for name in ("steps", "batch_tokens", "round_contexts", "model_batch", "checkpoint_every",
                     "keep_checkpoints", "log_every", "norm_rounds", "data_reuse",
                     "mesh_feature"):
            check_range(self, name, 1, integer=True)
        check_range(self, "context_length", 2, integer=True)
        check_range(self, "warmup_steps", 0, integer=True)
        check_range(self, "seed", 0, 2**32 - 1, integer=True)
        check_range(self, "mesh_data", 1, integer=True, allow=(-1,))
        check_range(self, "sparse_capacity", 0, self.transcoder.n_features, integer=True)
        check_range(self, "schema_version", 1, 1, integer=True)
        check_range(self, "holdout", 0, 1, hi_open=True)
        check_range(self, "sparsity_ramp", 0, 1, lo_open=True)
        check_range(self, "final_lr_fraction", 0, 1)
        for name in ("beta1", "beta2"):
            check_range(self, name, 0, 1, hi_open=True)
        check_range(self, "lr", 0, 10, lo_open=True)  # Adam moves a weight by ~lr per step
        for name in ("sparsity_c", "threshold_init", "jumprelu_bandwidth"):
            check_range(self, name, 0, lo_open=True)
        for name in ("sparsity_coef", "preact_coef", "grad_clip"):
            check_range(self, name, 0)
        check_range(self, "outlier_factor", 1, allow=(math.inf,))
        self._check_kind()
        if self.round_contexts * (self.context_length - 1) < self.batch_tokens:
            raise ConfigError(
                f"TrainConfig.round_contexts x (context_length - 1) = {self.round_contexts} x "
                f"{self.context_length - 1} tokens per round is less than one batch of "
                f"batch_tokens={self.batch_tokens}; raise round_contexts")

    def _check_kind(self) -> None:
        t, c = self.transcoder, "TrainConfig"
        if self.layers:
            check_layers(f"{c}.layers", self.layers)
        if t.layers:
            raise ConfigError(f"{c}: give an SAE's layers as {c}.layers (--layers), not inside "
                              "the transcoder table")
        if self.kind == "transcoder" and self.layers:
            raise ConfigError(f"{c}.layers is for --kind sae; a transcoder covers every layer "
                              "(drop --layers)")
        if self.kind == "transcoder":
            if t.output_point != "mlp_out":
                raise ConfigError(f"{c}: transcoder.output_point={t.output_point!r} makes an SAE; "
                                  "say kind = 'sae' (--kind sae) instead")
            return
        if t.input_point != "resid_mid":
            raise ConfigError(f"{c}: kind sae reads and reconstructs the residual stream "
                              f"(input_point resid_mid), got input_point={t.input_point!r}; "
                              "drop --input-point or train a transcoder")
        if t.max_reach not in (None, 1) or t.skip:
            raise ConfigError(f"{c}: kind sae has one dictionary per layer and no skip; drop "
                              f"--max-reach {t.max_reach} / --skip (got max_reach="
                              f"{t.max_reach}, skip={t.skip})")
        self.architecture()  # the TranscoderConfig's own checks

    @classmethod
    def make(cls, **fields) -> TrainConfig:
        """A config from flat fields (`n_features=...` etc. go into `transcoder`), as a file or
        the command line gives them."""
        return from_dict(cls, fields)

    def transcoder_config(self, model_cfg) -> TranscoderConfig:
        """The dictionary this run trains on `model_cfg`'s model: `transcoder`, made an SAE by
        `kind` (the one place `kind` turns into architecture)."""
        if self.layers and self.layers[-1] >= model_cfg.n_layers:
            raise ConfigError(f"TrainConfig.layers {list(self.layers)}: model "
                              f"'{model_cfg.name}' has layers 0..{model_cfg.n_layers - 1}; "
                              "choose layers below it")
        return self.architecture().for_model(model_cfg)

    def architecture(self) -> TranscoderConfig:
        """`transcoder` with what `kind` implies (an SAE reconstructs the residual stream it
        reads, one dictionary per layer)."""
        if self.kind == "sae":
            return self.transcoder.replace(output_point=self.transcoder.input_point,
                                           max_reach=1, layers=self.layers)
        return self.transcoder


# Fields that may change between a run and its resumption (everything else must match).
RESUMABLE_CHANGES = ("steps", "out", "checkpoint_every", "keep_checkpoints", "log_every",
                     "mesh_data", "mesh_feature", "model_batch", "cache_activations",
                     "export_dtype", "async_checkpoints", "sparse", "sparse_kernels",
                     "sparse_capacity", "prefetch")


def check_resume(out: Path, train_cfg: TrainConfig, model_cfg) -> None:
    """Refuse, before any compute, a run directory made for another model or other settings."""
    from clt.transcoder import TranscoderConfig, check_model

    saved = out / "transcoder_config.json"
    if saved.exists():
        check_model(TranscoderConfig.from_json(saved.read_text()), model_cfg)
    path = out / "config.json"
    if not path.exists():
        return
    old, new = to_dict(load_config(TrainConfig, path, "train")), to_dict(train_cfg)
    diff = [f for f, v in new.items() if f not in RESUMABLE_CHANGES and old.get(f) != v]
    # The nested transcoder: name the fields that differ, as the flags do.
    diff = [g for f in diff for g in ([k for k in new[f] if old[f].get(k) != new[f][k]]
                                      if isinstance(new[f], dict) else [f])]
    if diff:
        raise ConfigError(f"{out} holds a run with different {', '.join(diff)}; resume with the "
                          "same settings, or choose another --out (or --no-resume to restart)")


__all__ = ["RESUMABLE_CHANGES", "TrainConfig", "check_encoding", "check_range", "check_resume",
           "check_text", "check_types"]
