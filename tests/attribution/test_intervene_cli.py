"""`cltrace steer`, `cltrace direction` and `cltrace lens` end to end on a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clt.transcoder import save
from cltrace.cli import main
from tests.attribution.helpers import random_transcoder
from tests.clt.hf_tiny import make_tiny
from tests.clt.tiny_train import tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_gemma2")
    make_tiny("gemma2", d)
    tiny_tokenizer().backend.save(str(d / "tokenizer.json"))
    from clt.lm import load_model

    m = load_model(str(d))
    cfg, params = random_transcoder(m.cfg, 16)
    save(d / "tc", cfg, params)
    return d


def test_steer_with_feature_edits_and_vector(tiny, tmp_path, capsys):
    out = tmp_path / "steer.json"
    assert main(["steer", "w1 w2 w3 w4", "--model", str(tiny), "--transcoder", str(tiny / "tc"),
                 "--set", "1:3@2+=30", "--zero", "0:1@all", "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "free" and len(res["edits"]) == 2
    assert "original" in res and "intervened" in res
    text = capsys.readouterr().out
    assert "next token" in text and "continuations" in text
    assert main(["steer", "w1 w2 w3 w4", "--model", str(tiny), "--transcoder", str(tiny / "tc"),
                 "--zero", "1:3@2", "--mode", "frozen"]) == 0
    np.save(tmp_path / "v.npy", np.ones(64, np.float32))
    assert main(["steer", "w1 w2", "--model", str(tiny), "--vector", str(tmp_path / "v.npy"),
                 "--layer", "1", "--alpha", "3", "--max-new-tokens", "2"]) == 0


def test_direction_and_lens(tiny, tmp_path, capsys):
    (tmp_path / "pos.txt").write_text("w1 w2\nw3 w4 w5\n")
    (tmp_path / "neg.txt").write_text("w9 w8\n")
    assert main(["direction", "--model", str(tiny), "--positive", str(tmp_path / "pos.txt"),
                 "--negative", str(tmp_path / "neg.txt"), "--layer", "1", "-o",
                 str(tmp_path / "v.npy")]) == 0
    assert np.load(tmp_path / "v.npy").shape == (64,)
    assert main(["lens", "w1 w2 w3", "--model", str(tiny), "--html",
                 str(tmp_path / "lens.html")]) == 0
    assert "<table>" in (tmp_path / "lens.html").read_text()
    assert "logit lens" in capsys.readouterr().out


def test_bad_interventions_are_one_line_errors(tiny, capsys):
    base = ["steer", "w1 w2 w3", "--model", str(tiny), "--transcoder", str(tiny / "tc")]
    for extra, msg in ((["--set", "1:99@1=2"], "feature 99 does not exist"),
                       (["--set", "7:1@1=2"], "layer 7 out of range"),
                       (["--set", "1:1@9=2"], "position 9 out of range"),
                       (["--set", "one:two"], "cannot parse"),
                       ([], "nothing to do")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
