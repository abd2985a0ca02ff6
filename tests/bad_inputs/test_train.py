"""`cltrace train` refuses bad input in one line, writes nothing, and loads no model first.

Every TrainConfig field (and the transcoder's, given flat) is checked in `__post_init__`, so a bad
value, from a flag or a config file, is refused before anything starts; the text is checked
(present, not empty, text in its encoding) and output paths too, before the model loads. The
cases in PRE_MODEL run with `load_model` replaced by a failure; the few in AFTER_MODEL need the
model's own limits (its context length) and run on a tiny model directory.
"""

from __future__ import annotations

import pytest

from tests.bad_inputs.harness import Case, run_case

BASE = ("train", "--model", "{model}", "--data", "{corpus}", "--out", "{tmp}/run",
        "--no-progress", "--context-length", "16", "--n-features", "32", "--batch-tokens", "64",
        "--round-contexts", "8", "--steps", "2", "--mesh-data", "1")


def _c(*args: str, message: str, id: str = "") -> Case:
    return Case((*BASE, *args), message, id=id or " ".join(args)[:60])


def _range(flag: str, values: tuple[str, ...], what: str, owner: str = "TrainConfig"):
    field = flag.replace("-", "_")
    return [_c(f"--{flag}={v}", message=f"{owner}.{field} must be {what}") for v in values]


NUMBER = "a finite number"
INT = "an integer"
PRE_MODEL = [
    # --- numbers: ranges, NaN, inf, wrong types ---
    *_range("lr", ("nan", "inf", "-inf", "0", "-1e-3", "100"), f"{NUMBER} in (0, 10]"),
    *_range("final-lr-fraction", ("-1", "1.5", "nan"), f"{NUMBER} in [0, 1]"),
    *_range("beta1", ("2", "1", "-0.1", "nan"), f"{NUMBER} in [0, 1)"),
    *_range("beta2", ("1", "-1", "inf"), f"{NUMBER} in [0, 1)"),
    *_range("sparsity-c", ("-4", "0", "nan"), f"{NUMBER} > 0"),
    *_range("sparsity-coef", ("-1", "inf", "nan"), f"{NUMBER} >= 0"),
    *_range("preact-coef", ("-1e-6", "nan"), f"{NUMBER} >= 0"),
    *_range("jumprelu-bandwidth", ("0", "-0.01", "nan", "inf"), f"{NUMBER} > 0"),
    *_range("threshold-init", ("0", "-0.03", "-inf"), f"{NUMBER} > 0"),
    *_range("grad-clip", ("-1", "nan", "inf"), f"{NUMBER} >= 0"),
    *_range("sparsity-ramp", ("0", "2", "nan"), f"{NUMBER} in (0, 1]"),
    *_range("holdout", ("1.5", "1", "-0.1", "nan"), f"{NUMBER} in [0, 1)"),
    *_range("outlier-factor", ("nan", "0.5", "-1"), f"{NUMBER} >= 1 (or inf)"),
    *_range("warmup-steps", ("-5",), f"{INT} >= 0"),
    *[r for flag in ("steps", "batch-tokens", "round-contexts", "model-batch", "checkpoint-every",
                     "keep-checkpoints", "log-every", "norm-rounds", "data-reuse", "mesh-feature")
      for r in _range(flag, ("0", "-3"), f"{INT} >= 1")],
    *_range("context-length", ("1", "0", "-16"), f"{INT} >= 2"),
    *_range("seed", ("-1", str(2**32)), f"{INT} in [0, 4294967295]"),
    *_range("mesh-data", ("0", "-2"), f"{INT} >= 1 (or -1)"),
    *_range("sparse-capacity", ("-1", "33"), f"{INT} in [0, 32]"),
    *[_c(f"--{flag}", v, message=f"TrainConfig.{flag.replace('-', '_')} must be {what}")
      for flag, v, what in (("lr", "abc", "a number"), ("steps", "1e3", INT),
                            ("steps", "2.5", INT), ("warmup-steps", "x", INT),
                            ("seed", "0x10", INT), ("beta1", "", "a number"))],
    # --- the transcoder's fields, given flat ---
    _c("--n-features", "0", message="TranscoderConfig.n_features must be positive"),
    _c("--k", "0", message="TranscoderConfig.k must be positive"),
    _c("--max-reach", "0", message="TranscoderConfig.max_reach must be positive"),
    _c("--activation", "topk", "--k", "64", message="k=64 exceeds n_features=32"),
    _c("--n-features", "many", message="n_features must be an integer"),
    # --- an SAE reads and reconstructs the residual stream, one dictionary per layer ---
    _c("--kind", "sae", "--input-point", "mlp_in",
       message="kind sae reads and reconstructs the residual stream"),
    _c("--kind", "sae", "--max-reach", "2", message="kind sae has one dictionary per layer"),
    _c("--kind", "sae", "--skip", message="kind sae has one dictionary per layer and no skip"),
    # --- --layers: an SAE's, model layers each once in increasing order ---
    _c("--layers", "1", message="TrainConfig.layers is for --kind sae; a transcoder covers every "
       "layer (drop --layers)"),
    *[_c("--kind", "sae", "--layers", *v, message="TrainConfig.layers must be model layer indices "
         ">= 0, each once, in increasing order") for v in (("2", "1"), ("1", "1"), ("-1",))],
    _c("--kind", "sae", "--layers", "1,2", message="TrainConfig.layers must be an integer"),
    # --- choices (argparse refuses them) ---
    *[_c(f"--{flag}", v, message="invalid choice")
      for flag, v in (("activation", "gelu"), ("sparse", "maybe"), ("decay", "step"),
                      ("text-errors", "ignore"), ("export-dtype", "int8"),
                      ("input-point", "mlp_out"), ("decoder-norm", "max"),
                      ("kind", "autoencoder"))],
    _c("--no-such-flag", message="unrecognized arguments"),
    # --- cross-field, text fields, encodings ---
    _c("--batch-tokens", "1000", message="raise round_contexts"),
    _c("--encoding", "klingon", message="TrainConfig.encoding must be a text encoding"),
    *[_c(f"--{flag}", "", message=f"TrainConfig.{flag.replace('-', '_')} must not be empty")
      for flag in ("model", "data", "text-field", "out", "cache-activations", "init-from")],
    # --- the text ---
    _c("--data", "{tmp}/missing.txt", message="no text found at"),
    _c("--data", "{tmp}/missing/*.txt", message="no text found at"),
    _c("--data", "{empty}", message="holds no text: its files are empty"),
    _c("--data", "{emptydir}", message="no .txt or .jsonl files"),
    _c("--data", "{binary}", message="binary.bin is not utf-8 text (byte 0x89 at offset 0)"),
    _c("--data", "{binary}", "--text-errors", "replace", message="binary.bin looks binary"),
    _c("--data", "{latin1}", message="latin1.txt is not utf-8 text"),
    _c("--data", "{latin1}", "--encoding", "ascii", message="latin1.txt is not ascii text"),
    _c("--data", "{utf16}", message="utf16.txt is not utf-8 text (byte 0xff at offset 0)"),
    _c("--data", "{utf16le}",
       message="utf16le.txt looks binary, not text (a NUL character at offset 1"),
    _c("--data", "{corpus},{binary}", message="binary.bin is not utf-8 text"),
    _c("--data", "{badjsonl}", message="bad.jsonl:2: not a JSON object with a 'text' field"),
    _c("--data", "{jsonl}", "--text-field", "body", message="not a JSON object with a 'body'"),
    # --- files the run reads and writes ---
    _c("--out", "{file}", message="exists and is not a directory"),
    _c("--out", "{file}/run", message="Not a directory"),
    _c("--out", "/proc/cltrace-no/run", message="cannot create"),
    _c("--cache-activations", "{file}", message="exists and is not a directory"),
    _c("--init-from", "{tmp}/nothing", message="is not a cltrace transcoder"),
    _c("--init-from", "{dir}", message="is not a cltrace transcoder"),
    # --- config files ---
    Case(("train", "--config", "{tmp}/missing.toml"), "does not exist"),
    Case(("train", "--config", "{cfg_syntax}"), "cannot parse"),
    Case(("train", "--config", "{cfg_nan}"),
         "TrainConfig.lr must be a finite number in (0, 10], got nan"),
    Case(("train", "--config", "{cfg_beta}"),
         "TrainConfig.beta1 must be a finite number in [0, 1)"),
    Case(("train", "--config", "{cfg_type}"), "TrainConfig.steps must be an integer, got 'ten'"),
    Case(("train", "--config", "{cfg_table}"), "[train] must be a table"),
    Case(("train", "--config", "{cfg_unknown}"), "unknown TrainConfig field(s) ['lr_max']"),
    Case(("train", "--config", "{cfg_keep}"),
         "TrainConfig.keep_checkpoints must be an integer >= 1"),
    Case(("train", "--config", "{binary}"), "cannot parse"),
    # --- jax.distributed flags ---
    _c("--num-processes", "0", message="--num-processes must be at least 1"),
    _c("--distributed", "--num-processes", "2", "--process-id", "2",
       message="--process-id must be in [0, num_processes)"),
    _c("--coordinator", "nohost", message="--coordinator must be host:port"),
    _c("--num-processes", "2", message="need --distributed"),
]

