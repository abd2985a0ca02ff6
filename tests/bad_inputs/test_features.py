"""Bad inputs to `cltrace features`: one error line, exit 2, nothing written (harness:
`tests/bad_inputs/harness.py`). CHEAP cases name a transcoder and a model that do not exist, so
they pass only if refused before either loads (the corpus scan never starts); MODEL cases use a
tiny random model, transcoder and corpus."""

from __future__ import annotations

import pytest

from tests.bad_inputs.harness import Case, run_case


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from clt.lm import load_model
    from clt.transcoder import save
    from tests.attribution.helpers import random_transcoder
    from tests.clt.hf_tiny import make_tiny
    from tests.clt.tiny_train import tiny_tokenizer, write_corpus

    d = tmp_path_factory.mktemp("bad_features")
    make_tiny("gemma2", d / "tiny")
    tiny_tokenizer().backend.save(str(d / "tiny" / "tokenizer.json"))
    m = load_model(str(d / "tiny"))
    cfg, params = random_transcoder(m.cfg, 16)
    save(d / "tc", cfg.replace(model_name=str(d / "tiny")), params)
    corpus = write_corpus(d / "corpus.txt", n_docs=20)
    return {"tiny": d / "tiny", "tc": d / "tc", "corpus": corpus,
            "nomodel": d / "no_such_model", "notc": d / "no_such_transcoder"}


def feats(*args: str) -> tuple[str, ...]:
    return ("features", "--transcoder", "{notc}", "--model", "{nomodel}", "--data", "{corpus}",
            "--out", "{tmp}/cards.npz", "--no-progress", *args)


C = "FeaturesConfig."
CHEAP = [
    # The reported hang: a context of the BOS alone holds no text; packing never ended.
    Case(feats("--context-length", "1", "--window", "1"), C + "context_length must be >= 2"),
    Case(feats("--context-length", "0"), C + "context_length must be >= 2"),
    Case(feats("--context-length", "-5"), C + "context_length must be >= 2"),
    Case(feats("--context-length", "long"), C + "context_length must be an integer"),
    Case(feats("--window", "0"), C + "window must be >= 1"),
    Case(feats("--window", "65"), C + "window must be in 1..context_length (64)"),
    Case(feats("--n-contexts", "0"), C + "n_contexts must be >= 1"),
    Case(feats("--n-contexts", "-1"), C + "n_contexts must be >= 1"),
    Case(feats("--n-contexts", "1e3"), C + "n_contexts must be an integer"),
    Case(feats("--batch-size", "0"), C + "batch_size must be >= 1"),
    Case(feats("--top-k", "0"), C + "top_k must be >= 1"),
    Case(feats("--top-k", "513"), C + "top_k must be in 1..batch_size x context_length (512)"),
    Case(feats("--n-samples", "0"), C + "n_samples must be >= 1"),
    Case(feats("--n-samples", "10000"), C + "n_samples must be in 1..batch_size"),
    Case(feats("--n-output-tokens", "0"), C + "n_output_tokens must be >= 1"),
    Case(feats("--explain-max", "-1"), C + "explain_max must be >= 0"),
    Case(feats("--explain-layer", "-1"), C + "explain_layer must be >= 0"),
    Case(feats("--explain-tokens", "0"), C + "explain_tokens must be >= 1"),
    Case(feats("--explain-scale", "0"), C + "explain_scale must be a finite number > 0"),
    Case(feats("--explain-scale", "nan"), C + "explain_scale must be a finite number > 0"),
    Case(feats("--explain-scale", "inf"), C + "explain_scale must be a finite number > 0"),
    Case(feats("--explain-scale=-1"), C + "explain_scale must be a finite number > 0"),
    Case(feats("--explain-scale", "big"), C + "explain_scale must be a number"),
    Case(feats("--seed=-1"), C + "seed must be >= 0"),
    Case(feats("--seed", "4294967296"), C + "seed must be in 0..4294967295"),
    Case(feats("--explain-graph", "{file}"), C + "explain_graph needs --explain"),
    Case(feats("--text-field", ""), C + "text_field must be a non-empty string"),
    Case(feats("--data", ""), C + "data must be a non-empty string"),
    Case(feats("--explain-placeholder", ""), C + "explain_placeholder must be a non-empty"),
    Case(feats("--explain-prompt", " "), C + "explain_prompt must be a non-empty"),
    Case(("features", "--transcoder", "", "--out", "{tmp}/c.npz"),
         C + "transcoder must be a non-empty string"),
    Case(("features", "--out", "{tmp}/c.npz"), "the following arguments are required"),
    Case(feats("--explain", "--explain-graph", "{tmp}/missing.npz"), "no such graph file"),
    Case(feats("--data", "{tmp}/missing.txt"), "no text found"),
    Case(feats("--data", "{tmp}/*.jsonl"), "no text found"),
    Case(feats("--out", "{dir}"), "is a directory"),
    Case(feats("--out", "{file}/cards.npz"), "is not a directory"),
    Case(feats(), "no transcoder at"),  # the transcoder loads before the model
    Case(("features", "--transcoder", "org/name", "--model", "{nomodel}", "--data", "{corpus}"),
         "is not a local directory: give --out"),
]

MODEL = [
    Case(("features", "--transcoder", "{tc}", "--data", "{corpus}", "--out", "{tmp}/c.npz",
          "--explain", "--explain-layer", "3", "--n-contexts", "4", "--context-length", "16",
          "--window", "8", "--no-progress"), "--explain-layer 3: the model has 3 layers"),
    Case(("features", "--transcoder", "{tc}", "--model", "{nomodel}", "--data", "{corpus}",
          "--out", "{tmp}/c.npz", "--no-progress"), "unknown model"),
]


@pytest.mark.parametrize("case", CHEAP, ids=str)
def test_refused_before_anything_loads(case, files, tmp_path, capsys):
    run_case(case, tmp_path, capsys, **files)


@pytest.mark.parametrize("case", MODEL, ids=str)
def test_refused_before_the_scan(case, files, tmp_path, capsys):
    run_case(case, tmp_path, capsys, **files)


def test_same_refusal_from_the_python_api():
    """The config refuses the reported hang whatever builds it (CLI, file, Python)."""
    from clt.configs import ConfigError, from_dict
    from viewer.features import FeaturesConfig

    for build in (lambda: FeaturesConfig(transcoder="t", context_length=1, window=1),
                  lambda: from_dict(FeaturesConfig, {"transcoder": "t", "context_length": 1,
                                                     "window": 1})):
        with pytest.raises(ConfigError, match="FeaturesConfig.context_length must be >= 2"):
            build()
