"""Bad inputs to `cltrace steer` and `cltrace direction`: each is one error line, exit 2, nothing
written (harness: `tests/bad_inputs/harness.py`).

Cases under CHEAP run with `--model {nomodel}`, a model that does not exist: they pass only if
they are refused before any model loads (else the error would be "unknown model"). Cases under
MODEL need the prompt or the model (positions, layer and vocabulary ranges) and use a tiny random
model with a tokenizer and a transcoder.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.bad_inputs.harness import Case, run_case


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model directory (tokenizer + transcoder) and input files, outside the cases'
    folders."""
    from clt.lm import load_model
    from clt.transcoder import save
    from tests.attribution.helpers import random_transcoder
    from tests.clt.hf_tiny import make_tiny
    from tests.clt.tiny_train import tiny_tokenizer

    d = tmp_path_factory.mktemp("bad_steer")
    make_tiny("gemma2", d / "tiny")
    tiny_tokenizer().backend.save(str(d / "tiny" / "tokenizer.json"))
    m = load_model(str(d / "tiny"))
    cfg, params = random_transcoder(m.cfg, 16)
    save(d / "tc", cfg, params)
    sae = cfg.replace(max_reach=1, output_point="resid_mid")
    save(d / "sae", sae, dataclasses.replace(params, W_dec=tuple(w[:, :1] for w in params.W_dec)))
    keep = (0, 2)  # an SAE on model layers 0 and 2
    idx = np.asarray(keep)
    save(d / "sae02", sae.replace(n_layers=2, layers=keep), dataclasses.replace(
        params, W_enc=params.W_enc[idx], b_enc=params.b_enc[idx],
        log_threshold=params.log_threshold[idx], b_dec=params.b_dec[idx],
        W_dec=tuple(params.W_dec[i][:, :1] for i in keep)))
    D = m.cfg.d_model
    np.save(d / "v.npy", np.ones(D, np.float32))
    np.save(d / "zeros.npy", np.zeros(D, np.float32))
    np.save(d / "nan.npy", np.full(D, np.nan, np.float32))
    np.save(d / "v2d.npy", np.ones((2, D), np.float32))
    np.save(d / "short.npy", np.ones(D - 1, np.float32))
    np.save(d / "text.npy", np.array(["a", "b"]))
    (d / "pos.txt").write_text("w1 w2\nw3 w4 w5\n")
    (d / "neg.txt").write_text("w9 w8\n")
    (d / "empty.txt").write_text("\n  \n")
    return {"tiny": d / "tiny", "tc": d / "tc", "sae": d / "sae", "sae02": d / "sae02",
            "nomodel": d / "no_such_model",
            **{name: d / f"{name}.npy" for name in ("v", "zeros", "nan", "v2d", "short", "text")},
            "pos": d / "pos.txt", "neg": d / "neg.txt", "empty": d / "empty.txt"}


def steer(*args: str) -> tuple[str, ...]:
    return ("steer", "w1 w2 w3", "--model", "{nomodel}", *args)


def vec(*args: str) -> tuple[str, ...]:
    return steer("--vector", "{v}", "--layer", "1", *args)


