"""Neuron edits (`cltrace steer --neurons`, `interventions.NeuronEditHook`): a model's own MLP
unit set, scaled or zeroed in free mode, on tiny models of each MLP family (gated SiLU; gated
GELU with Gemma's post-MLP norm; GPT-2's non-gated GELU with biases).

References: scaling a unit at every position is the model with that unit's row of W_out scaled
(weights edited, plain forward); setting it at the last position adds (V - h) W_out[unit] to that
position's MLP output, computed here from the captured MLP input in float64 and added through
the steering hook; earlier positions are untouched."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from attribution import interventions as iv
from clt.configs import ConfigError
from clt.lm import forward, load_model
from clt.lm.model import activation
from cltrace.cli import main
from tests.clt.hf_tiny import make_tiny
from tests.clt.tiny_train import tiny_tokenizer

IDS = [5, 9, 22, 7, 3, 100]
FAMILIES = ["llama", "gemma3", "gpt2"]


def _scaled_row(params, layer: int, unit: int, c: float):
    W = params.layers.W_out.at[layer, unit].multiply(c)
    return dataclasses.replace(params, layers=dataclasses.replace(params.layers, W_out=W))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("c", [0.0, 3.0])
def test_scaling_a_neuron_everywhere_equals_scaling_its_output_row(tiny_dirs, x64, family, c):
    m = load_model(tiny_dirs(family), dtype=jnp.float64)
    ids = [m.cfg.bos_token_id] + IDS
    layer, unit = 1, 7
    edit = iv.FeatureEdit(layer, unit, None, "scale", c) if c else \
        iv.FeatureEdit(layer, unit, None, "set", 0.0)
    got = iv.neuron_edit_logits(m.params, m.cfg, (edit,), ids)
    want, _ = forward(_scaled_row(m.params, layer, unit, c), m.cfg, jnp.asarray(ids)[None])
    plain, _ = forward(m.params, m.cfg, jnp.asarray(ids)[None])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[0]), rtol=1e-10, atol=1e-10)
    assert np.abs(np.asarray(want[0] - plain[0])).max() > 1e-6  # the edit does something


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # no post-MLP norm: the write adds as is
def test_setting_a_neuron_at_one_position_adds_its_write_there(tiny_dirs, x64, family):
    m = load_model(tiny_dirs(family), dtype=jnp.float64)
    ids = [m.cfg.bos_token_id] + IDS
    P, layer, unit, V = len(ids), 1, 11, 2.5
    _, cap = forward(m.params, m.cfg, jnp.asarray(ids)[None], capture=("mlp_in",))
    n = np.asarray(cap.mlp_in[layer, 0, P - 1], np.float64)
    lp = m.params.layers
    up = n @ np.asarray(lp.W_in[layer][:, unit])
    if lp.b_in is not None:
        up += float(lp.b_in[layer][unit])
    if m.cfg.mlp == "gated":
        h = float(activation(m.cfg.activation, jnp.asarray(n @ np.asarray(lp.W_gate[layer][:, unit])))) * up
    else:
        h = float(activation(m.cfg.activation, jnp.asarray(up)))
    write = (V - h) * np.asarray(lp.W_out[layer][unit], np.float64)
    want = iv.steered_logits(m.params, m.cfg, ids, jnp.asarray(write), layer, 1.0, P - 1)
    got = iv.neuron_edit_logits(m.params, m.cfg, (iv.FeatureEdit(layer, unit, P - 1, "set", V),),
                                ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-10)
    plain, _ = forward(m.params, m.cfg, jnp.asarray(ids)[None])
    np.testing.assert_array_equal(np.asarray(got[:P - 1]), np.asarray(plain[0, :P - 1]))
    assert np.abs(np.asarray(got[P - 1] - plain[0, P - 1])).max() > 1e-6


def test_steer_neurons_command(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    make_tiny("gemma2", d)
    tiny_tokenizer().backend.save(str(d / "tokenizer.json"))
    out = tmp_path / "r.json"
    assert main(["steer", "w1 w2 w3", "--model", str(d), "--neurons",
                 "--zero", "1:7", "--set", "0:3@2=4", "--max-new-tokens", "3",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["mode"] == "free" and len(r["edits"]) == 2 and "intervened" in r


@pytest.mark.parametrize("extra, message", [
    (["--transcoder", "x"], "drop --transcoder"),
    (["--mode", "frozen"], "free mode"),
    (["--set", "1:2=3x"], "absolute values"),
])
def test_steer_neurons_refusals(extra, message):
    args = {"prompt": "a b", "neurons": True, "zero": ("1:2",)}
    for flag, value in zip(extra[::2], extra[1::2]):
        key = flag[2:].replace("-", "_")
        args[key] = (value,) if key in ("set", "zero") else value
    with pytest.raises(ConfigError, match=message):
        iv.SteerConfig(**args)


def test_steer_neurons_needs_edits():
    with pytest.raises(ConfigError, match="applies to edits"):
        iv.SteerConfig(prompt="a b", neurons=True, vector="v.npy", layer=1)