AFTER_MODEL = [  # refused once the model is known (the lock and run directory are removed)
    _c("--context-length", "80",
       message="TrainConfig.context_length 80 exceeds the model's context of 64 tokens"),
    _c("--model", "{tmp}/no-model", message="unknown model"),
    _c("--kind", "sae", "--layers", "0", "3",
       message="has layers 0..2; choose layers below it"),
]


@pytest.mark.parametrize("case", PRE_MODEL, ids=str)
def test_train_refuses_before_loading_the_model(case, tmp_path, capsys, inputs, caches,
                                                monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr("clt.lm.loading.load_model", no_model)
    run_case(case, tmp_path, capsys, model="tiny-model-never-loaded", **inputs)


@pytest.mark.parametrize("case", AFTER_MODEL, ids=str)
def test_train_refuses_what_the_model_rules_out(case, tmp_path, capsys, inputs, model_dir,
                                                caches):
    run_case(case, tmp_path, capsys, model=model_dir, **inputs)


def test_the_same_value_is_refused_the_same_way_everywhere(tmp_path, capsys, inputs):
    """A flag, a config file and the Python API give the same message."""
    from clt.configs import ConfigError
    from clt.train import TrainConfig
    from cltrace.cli import main

    with pytest.raises(ConfigError) as api:
        TrainConfig(lr=float("nan"))
    assert main(["train", "--lr", "nan", "--out", str(tmp_path / "r")]) == 2
    flag = capsys.readouterr().err
    assert main(["train", "--config", str(inputs["cfg_nan"])]) == 2
    file = capsys.readouterr().err
    assert str(api.value) in flag and str(api.value) in file
    assert not (tmp_path / "r").exists()