CHEAP = [
    # Malformed edit specs: refused with the accepted syntax, never read another way.
    Case(steer("--add", "3:5@1==2"), "write --add LAYER:FEATURE[@POS]=DELTA"),
    Case(steer("--set", "3:5@1="), "cannot parse intervention '3:5@1='"),
    Case(steer("--set", "3:5"), "write --set LAYER:FEATURE[@POS]=VALUE"),
    Case(steer("--set", "3:5@x=1"), "cannot parse"),
    Case(steer("--set", "3:5@1=nan"), "cannot parse"),
    Case(steer("--set", "3:5@1=inf"), "cannot parse"),
    Case(steer("--set", "3:5@1=1e999"), "must be a finite number"),
    Case(steer("--set", "3:5@1=1.2.3"), "cannot parse"),
    Case(steer("--set", "3:5@1+2=1"), "cannot parse"),
    Case(steer("--set", "3.5:5=1"), "cannot parse"),
    Case(steer("--set", "3:-5=1"), "cannot parse"),
    Case(steer("--set", "3:5@-1=1"), "cannot parse"),
    Case(steer("--scale", "3:5@1*2"), "write --scale LAYER:FEATURE[@POS]=FACTOR"),
    Case(steer("--add", "3:5@1+2"), "cannot parse"),
    Case(steer("--zero", "3:5@1=0"), "write --zero LAYER:FEATURE[@POS]"),
    Case(steer("--zero", "3"), "cannot parse"),
    Case(steer("--zero", ""), "cannot parse"),
    Case(steer("--set", "3:5@all+=1"), "cannot parse"),
    Case(steer("--scale", "3:5=2x"), "Nx (N times the feature's max activation) applies to set"),
    Case(steer("--set", "3:5=x"), "cannot parse"),
    Case(steer("--set", "3:5=10x", "--cards", "{tmp}/missing.npz"), "--cards"),
    # Edits and steering together: refused, never one of them dropped.
    Case(vec("--zero", "3:5@1"), "cannot be combined"),
    Case(steer("--set", "1:2=1", "--feature-direction", "1:2", "--layer", "1"),
         "cannot be combined"),
    Case(vec("--feature-direction", "1:2"), "not both"),
    Case(steer("--vector", "{v}"), "steering needs --layer"),
    Case(vec("--mode", "frozen"), "mode frozen applies to feature edits only"),
    Case(steer("--zero", "1:1", "--layer", "2"), "SteerConfig.layer applies only to steering"),
    Case(steer("--zero", "1:1", "--alpha", "0.5"), "SteerConfig.alpha applies only to steering"),
    Case(steer("--zero", "1:1", "--from-pos", "2"),
         "SteerConfig.from_pos applies only to steering"),
    Case(steer(), "nothing to do"),
    # Numbers: NaN, infinities, out of range, wrong type.
    Case(vec("--alpha", "nan"), "SteerConfig.alpha must be a finite number"),
    Case(vec("--alpha", "inf"), "SteerConfig.alpha must be a finite number"),
    Case(vec("--alpha=-inf"), "SteerConfig.alpha must be a finite number"),
    Case(vec("--alpha", "strong"), "SteerConfig.alpha must be a number"),
    Case(steer("--vector", "{v}", "--layer", "-1"), "SteerConfig.layer must be >= 0"),
    Case(steer("--vector", "{v}", "--layer", "one"), "SteerConfig.layer must be an integer"),
    Case(vec("--from-pos", "-1"), "SteerConfig.from_pos must be >= 0"),
    Case(vec("--from-pos", "1.5"), "SteerConfig.from_pos must be an integer"),
    Case(vec("--k", "0"), "SteerConfig.k must be >= 1"),
    Case(vec("--k", "-3"), "SteerConfig.k must be >= 1"),
    Case(vec("--k", "2.5"), "SteerConfig.k must be an integer"),
    Case(vec("--max-new-tokens", "-1"), "SteerConfig.max_new_tokens must be >= 0"),
    Case(vec("--max-new-tokens", "nan"), "SteerConfig.max_new_tokens must be an integer"),
    Case(vec("--mode", "sideways"), "invalid choice"),
    Case(steer("--feature-direction", "12", "--layer", "1"),
         "feature_direction must be LAYER:FEATURE"),
    Case(("steer", "", "--model", "{nomodel}", "--zero", "1:1"),
         "SteerConfig.prompt must be a non-empty string"),
    Case(steer("--model", "", "--zero", "1:1"), "SteerConfig.model must be a non-empty string"),
    Case(steer("--transcoder", "", "--zero", "1:1"), "SteerConfig.transcoder must be a non-empty"),
    # Output and input paths, before the model loads.
    Case(steer("--zero", "1:1", "--out", "{dir}"), "is a directory"),
    Case(steer("--zero", "1:1", "--out", "{file}/r.json"), "is not a directory"),
    Case(steer("--vector", "{tmp}/missing.npy", "--layer", "1"), "no such file"),
    Case(steer("--vector", "{dir}", "--layer", "1"), "(a directory)"),
    Case(steer("--vector", "{file}", "--layer", "1"), "is not a readable .npy array"),
    Case(steer("--vector", "{zeros}", "--layer", "1"), "no direction to steer along"),
    Case(steer("--vector", "{nan}", "--layer", "1"), "non-finite"),
    Case(steer("--vector", "{v2d}", "--layer", "1"), "one numeric vector"),
    Case(steer("--vector", "{text}", "--layer", "1"), "one numeric vector"),
    # `cltrace direction`
    Case(("direction", "--positive", "{pos}", "--negative", "{neg}", "--layer", "-1", "-o",
          "{tmp}/v.npy", "--model", "{nomodel}"), "DirectionConfig.layer must be >= 0"),
    Case(("direction", "--positive", "{pos}", "--negative", "{neg}", "--layer", "x", "-o",
          "{tmp}/v.npy", "--model", "{nomodel}"), "DirectionConfig.layer must be an integer"),
    Case(("direction", "--positive", "{tmp}/missing.txt", "--negative", "{neg}", "--layer", "1",
          "-o", "{tmp}/v.npy", "--model", "{nomodel}"), "--positive"),
    Case(("direction", "--positive", "{pos}", "--negative", "{dir}", "--layer", "1", "-o",
          "{tmp}/v.npy", "--model", "{nomodel}"), "a directory, not a text file"),
    Case(("direction", "--positive", "{empty}", "--negative", "{neg}", "--layer", "1", "-o",
          "{tmp}/v.npy", "--model", "{nomodel}"), "holds no prompts"),
    Case(("direction", "--positive", "{pos}", "--negative", "{neg}", "--layer", "1", "-o",
          "{dir}", "--model", "{nomodel}"), "is a directory"),
    Case(("direction", "--positive", "{pos}", "--negative", "{neg}", "--layer", "1", "-o",
          "{file}/v.npy", "--model", "{nomodel}"), "is not a directory"),
    Case(("direction", "--positive", "{pos}", "--negative", "{neg}", "--layer", "1", "-o",
          "{tmp}/v.npy", "--position", "middle", "--model", "{nomodel}"), "invalid choice"),
    Case(("direction", "--positive", "{pos}", "--negative", "{neg}", "--layer", "1", "-o", "",
          "--model", "{nomodel}"), "DirectionConfig.out must be a non-empty string"),
]


