"""Converted GGUF models on disk (clt/lm/model_cache.py): the first load writes them, the next
reads them without parsing the GGUF file and gives the same parameters and tokenizer; a changed
file or a damaged entry is converted again."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from clt.lm import loading
from clt.lm.loading import embedded_path, load_model


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    monkeypatch.setenv("CLTRACE_MODEL_CACHE", "1")
    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path / "cache"))
    loading._load_cached.cache_clear()
    yield tmp_path / "cache" / "models"
    loading._load_cached.cache_clear()


def _entries(root):
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_second_load_reads_the_conversion(cache_on, tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    shutil.copy(embedded_path("smollm2-135m"), gguf)
    first = load_model(str(gguf))
    (entry,) = _entries(cache_on)
    loading._load_cached.cache_clear()

    import clt.lm.gguf_io

    def boom(*a, **k):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(clt.lm.gguf_io, "read_gguf", boom)
    second = load_model(str(gguf))
    assert second.cfg == first.cfg
    import jax

    a, b = jax.tree.leaves(first.params), jax.tree.leaves(second.params)
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):  # every weight, bit for bit
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    t1, t2 = first.tokenizer, second.tokenizer
    for text in ["The capital of France is", "“naïve” 東京 🙂\n\tx"]:
        assert t1.encode(text) == t2.encode(text)
    assert (t1.bos_token_id, t1.eos_token_ids, t1.add_bos, t1.chat_template) == \
        (t2.bos_token_id, t2.eos_token_ids, t2.add_bos, t2.chat_template)
    monkeypatch.undo()

    # A damaged entry is dropped and converted again.
    (cache_on / entry / "params.safetensors").write_bytes(b"garbage")
    loading._load_cached.cache_clear()
    monkeypatch.setenv("CLTRACE_MODEL_CACHE", "1")
    monkeypatch.setenv("CLTRACE_CACHE", str(cache_on.parent))
    again = load_model(str(gguf))
    np.testing.assert_array_equal(np.asarray(again.params.embed), np.asarray(first.params.embed))
    assert _entries(cache_on) == [entry]
    # A changed file gets a new entry, and the old one goes.
    os.utime(gguf, ns=(0, 10**9))
    loading._load_cached.cache_clear()
    load_model(str(gguf))
    (new,) = _entries(cache_on)
    assert new != entry


def test_cache_off(cache_on, monkeypatch, tmp_path):
    monkeypatch.setenv("CLTRACE_MODEL_CACHE", "0")
    load_model("smollm2-135m")
    assert _entries(cache_on) == []


def test_converted_arrays_go_to_the_device_as_they_are(lowered):
    """`unflatten_params` (what a cached conversion is read back with) gives the same values and
    types and lowers no program (eager `jnp.asarray` lowers one per shape: this config's shapes
    are its own, so none is cached)."""
    import jax

    from clt.lm import ModelConfig, random_params
    from clt.lm.params import flatten_params, unflatten_params

    cfg = ModelConfig(vocab_size=67, d_model=13, n_layers=2, n_heads=2, n_kv_heads=1,
                      head_dim=6, d_mlp=23, max_position=16, name="odd", bos_token_id=1,
                      eos_token_ids=(2,))
    flat = flatten_params(random_params(cfg, jax.random.key(0)))
    with lowered() as programs:
        back = unflatten_params(flat)
    assert not programs
    again = flatten_params(back)
    assert again.keys() == flat.keys()
    for k, v in flat.items():
        assert again[k].dtype == v.dtype, k
        np.testing.assert_array_equal(again[k], v, err_msg=k)
