"""Feature labels without an external service: readable token strings (byte pieces decoded,
`<0xNN>` escapes), the automatic label from a card, and the model's self-explanation
(`viewer.explain`), down to the clerps of the graph JSON."""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

from clt.lm.model import forward
from clt.lm.tokenizer import Tokenizer, readable
from viewer.explain import _Inject, directions, explain
from viewer.features import FeatureCards


class _Backend:
    """Decodes every token to U+FFFD alone (as a byte-level BPE does for a partial character);
    its pieces are GPT-2 byte-alphabet strings or SentencePiece `<0xNN>` bytes."""

    pieces: ClassVar[dict[int, str]] = {0: "Ġâ", 1: "Ģ", 2: "ľ", 3: "<0xE6>", 4: "Ċ"}

    def decode(self, ids, skip_special_tokens=False):
        return "\ufffd"

    def id_to_token(self, i):
        return self.pieces[i]


def test_token_bytes_and_readable_strings():
    tok = Tokenizer(_Backend())
    # GPT-2's alphabet: Ġ is the space (0x20), â is 0xE2, Ģ 0x80 (U+0122), ľ 0x9C, Ċ newline.
    assert [tok.token_bytes(i) for i in range(5)] == [b" \xe2", b"\x80", b"\x9c", b"\xe6",
                                                      b"\n"]
    assert tok.token_strings([0, 1, 2]) == [" <0xE2>", "<0x80>", "<0x9C>"]
    # In a text, the token completing the character shows it.
    assert tok.token_strings([0, 1, 2, 4], merge=True) == [" <0xE2>", "<0x80>", "“", "\n"]
    # An invalid byte is escaped where it is; decodable bytes around it stay text.
    assert readable([b"a\xffb", b"\xe4\xba", b"\xac"], merge=True) == ["a<0xFF>b", "<0xE4><0xBA>",
                                                                       "京"]
    assert readable([b"\xe2", b"x"], merge=True) == ["<0xE2>", "x"]


def _cards(strings: list[str]) -> FeatureCards:
    ids = np.arange(len(strings))
    return FeatureCards({"vocab_strings": strings}, {"vocab_ids": ids})


def test_auto_label_reads_tokens_then_outputs():
    c = _cards([" France", " French", " france", "\n", " Paris", " capital", " the"])

    def ex(t):
        return [1.0, [t], [255], 0]

    card = {"top": [ex(0), ex(1), ex(2), ex(3), ex(0)], "pos": [[4, 3.0], [5, 2.0], [6, 1.0]]}
    assert c.auto_label(card) == "France, French, ⏎ → Paris, capital"
    assert c.auto_label({"top": [], "pos": [[4, 1.0]]}) == \
        "never active in the scanned text → Paris"
    assert c.auto_label({"top": [ex(6)], "pos": [[4, -1.0]]}) == "the"


@pytest.fixture(scope="module")
def tiny():
    from clt.transcoder import TranscoderConfig, init_params
    from tests.clt.tiny_train import tiny_model

    m = tiny_model()
    tc_cfg = TranscoderConfig(d_model=m.cfg.d_model, n_layers=m.cfg.n_layers, n_features=8)
    import jax

    return m, tc_cfg, init_params(tc_cfg, jax.random.key(0))


def test_injection_adds_the_scaled_direction_at_the_placeholders_only(tiny):
    m, tc_cfg, tc = tiny
    ids = jnp.asarray([[1, 5, 9, 5, 7]])
    d = directions(tc_cfg, tc, [1], [3])
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-6)
    hook = _Inject((1, 3))
    hp = (jnp.asarray(d), jnp.asarray([1]), jnp.float32(2.0))
    _, base = forward(m.params, m.cfg, ids, capture=("resid_pre",))
    _, got = forward(m.params, m.cfg, ids, capture=("resid_pre",), mlp_hook=hook,
                     hook_params=hp)
    # After block 1 (entering block 2): + 2 |r| d at positions 1 and 3; position 0 untouched,
    # position 1 changed by exactly that (nothing before it changed).
    r = np.asarray(base.resid_pre[2, 0])
    g = np.asarray(got.resid_pre[2, 0])
    np.testing.assert_allclose(g[0], r[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g[1] - r[1], 2.0 * np.linalg.norm(r[1]) * d[0], rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.resid_pre[1]), np.asarray(base.resid_pre[1]))


def test_explain_depends_on_the_direction(tiny):
    m, tc_cfg, tc = tiny
    prompt, ph = "w1 w1 w1 w2", "w1"
    layers, feats = [0, 0, 1, 2, 2], [0, 1, 2, 3, 4]
    none = explain(m, tc_cfg, tc, layers, feats, scale=1e-9, batch_size=4, prompt=prompt,
                   placeholder=ph, at_layer=0)
    assert len(set(none)) == 1 and len(none) == 5  # no direction: one continuation
    said = explain(m, tc_cfg, tc, layers, feats, scale=20.0, batch_size=4, prompt=prompt,
                   placeholder=ph, at_layer=0)
    assert len(set(said)) > 1 and said == explain(m, tc_cfg, tc, layers, feats, scale=20.0,
                                                  batch_size=2, prompt=prompt,
                                                  placeholder=ph, at_layer=0)
    from clt.configs import ConfigError

    with pytest.raises(ConfigError, match="has no 'zz' token"):
        explain(m, tc_cfg, tc, layers, feats, prompt=prompt, placeholder="zz")


def test_features_explain_and_clerps(pipeline, tmp_path):
    from attribution.export import to_neuronpedia
    from attribution.graph import Graph
    from attribution.prune import prune
    from cltrace.cli import main

    out = tmp_path / "cards.npz"
    assert main(["features", "--transcoder", str(pipeline.transcoder_dir), "--model",
                 str(pipeline.model_dir), "--data", str(pipeline.corpus), "--n-contexts", "16",
                 "--context-length", "32", "--window", "10", "--no-progress", "--out", str(out),
                 "--explain", "--explain-graph", str(pipeline.graph), "--explain-max", "6",
                 "--explain-prompt", "w1 w1 w1 w2", "--explain-placeholder", "w1"]) == 0
    cards = FeatureCards.load(out)
    said = cards.meta["explanations"]
    assert len(said) == 6
    g = Graph.load(pipeline.graph)
    res = prune(g, 0.8, 0.98)
    feats = np.nonzero(res.node_mask[g.ranges.feature])[0]
    top = feats[np.argmax(res.influence[feats])]
    first = f"{g.feature_layer[top]}_{g.feature_index[top]}"
    assert next(iter(said)) == first  # the graph's most influential feature first
    layer, f = map(int, first.split("_"))
    assert cards.card(layer, f)["self"] == said[first]
    assert cards.clerp(layer, f) == f"{cards.card(layer, f)['auto']} | self: {said[first]}"
    assert cards.clerp(layer, f, "mine") == "mine"
    js = to_neuronpedia(g, res, labels=cards.clerp)
    clerps = {n["node_id"]: n["clerp"] for n in js["nodes"] if "transcoder" in n["feature_type"]}
    assert clerps and all(clerps.values())
    assert clerps[f"{layer}_{f}_{g.feature_pos[top]}"] == cards.clerp(layer, f)