def tiny_steer(*args: str) -> tuple[str, ...]:
    return ("steer", "w1 w2 w3", "--model", "{tiny}", "--transcoder", "{tc}", *args)


MODEL = [
    Case(tiny_steer("--vector", "{v}", "--layer", "1", "--from-pos", "99"),
         "SteerConfig.from_pos must be in 0..3"),
    Case(tiny_steer("--vector", "{v}", "--layer", "1", "--from-pos", "4"),
         "SteerConfig.from_pos must be in 0..3"),
    Case(tiny_steer("--vector", "{v}", "--layer", "3"), "SteerConfig.layer must be in 0..2"),
    Case(tiny_steer("--zero", "1:1", "--k", "100000"), "SteerConfig.k must be in 1..128"),
    Case(tiny_steer("--zero", "1:1", "--max-new-tokens", "1000"),
         "SteerConfig.max_new_tokens must be <= 60"),
    Case(tiny_steer("--set", "1:99@1=2"), "feature 99 does not exist"),
    Case(tiny_steer("--set", "1:1@9=2"), "position 9 out of range"),
    Case(tiny_steer("--set", "7:1=2"), "layer 7 out of range"),
    Case(tiny_steer("--vector", "{short}", "--layer", "1"), "the model needs (64,)"),
    Case(tiny_steer("--feature-direction", "1:99", "--layer", "1"), "feature 99 does not exist"),
    # Nx values need the feature's card; an SAE has no replacement model to freeze.
    Case(tiny_steer("--set", "1:2=10x"), "values written Nx need each feature's maximum"),
    Case(("steer", "w1 w2", "--model", "{tiny}", "--transcoder", "{sae}", "--zero", "1:1",
          "--mode", "frozen"), "frozen-mode edits need a transcoder"),
    # An SAE on model layers 0 and 2: edits and directions name layers it covers.
    *[Case(("steer", "w1 w2", "--model", "{tiny}", "--transcoder", "{sae02}", *args),
           "layer 1 is not covered: this SAE has dictionaries at model layers 0, 2 only")
      for args in (("--set", "1:1=2"), ("--zero", "1:3@1"), ("--set", "1:2=10x"),
                   ("--feature-direction", "1:1", "--layer", "1"))],
    Case(("steer", "w1", "--model", "{tiny}", "--transcoder", "{tmp}/none", "--zero", "1:1"),
         "no transcoder at"),
    Case(("steer", "  ", "--model", "{tiny}", "--transcoder", "{tc}", "--zero", "1:1"),
         "the prompt is empty"),
    Case(("direction", "--positive", "{pos}", "--negative", "{neg}", "--layer", "3", "-o",
          "{tmp}/v.npy", "--model", "{tiny}"), "DirectionConfig.layer must be in 0..2"),
    Case(("direction", "--positive", "{pos}", "--negative", "{pos}", "--layer", "1", "-o",
          "{tmp}/v.npy", "--model", "{tiny}"), "same mean residual"),
]


@pytest.mark.parametrize("case", CHEAP, ids=str)
def test_refused_before_the_model_loads(case, files, tmp_path, capsys):
    run_case(case, tmp_path, capsys, **files)


@pytest.mark.parametrize("case", MODEL, ids=str)
def test_refused_before_generation(case, files, tmp_path, capsys):
    run_case(case, tmp_path, capsys, **files)


def test_combined_syntax_round_trips():
    """The flag-free spec of every edit gives back the same edit (no second reading)."""
    from attribution.interventions import FeatureEdit, SteerConfig, edit_spec, parse_edit

    sc = SteerConfig(prompt="x", set=("1:2@3+=4",), scale=("1:2@3=-0.5",), add=("0:1=2e-3",),
                     zero=("2:7@all",))
    assert sc.edits() == (FeatureEdit(1, 2, 3, "set", 4.0, True),
                          FeatureEdit(1, 2, 3, "scale", -0.5),
                          FeatureEdit(0, 1, None, "add", 0.002),
                          FeatureEdit(2, 7, None, "set", 0.0))
    assert tuple(parse_edit(edit_spec(e)) for e in sc.edits()) == sc.edits()
