"""Commands of stage 1: `cltrace models`, `generate`, `train`, `eval`, `export`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from clt.configs import ConfigError, add_arguments, from_arguments, to_dict


def register(sub) -> None:
    p = sub.add_parser("models", help="List the models available without a download.")
    p.set_defaults(run=_models)

    from clt.lm.generate import GenerateConfig

    p = sub.add_parser("generate", help="Continue a prompt with a model (greedy or sampled).",
                       description="Continue PROMPT with the model, using a KV cache.")
    p.add_argument("prompt", help=GenerateConfig.__dataclass_fields__["prompt"].metadata["help"])
    add_arguments(p, GenerateConfig, skip=("prompt",))
    p.add_argument("--out", default=None, help="Also write the result as JSON to this file.")
    p.set_defaults(run=_generate)
    register_training(sub)


def _models(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from clt.lm.loading import list_models

    table = Table(title="Models available locally")
    for col in ("name", "status", "description"):
        table.add_column(col)
    for row in list_models():
        table.add_row(row["name"], row["status"], row["description"])
    Console().print(table)
    print("Also accepted: a .gguf file, a Hugging Face model directory, or a hub id (org/name).")
    return 0


def _generate(args) -> int:
    from rich.console import Console

    from clt.lm.generate import GenerateConfig, generate
    from clt.lm.loading import load_model

    gc = from_arguments(GenerateConfig, args)
    if args.out:  # before the model loads
        from clt.io import check_output_file

        check_output_file(args.out, "--out")
    console = Console()
    with console.status(f"loading {gc.model}"):
        model = load_model(gc.model)
    with console.status("generating"):
        result = generate(model, gc)
    console.print("[bold]next-token top-k:[/bold] " + ", ".join(
        f"{t!r} {p:.3f}" for t, p in result.first_top))
    console.print(f"[bold]{gc.prompt}[/bold]", end="")
    print(result.text)
    if args.out:
        from clt.io import atomic_write

        atomic_write(args.out, json.dumps({
            "model": gc.model, "config": to_dict(gc),
            "prompt_ids": result.prompt_ids, "new_ids": result.new_ids,
            "completion": result.text, "first_top": result.first_top}, indent=2))
        print(f"wrote {args.out}")
    return 0



# --- cltrace train / cltrace eval ------------------------------------------------------------------
def register_training(sub) -> None:
    from clt.train_config import TrainConfig  # (not clt.train: optax, ~0.15 s to import)

    p = sub.add_parser(
        "train", help="Train a cross-layer (or per-layer) transcoder, or a residual-stream SAE "
        "(--kind sae), on a model's activations.",
        description="Train a transcoder (or with --kind sae a sparse autoencoder on the residual "
        "stream before every layer's MLP). Settings come from --config (TOML or YAML with the "
        "fields below), then from flags, which override the file. Every field is documented "
        "below. Re-running the same command resumes from the run directory's last checkpoint.")
    p.add_argument("--config", default=None, help="TOML or YAML file of TrainConfig fields.")
    add_arguments(p, TrainConfig)
    p.add_argument("--no-resume", dest="no_resume", action="store_true",
                   help="Start over: an earlier run in --out is first moved aside to "
                   "<out>.replaced-<time> (named when it happens), never mixed with this one.")
    from clt import distributed

    distributed.add_arguments(p, "train over every process's devices (each generates its "
                              "share of the activations)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true",
                   help="No progress bar (logs still go to metrics.jsonl).")
    p.set_defaults(run=_train)

    from clt.circuit_tracer_io import ExportConfig
    from clt.evaluate import EvalConfig

    p = sub.add_parser("eval", help="Evaluate a transcoder: NMSE, L0, dead/dense features, "
                       "spliced-model KL, top-1 agreement and delta CE on held-out text.")
    add_arguments(p, EvalConfig)
    p.set_defaults(run=_eval)

    p = sub.add_parser("export", help="Write a transcoder in the circuit-tracer layout.",
                       description="Convert a transcoder (ours, or any layout load_transcoder "
                       "reads) to circuit-tracer's safetensors layout: layer_i.safetensors for "
                       "a PLT, W_enc_i/W_dec_i.safetensors for a CLT, plus config.yaml.")
    add_arguments(p, ExportConfig)
    p.set_defaults(run=_export)


def read_config_file(path: str) -> dict:
    """Fields from a TOML (.toml) or YAML (.yaml/.yml) file, with a clear error if unreadable."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(p.read_text())
        else:
            import yaml

            data = yaml.safe_load(p.read_text()) or {}
    except Exception as e:  # tomllib / yaml syntax errors
        raise ValueError(f"cannot parse {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p} must hold a table/mapping of TrainConfig fields")
    data = data.get("train", data)
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: [train] must be a table of TrainConfig fields")
    return data


