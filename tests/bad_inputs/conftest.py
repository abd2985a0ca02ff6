"""Fixtures of the bad-input suite shared by its command tables: text and config files good and
bad, a tiny model directory, and a private cache folder."""

from __future__ import annotations

import json

import numpy as np
import pytest


def make_inputs(tmp_path_factory) -> dict:
    """Text files good and bad, and config files, by the names the cases use."""
    d = tmp_path_factory.mktemp("inputs")
    from tests.clt.tiny_train import write_corpus

    (d / "emptydir").mkdir()
    (d / "empty.txt").write_bytes(b"")
    rng = np.random.default_rng(0)
    (d / "binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 8 + rng.bytes(4000))
    (d / "latin1.txt").write_bytes("w1 w2 caf\u00e9 w3\n\nw4 na\u00efve w5\n".encode("latin-1"))
    (d / "utf16.txt").write_bytes("w1 w2 w3\n\nw4 w5\n".encode("utf-16"))  # with a BOM
    (d / "utf16le.txt").write_bytes("w1 w2 w3\n\nw4 w5\n".encode("utf-16-le"))
    (d / "bad.jsonl").write_text(json.dumps({"text": "w1 w2"}) + "\n" + json.dumps({"t": 1})
                                 + "\n")
    (d / "good.jsonl").write_text(json.dumps({"text": "w1 w2"}) + "\n")
    cfgs = {"cfg_syntax": "steps = [\n", "cfg_nan": "[train]\nlr = nan\n",
            "cfg_beta": "beta1 = 2.0\n", "cfg_type": 'steps = "ten"\n', "cfg_table": "train = 3\n",
            "cfg_unknown": "lr_max = 1.0\n", "cfg_keep": "[train]\nkeep_checkpoints = 0\n"}
    for name, text in cfgs.items():
        (d / f"{name}.toml").write_text(text)
    return {"corpus": write_corpus(d / "corpus.txt", n_docs=60), "empty": d / "empty.txt",
            "emptydir": d / "emptydir", "binary": d / "binary.bin", "latin1": d / "latin1.txt",
            "utf16": d / "utf16.txt", "utf16le": d / "utf16le.txt", "badjsonl": d / "bad.jsonl",
            "jsonl": d / "good.jsonl",
            **{name: d / f"{name}.toml" for name in cfgs}}


def make_model_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face directory, with a word-level tokenizer."""
    from tests.clt.hf_tiny import make_tiny
    from tests.clt.tiny_train import tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny_llama")
    make_tiny("llama", d)
    tiny_tokenizer().backend.save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory)


@pytest.fixture
def caches(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path_factory.mktemp("cache")))
