"""Bad inputs to `cltrace lens`: one error line, exit 2, nothing written (harness:
`tests/bad_inputs/harness.py`). CHEAP cases name a model that does not exist, so they pass only if
refused before any model loads; MODEL cases need the tiny model's vocabulary or tokenizer."""

from __future__ import annotations

import pytest

from tests.bad_inputs.harness import Case, run_case


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tests.clt.hf_tiny import make_tiny
    from tests.clt.tiny_train import tiny_tokenizer

    d = tmp_path_factory.mktemp("bad_lens")
    make_tiny("gemma2", d / "tiny")
    tiny_tokenizer().backend.save(str(d / "tiny" / "tokenizer.json"))
    make_tiny("gemma2", d / "no_tokenizer")
    return {"tiny": d / "tiny", "notok": d / "no_tokenizer", "nomodel": d / "no_such_model"}


def lens(*args: str) -> tuple[str, ...]:
    return ("lens", "w1 w2 w3", "--model", "{nomodel}", *args)


CHEAP = [
    Case(lens("--every", "-1"), "LensConfig.every must be >= 1"),
    Case(lens("--every", "0"), "LensConfig.every must be >= 1"),
    Case(lens("--every", "two"), "LensConfig.every must be an integer"),
    Case(lens("--every", "1.5"), "LensConfig.every must be an integer"),
    Case(lens("--k", "0"), "LensConfig.k must be >= 1"),
    Case(lens("--k", "-2"), "LensConfig.k must be >= 1"),
    Case(lens("--k", "nan"), "LensConfig.k must be an integer"),
    Case(("lens", "", "--model", "{nomodel}"), "LensConfig.prompt must be a non-empty string"),
    Case(lens("--model", ""), "LensConfig.model must be a non-empty string"),
    Case(lens("--html", ""), "LensConfig.html must be a non-empty string"),
    Case(lens("--html", "{dir}"), "is a directory"),
    Case(lens("--html", "{file}/lens.html"), "is not a directory"),
    Case(lens("--html", "{file}/sub/lens.html"), "Not a directory"),
    Case(lens(), "unknown model"),
]

MODEL = [
    Case(("lens", "w1 w2", "--model", "{tiny}", "--k", "129"), "LensConfig.k must be in 1..128"),
    Case(("lens", "   ", "--model", "{tiny}"), "the prompt is empty"),
    Case(("lens", "w1 w2", "--model", "{notok}"), "has no tokenizer"),
    Case(("lens", " ".join(["w1"] * 80), "--model", "{tiny}", "--html", "{tmp}/lens.html"),
         "shorten it"),
]


@pytest.mark.parametrize("case", CHEAP, ids=str)
def test_refused_before_the_model_loads(case, files, tmp_path, capsys):
    run_case(case, tmp_path, capsys, **files)


@pytest.mark.parametrize("case", MODEL, ids=str)
def test_refused_after_tokenising(case, files, tmp_path, capsys):
    run_case(case, tmp_path, capsys, **files)
