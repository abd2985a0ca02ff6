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
    tc_saved = saved["transcoder"]  # nested; the file gave it flat
    assert saved["steps"] == 8 and tc_saved["n_features"] == 32 and tc_saved["max_reach"] == 1
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
    from clt.configs import flat_names
    from clt.train import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    # Every field, the nested transcoder's given flat (--n-features, --k, ...), as before.
    names = flat_names(TrainConfig) - {"schema_version", "transcoder"}
    assert {"n_features", "max_reach", "activation", "k", "skip", "input_point"} <= names
    for name in names:
        assert "--" + name.replace("_", "-") in text, name


def test_train_config_nests_the_transcoders(tmp_path):
    """TrainConfig holds a TranscoderConfig; flat keys (old config files and recipes, flags) and
    the nested table give the same config, and its JSON round-trips."""
    from clt.configs import from_dict, load_config, save_config, to_dict
    from clt.train import TrainConfig

    flat = TrainConfig.make(n_features=96, activation="batchtopk", k=5, skip=True, steps=7)
    nested = from_dict(TrainConfig, {"steps": 7, "transcoder": {
        "n_features": 96, "activation": "batchtopk", "k": 5, "skip": True}})
    assert flat == nested and flat.transcoder.n_features == 96 and flat.transcoder.d_model == 0
    assert to_dict(flat)["transcoder"]["k"] == 5 and "n_features" not in to_dict(flat)
    save_config(flat, tmp_path / "c.json", "train")
    assert load_config(TrainConfig, tmp_path / "c.json", "train") == flat

    class Model:
        d_model, n_layers, name = 12, 3, "tiny"

    tc_cfg = flat.transcoder_config(Model)
    assert (tc_cfg.d_model, tc_cfg.n_layers, tc_cfg.model_name, tc_cfg.k) == (12, 3, "tiny", 5)


def test_bad_train_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = [\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "cannot parse" in capsys.readouterr().err
    bad.write_text("no_such_field = 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown TrainConfig field(s) ['no_such_field']" in capsys.readouterr().err
