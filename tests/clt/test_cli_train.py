"""`cltrace train` (config file + flag overrides, resume) and `cltrace eval`, end to end on a tiny
random model saved as a Hugging Face directory."""

from __future__ import annotations

import json

import pytest

from cltrace.cli import main
from tests.clt.hf_tiny import make_tiny
from tests.clt.tiny_train import tiny_tokenizer, write_corpus


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    make_tiny("llama", d)
    tiny_tokenizer().backend.save(str(d / "tokenizer.json"))
    return d


def test_train_from_toml_with_overrides_then_eval(tiny_dir, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt", n_docs=120)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f"""
[train]
model = "{tiny_dir}"
data = "{corpus}"
context_length = 16
n_features = 32
steps = 100
batch_tokens = 64
round_contexts = 8
lr = 0.003
warmup_steps = 2
holdout = 0.1
mesh_data = 1
""")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--steps", "8", "--out", str(out),
                 "--max-reach", "1", "--log-every", "4", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["steps"] == 8 and saved["n_features"] == 32 and saved["max_reach"] == 1
    assert "transcoder written to" in capsys.readouterr().out
    report = tmp_path / "eval.json"
    assert main(["eval", "--transcoder", str(out / "transcoder"), "--model", str(tiny_dir),
                 "--data", str(corpus), "--holdout", "0.1", "--context-length", "16",
                 "--contexts", "6", "--out", str(report)]) == 0
    metrics = json.loads(report.read_text())
    assert len(metrics["nmse_per_layer"]) == 3 and 0 <= metrics["top1_agreement"] <= 1
    assert metrics["n_tokens"] == 6 * 15
    assert "NMSE" in capsys.readouterr().out
    # The same transcoder in the circuit-tracer layout (a PLT: one file per layer).
    assert main(["export", "--transcoder", str(out / "transcoder"), "-o",
                 str(tmp_path / "ct")]) == 0
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == [
        "config.yaml", "layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors"]


def test_train_help_documents_every_field(capsys):
    from clt.train import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        if name != "schema_version":
            assert "--" + name.replace("_", "-") in text, name


def test_bad_train_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = [\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "cannot parse" in capsys.readouterr().err
    bad.write_text("no_such_field = 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown TrainConfig field(s) ['no_such_field']" in capsys.readouterr().err