def _train(args) -> int:
    import jax

    from clt import distributed
    from clt.configs import flat_names, from_dict
    from clt.train import NonFiniteError, TrainConfig, train

    distributed.check_arguments(args)
    data = read_config_file(args.config) if args.config else {}
    names = flat_names(TrainConfig)  # fields, and the transcoder's given flat
    data.update({k: v for k, v in vars(args).items() if k in names})
    train_cfg = from_dict(TrainConfig, data)  # every field checked: nothing has started yet
    distributed.initialize(args)  # before any JAX computation
    try:
        path = train(train_cfg, resume=not args.no_resume, progress=not args.no_progress)
    except NonFiniteError as e:  # the last good state is saved; the message says where
        print(f"cltrace train: error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(f"transcoder written to {path}  "
              f"(metrics: {Path(train_cfg.out) / 'metrics.jsonl'})")
    return 0


def _eval(args) -> int:
    import numpy as np
    from rich.console import Console

    from clt.circuit_tracer_io import load_transcoder
    from clt.data import check_text_source, open_contexts
    from clt.evaluate import EvalConfig, evaluate, training_overlap
    from clt.io import atomic_write, check_output_file
    from clt.lm.loading import load_model

    ec = from_arguments(EvalConfig, args)  # every field checked
    # Inputs and the output path before the model loads.
    check_text_source(ec.data, ec.text_field, ec.encoding, ec.text_errors)
    if ec.out and Path(ec.out).is_dir():
        raise ConfigError(f"--out {ec.out} is a directory; give a file path")
    tc_cfg, tc_params = load_transcoder(ec.transcoder)
    if ec.splice_layers:  # out of range, or a CLT: refused before the model loads
        from clt.splice import SplicedTranscoder

        SplicedTranscoder(tc_cfg, layers=tuple(ec.splice_layers))
    model_name = ec.model or tc_cfg.model_name
    if not model_name:
        raise ValueError("the transcoder does not name its model; pass --model")
    if ec.out:
        check_output_file(ec.out, "--out")
    console = Console()
    with console.status(f"loading {model_name}"):
        model = load_model(model_name)
    if ec.context_length > model.cfg.max_position:
        raise ConfigError(f"EvalConfig.context_length {ec.context_length} exceeds the model's "
                          f"context of {model.cfg.max_position} tokens")
    if (warn := training_overlap(ec)) is not None:
        print(f"cltrace: note: {warn}", file=sys.stderr)
    split = "train" if ec.split == "all" else ec.split
    holdout = 0.0 if ec.split == "all" else ec.holdout
    source = open_contexts(ec.data, model.tokenizer, ec.context_length, holdout=holdout,
                           split=split, text_field=ec.text_field, encoding=ec.encoding,
                           text_errors=ec.text_errors)
    n = min(ec.contexts, len(source)) if hasattr(source, "__len__") else ec.contexts
    if n < ec.contexts:
        print(f"cltrace: note: only {n} {ec.split} contexts of {ec.context_length} tokens in "
              f"{ec.data}; evaluating those, not {ec.contexts}", file=sys.stderr)
    contexts = source.contexts[:n] if hasattr(source, "contexts") else source.take(0, n)
    result = evaluate(model, tc_cfg, tc_params, np.asarray(contexts), batch_size=ec.batch_size,
                      splice_layers=ec.splice_layers)
    console.print(result.table())
    if ec.out:
        atomic_write(ec.out, json.dumps({"transcoder": ec.transcoder, "model": model_name,
                                         "data": ec.data, "split": ec.split,
                                         "config": to_dict(ec), **result.to_dict()}, indent=2))
        print(f"wrote {ec.out}")
    return 0


def _export(args) -> int:
    from clt.circuit_tracer_io import ExportConfig, export_circuit_tracer, load_transcoder

    xc = from_arguments(ExportConfig, args)
    cfg, params = load_transcoder(xc.transcoder)
    path = export_circuit_tracer(xc.out, cfg, params, model_name=xc.model_name,
                                 dtype=None if xc.dtype == "float32" else xc.dtype,
                                 overwrite=xc.overwrite)
    print(f"wrote {cfg.kind.upper()} ({cfg.n_layers} layers x {cfg.n_features} features) in the "
          f"circuit-tracer layout to {path}")
    return 0
