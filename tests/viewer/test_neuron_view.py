"""Neuron graphs in the viewer: feature cards over the MLP's own hidden units (`neuron_cards`)
equal a brute-force reference (each unit's value recomputed from the weights, checked to rebuild
the MLP's captured output) on a gated, a gated + post-norm and a GPT-2 model; and the folded
error nodes are named "other neurons" in the label, the graph JSON (read back too) and the page,
while a transcoder graph keeps "error"."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from attribution.export import to_neuronpedia
from attribution.graph import Graph
from attribution.prune import prune
from clt.lm import load_model
from tests.attribution.test_neurons import _Neurons
from tests.viewer.helpers import random_graph
from tests.viewer.test_html import page_blob
from viewer.features import FeaturesConfig, neuron_cards
from viewer.html import render_html
from viewer.neuronpedia import from_neuronpedia

K = 5


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tests.clt.hf_tiny import make_tiny

    made = {}

    def get(family):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(f"tiny_{family}")
            make_tiny(family, made[family])
        return str(made[family])

    return get


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_neuron_cards_match_brute_force(tiny_dirs, family):
    m = load_model(tiny_dirs(family))
    rng = np.random.default_rng(0)
    ctx = rng.integers(3, m.cfg.vocab_size, (5, 12)).astype(np.int32)  # 5: a padded batch
    ctx[:, 0] = m.cfg.bos_token_id
    config = FeaturesConfig(transcoder="neurons", n_contexts=5, context_length=12, batch_size=4,
                            top_k=K, n_samples=2, window=6, n_output_tokens=3)
    cards = neuron_cards(m, ctx, config)
    assert (cards.n_layers, cards.n_features) == (m.cfg.n_layers, m.cfg.d_mlp)
    units = []
    for c in ctx:
        u = _Neurons(m.params, m.cfg, [int(t) for t in c])
        # The reference's units rebuild the MLP's output: they are the model's own.
        np.testing.assert_allclose(np.einsum("plm,lmd->lpd", u.acts, u.dec) + u.bias, u.mlp_out,
                                   rtol=1e-4, atol=1e-4)
        units.append(u.acts)
    acts = np.stack(units)  # [ctx pos layer unit]
    acts[:, 0] = 0  # the BOS position is left out of the scan
    a = cards.arrays
    for layer in range(m.cfg.n_layers):
        every = acts[:, :, layer].reshape(-1, m.cfg.d_mlp)
        want = -np.sort(-every, axis=0)[:K].T  # [unit, K]
        np.testing.assert_allclose(a["top_act"][layer], np.where(want > 0, want, 0),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a["density"][layer], (acts[:, 1:, layer] > 0).mean((0, 1)),
                                   atol=1e-6)
    # Output tokens: the unit's W_out row (a post-MLP norm's weight included) through the
    # unembedding, as for a one-layer transcoder's decoder.
    lp = m.params.layers
    d = np.asarray(lp.W_out[1], np.float64)
    if m.cfg.post_mlp_norm:
        d = d * (np.asarray(lp.post_mlp_norm_w[1]) + m.cfg.norm_offset)
    if m.cfg.norm == "layernorm":
        d = d - d.mean(-1, keepdims=True)
    logits = (d * (np.asarray(m.params.final_norm_w) + m.cfg.norm_offset)) @ np.asarray(
        m.params.W_U, np.float64)
    np.testing.assert_array_equal(a["out_pos_tok"][1], np.argsort(-logits, axis=1)[:, :3])
    card = cards.card(1, int(np.argmax(a["top_act"][1, :, 0])))
    assert card["top"] and card["label"]


def _neuron_graph() -> Graph:
    g = random_graph(n_layers=3, n_pos=5, n_features=30, seed=4, connected=True)
    return dataclasses.replace(g, info={**g.info, "neurons": {"top_k": 3, "d_mlp": 64}})


def test_other_neurons_are_named_in_label_json_and_page():
    g = _neuron_graph()
    e = g.ranges.error.start
    assert g.neurons and g.error_name == "other neurons"
    assert g.label(e) == f"other neurons L{g.error_layer[0]} @{g.error_pos[0]}"
    js = to_neuronpedia(g, prune(g, 1.0, 1.0))
    errs = [n for n in js["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert errs and all(n["clerp"].startswith("other neurons L") for n in errs)
    assert js["metadata"]["info"]["neurons"] is True
    assert js["metadata"]["info"]["neuron_top_k"] == 3
    back = from_neuronpedia(js)
    assert back.neurons and back.label(back.ranges.error.start).startswith("other neurons L")
    html, _ = render_html(g, cards=False)
    assert page_blob(html, "graph-data")["meta"]["error_name"] == "other neurons"
    assert 'id="show-errors" type="checkbox" checked> other neurons</label>' in html
    # A transcoder graph keeps its names.
    t = random_graph(n_layers=3, n_pos=5, n_features=30, seed=4, connected=True)
    assert not t.neurons and t.label(t.ranges.error.start).startswith("error L")
    js = to_neuronpedia(t, prune(t, 1.0, 1.0))
    assert all(n["clerp"] == "" for n in js["nodes"]
               if n["feature_type"] == "mlp reconstruction error")
    html, _ = render_html(t, cards=False)
    assert page_blob(html, "graph-data")["meta"]["error_name"] == "error"
    assert 'checked> errors</label>' in html


def test_a_traced_neuron_graph_names_its_nodes(tmp_path):
    from attribution.trace import TraceConfig, trace_tokens
    from tests.clt.tiny_train import tiny_model

    m = tiny_model()
    g = trace_tokens(m.params, m.cfg, None, None, [5, 9, 22, 7],
                     TraceConfig(prompt="x", neurons=True, neuron_top_k=3))
    assert g.error_name == "other neurons"
    back = Graph.load(g.save(tmp_path / "g.npz"))
    assert back.label(back.ranges.error.start).startswith("other neurons L")
    assert jnp.asarray(back.activation).shape[0] == back.ranges.feature.stop


def test_the_page_names_other_neurons_in_a_browser(browser, tmp_path):
    from tests.viewer.helpers import click_node, js, wait_ready
    from viewer.html import write_html

    g = _neuron_graph()
    page = write_html(g, tmp_path / "neurons.html", cards=False).path
    browser.get(page.as_uri())
    wait_ready(browser)
    data = page_blob(page.read_text(encoding="utf-8"), "graph-data")
    err = int(np.nonzero(np.asarray(data["kind"]) == 1)[0][0])
    assert js(browser, "return C.core.name(arguments[0])", err).startswith(
        f"other neurons {data['layer'][err]}@{data['pos'][err]}")
    assert js(browser, "return C.core.shortName(arguments[0])", err).startswith("other neurons ")
    click_node(browser, err)
    assert "other neurons node" in browser.find_element("id", "node-info").text
