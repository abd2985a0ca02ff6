"""`cltrace eval` refuses bad input in one line, writes nothing, and loads no model first.

EvalConfig checks every field in `__post_init__` (a context length of 1 once packed contexts
forever); the text and the output path are checked before the model loads. AFTER_MODEL holds the
case that needs the model's own limit (its context length), on a tiny model directory.
"""

from __future__ import annotations

import pytest

from tests.bad_inputs.harness import Case, run_case

BASE = ("eval", "--transcoder", "{transcoder}", "--model", "{model}", "--data", "{corpus}",
        "--holdout", "0.1", "--context-length", "16", "--contexts", "4")


def _c(*args: str, message: str) -> Case:
    return Case((*BASE, *args), message, id=" ".join(args)[:60])


def _range(flag: str, values: tuple[str, ...], what: str):
    return [_c(f"--{flag}={v}", message=f"EvalConfig.{flag.replace('-', '_')} must be {what}")
            for v in values]


PRE_MODEL = [
    *_range("contexts", ("-4", "0", "2.5", "x"), "an integer"),
    *_range("batch-size", ("0", "-8", "x", "1e2"), "an integer"),
    *_range("context-length", ("0", "1", "-5"), "an integer >= 2"),
    _c("--context-length=16.0", message="EvalConfig.context_length must be an integer"),
    *_range("holdout", ("1.5", "1", "-1", "nan", "inf"), "a finite number in [0, 1)"),
    _c("--holdout", "abc", message="EvalConfig.holdout must be a number"),
    _c("--holdout", "0", message="EvalConfig.split heldout needs holdout > 0"),
    *[_c(f"--{flag}", v, message="invalid choice")
      for flag, v in (("split", "test"), ("text-errors", "ignore"))],
    _c("--encoding", "klingon", message="EvalConfig.encoding must be a text encoding"),
    *[_c(f"--{flag}=", message=f"EvalConfig.{flag.replace('-', '_')} must not be empty")
      for flag in ("transcoder", "model", "data", "text-field", "out")],
    _c("--data", "{tmp}/missing.txt", message="no text found at"),
    _c("--data", "{empty}", message="holds no text"),
    _c("--data", "{emptydir}", message="no .txt or .jsonl files"),
    _c("--data", "{binary}", message="binary.bin is not utf-8 text"),
    _c("--data", "{binary}", "--text-errors", "replace", message="binary.bin looks binary"),
    _c("--data", "{latin1}", message="latin1.txt is not utf-8 text"),
    _c("--data", "{utf16le}", message="utf16le.txt looks binary"),
    _c("--data", "{badjsonl}", message="bad.jsonl:2: not a JSON object with a 'text' field"),
    _c("--data", "{jsonl}", "--text-field", "body", message="not a JSON object with a 'body'"),
    _c("--out", "{dir}", message="is a directory"),
    _c("--out", "{file}/m.json", message="the folder of"),
    _c("--transcoder", "{tmp}/none", message="no transcoder at"),
    _c("--transcoder", "{file}", message="is a file"),
    _c("--transcoder", "{dir}", message="holds no transcoder"),
    _c("--no-such-flag", message="unrecognized arguments"),
    # An SAE on layers 0 and 2 splices only layers it covers.
    Case(("eval", "--transcoder", "{sae}", "--model", "{model}", "--data", "{corpus}",
          "--splice-layers", "1"), "spliced layers [1] are not covered: this SAE has "
         "dictionaries at model layers 0, 2 only"),
]

AFTER_MODEL = [
    _c("--context-length", "80",
       message="EvalConfig.context_length 80 exceeds the model's context of 64 tokens"),
    _c("--model", "{tmp}/no-model", message="unknown model"),
]


@pytest.fixture(scope="module")
def transcoder(tmp_path_factory):
    import jax

    from clt.transcoder import TranscoderConfig, init_params, save

    cfg = TranscoderConfig(d_model=64, n_layers=3, n_features=16, model_name="tiny")
    d = tmp_path_factory.mktemp("tc") / "transcoder"
    save(d, cfg, init_params(cfg, jax.random.key(0)))
    return d


@pytest.fixture(scope="module")
def sae(tmp_path_factory):
    """An SAE on model layers 0 and 2."""
    import jax

    from clt.transcoder import TranscoderConfig, init_params, save

    cfg = TranscoderConfig(d_model=64, n_layers=2, n_features=16, model_name="tiny", max_reach=1,
                           output_point="resid_mid", layers=(0, 2))
    d = tmp_path_factory.mktemp("sae") / "sae"
    save(d, cfg, init_params(cfg, jax.random.key(0)))
    return d


@pytest.mark.parametrize("case", PRE_MODEL, ids=str)
def test_eval_refuses_before_loading_the_model(
        case, tmp_path, capsys, inputs, transcoder, sae, caches, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the input was refused")

    monkeypatch.setattr("clt.lm.loading.load_model", no_model)
    run_case(case, tmp_path, capsys, model="tiny-model-never-loaded", transcoder=transcoder,
             sae=sae, **inputs)


@pytest.mark.parametrize("case", AFTER_MODEL, ids=str)
def test_eval_refuses_what_the_model_rules_out(
        case, tmp_path, capsys, inputs, transcoder, model_dir, caches):
    run_case(case, tmp_path, capsys, model=model_dir, transcoder=transcoder, **inputs)


def test_eval_notes_fewer_contexts_and_training_overlap(
        tmp_path, capsys, inputs, model_dir, caches):
    """Asked for more held-out contexts than there are, eval says how many it used; a
    transcoder trained with another holdout is flagged (its held-out text may be training
    data). The metrics file is written whole."""
    import json

    from cltrace.cli import main

    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(inputs["corpus"]), "--out",
                 str(run), "--no-progress", "--context-length", "16", "--n-features", "16",
                 "--batch-tokens", "64", "--round-contexts", "8", "--steps", "2",
                 "--mesh-data", "1", "--holdout", "0.2"]) == 0
    capsys.readouterr()
    out = tmp_path / "m" / "eval.json"
    assert main(["eval", "--transcoder", str(run / "transcoder"), "--model", str(model_dir),
                 "--data", str(inputs["corpus"]), "--holdout", "0.1", "--context-length", "16",
                 "--contexts", "1000", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "trained with holdout=0.2" in err and "may include its training data" in err
    assert "evaluating those, not 1000" in err
    assert json.loads(out.read_text())["n_tokens"] > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json"]
