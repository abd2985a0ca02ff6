"""Bad input gives one clear line naming the fix, not a traceback from deep inside JAX."""

from __future__ import annotations

import json

import pytest

from clt.configs import ConfigError
from clt.lm import ModelNotFound, WeightsError, load_model
from cltrace.cli import main
from tests.clt.hf_tiny import make_tiny


def test_unknown_model_lists_known(capsys):
    with pytest.raises(ModelNotFound, match="smollm2-135m, gemma3-270m"):
        load_model("no-such-model")
    assert main(["generate", "hi", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown model 'no-such-model'" in err


def test_directory_without_config(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="unsupported architecture 'mamba'; supported: gemma"):
        load_model(str(tmp_path))


def test_weights_of_wrong_shape(tmp_path):
    make_tiny("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="'layers.0.gate' has shape"):
        load_model(str(tmp_path))


def test_truncated_weights(tmp_path):
    make_tiny("llama", tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="cannot read"):
        load_model(str(tmp_path))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="cannot read GGUF file"):
        load_model(str(bad))


def test_prompt_over_context_in_cli(capsys):
    long_prompt = "word " * 9000  # SmolLM2's context is 8192 tokens
    assert main(["generate", long_prompt, "--model", "smollm2-135m"]) == 2
    assert "exceeds the model's context of 8192" in capsys.readouterr().err
