"""Interventions with a residual-stream SAE (`cltrace steer --set/--feature-direction` with an SAE
from `cltrace train --kind sae`), on a tiny random Gemma-2 (post-MLP norm included).

References (float32, `highest` matmul precision from conftest; atol 1e-4 on logits):
- `--set L:F=V` with an SAE: the residual stream x before layer L's MLP becomes
  x + (V - a_F(x)) W_dec[L][F], a_F computed by hand (numpy JumpReLU of x W_enc + b_enc); the
  reference runs layer L's MLP on that residual by the model's building blocks, then blocks L+1..
  as a truncated model. For a feature that never fires, the change is exactly V x its decoder row.
- `--feature-direction L:F` with an SAE steers along W_dec[L][F]: alpha x that row added to the
  residual after block L, against the truncated model run on the shifted residual.
- `--set L:F=10x`: the value is 10 x the feature's maximum activation on its card, end to end.
- An SAE on model layers 0 and 2 only: edits, directions, Nx values and feature cards at a model
  layer equal those of the all-layer SAE with the same dictionaries at that layer (logits atol
  1e-6; cards identical); layer 1 is refused in one line.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attribution import interventions as iv
from clt.configs import ConfigError
from clt.lm import load_model
from clt.lm.model import forward, mlp, norm
from clt.transcoder import save
from cltrace.cli import main
from tests.attribution.helpers import random_transcoder
from tests.clt.hf_tiny import make_tiny
from tests.clt.tiny_train import tiny_tokenizer, write_corpus

LAYER = 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("sae_gemma2")
    make_tiny("gemma2", d)
    tiny_tokenizer().backend.save(str(d / "tokenizer.json"))
    m = load_model(str(d))
    cfg, params = random_transcoder(m.cfg, 16, max_reach=1)
    cfg = cfg.replace(output_point="resid_mid")  # the SAE: reads and rebuilds resid_mid
    # Encoders scaled up so that features fire on the tiny model's residual stream.
    params = dataclasses.replace(params, W_enc=params.W_enc * 30.0)
    return d, m, cfg, params


def _tokens(m):
    return jnp.asarray([m.cfg.bos_token_id, 7, 9, 11, 5, 8], jnp.int32)


def _tail(m, first, resid):
    """Logits of blocks first.. run on `resid` [pos, d_model] (a truncated model)."""
    cfg = m.cfg.replace(n_layers=m.cfg.n_layers - first,
                        layer_types=m.cfg.layer_types[first:] if m.cfg.layer_types else ())
    params = dataclasses.replace(m.params,
                                 layers=jax.tree.map(lambda a: a[first:], m.params.layers))
    logits, _ = forward(params, cfg, jnp.zeros((1, resid.shape[0]), jnp.int32),
                        input_embeds=resid[None])
    return logits[0]


def _after_mlp(m, layer, r):
    """r + layer's MLP (its norm, MLP and post-norm) of r, by the building blocks."""
    lp = jax.tree.map(lambda a: a[layer], m.params.layers)
    h, _ = norm(r, lp.mlp_norm_w, lp.mlp_norm_b, m.cfg)
    out = mlp(lp, m.cfg, h)
    if m.cfg.post_mlp_norm:
        out, _ = norm(out, lp.post_mlp_norm_w, None, m.cfg)
    return r + out


@pytest.mark.parametrize("which", ["live", "dead", "dead_at_pos"])
def test_sae_set_moves_the_residual_by_the_decoder_row(tiny, which):
    _, m, cfg, params = tiny
    toks = _tokens(m)
    _, cap = forward(m.params, m.cfg, toks[None], capture=("resid_mid",))
    x = np.asarray(cap.resid_mid[LAYER, 0], np.float64)  # [pos, d]
    z = x @ np.asarray(params.W_enc[LAYER], np.float64) + np.asarray(params.b_enc[LAYER])
    a = np.where(z > np.asarray(params.threshold[LAYER]), z, 0.0)  # JumpReLU by hand
    if which == "live":
        f = int(np.argmax((a[1:] > 0).sum(0)))  # fires on most positions
        assert (a[1:, f] > 0).sum() >= 2
    else:  # never fires: the edit adds exactly V x its decoder row
        f = 3
        params = dataclasses.replace(params, b_enc=params.b_enc.at[LAYER, f].set(-1e3))
        a[:, f] = 0.0
    V, pos = 4.0, (2 if which == "dead_at_pos" else None)
    d = np.asarray(params.W_dec[LAYER][f, 0], np.float64)
    delta = (V - a[:, f])[:, None] * d[None]
    if pos is not None:
        delta[np.arange(len(x)) != pos] = 0.0
    r = jnp.asarray(x + delta, jnp.float32)
    ref = _tail(m, LAYER + 1, _after_mlp(m, LAYER, r))
    edit = iv.FeatureEdit(LAYER, f, pos, "set", V)
    got = iv.free_logits(m.params, m.cfg, cfg, params, None, (edit,), tokens=toks)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    plain, _ = forward(m.params, m.cfg, toks[None])
    assert float(jnp.abs(plain[0] - ref).max()) > 1e-3  # the edit matters
    # No edit: the model itself (the SAE's error is kept; the layers then run unrolled, not in
    # a scan: float32 rounding apart).
    same = iv.free_logits(m.params, m.cfg, cfg, params, None, (), tokens=toks)
    np.testing.assert_allclose(same, plain[0], atol=1e-5)


def test_sae_feature_direction_steers_along_its_decoder_row(tiny):
    _, m, cfg, params = tiny
    f, alpha = 5, 0.7
    v = iv.feature_direction(cfg, params, LAYER, f)
    np.testing.assert_array_equal(v, params.W_dec[LAYER][f, 0])
    toks = _tokens(m)
    got = iv.steered_logits(m.params, m.cfg, toks, v, LAYER, alpha)
    _, cap = forward(m.params, m.cfg, toks[None], capture=("resid_pre",))
    ref = _tail(m, LAYER + 1, cap.resid_pre[LAYER + 1, 0] + alpha * v)
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_multiples_of_the_card_maximum():
    e = iv.parse_edit("1:2@3=10x", "set")
    assert (e.value, e.of_max, e.op) == (10.0, True, "set")
    assert iv.parse_edit(iv.edit_spec(e)) == e
    assert iv.parse_edit("0:1+0.5x").of_max
    maxima = np.array([[1.0, 2.0, 0.0], [0.5, 0.25, 3.0]])
    got = iv.resolve_multiples((e.__class__(1, 2, 3, "set", 10.0, of_max=True),
                                iv.FeatureEdit(0, 1, None, "add", 0.5, of_max=True),
                                iv.FeatureEdit(0, 0, None, "set", 7.0)), maxima)
    assert [g.value for g in got] == [30.0, 1.0, 7.0] and not any(g.of_max for g in got)
    with pytest.raises(ConfigError, match="never fired"):
        iv.resolve_multiples((iv.FeatureEdit(0, 2, None, "set", 2.0, of_max=True),), maxima)
    with pytest.raises(ConfigError, match="cover 2 layers x 3 features"):
        iv.resolve_multiples((iv.FeatureEdit(2, 0, None, "set", 2.0, of_max=True),), maxima)
    with pytest.raises(ConfigError, match="resolve it from its card first"):
        e.apply(jnp.zeros(3), jnp.arange(3))


def test_steer_set_10x_the_card_maximum_end_to_end(tiny, tmp_path, capsys):
    from clt.data import open_contexts
    from viewer.features import CARDS_FILE, FeaturesConfig, scan

    d, m, cfg, params = tiny
    save(tmp_path / "sae", cfg, params)
    corpus = write_corpus(tmp_path / "c.txt", n_docs=30)
    ctx = open_contexts(str(corpus), m.tokenizer, 16, cache_dir=tmp_path).take(0, 8)
    config = FeaturesConfig(transcoder=str(tmp_path / "sae"), n_contexts=8, context_length=16,
                            batch_size=8, top_k=2, n_samples=1, window=4, n_output_tokens=2)
    cards = scan(m, cfg, params, ctx, config)
    cards.save(tmp_path / "sae" / CARDS_FILE)
    top = cards.arrays["top_act"][LAYER, :, 0]
    f = int(np.argmax(top))
    assert top[f] > 0
    out = tmp_path / "r.json"
    assert main(["steer", "w1 w2 w3", "--model", str(d), "--transcoder", str(tmp_path / "sae"),
                 "--set", f"{LAYER}:{f}=10x", "--max-new-tokens", "2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["edits"][0]["value"] == pytest.approx(10 * float(top[f]), rel=1e-6)
    assert r["edits"][0]["of_max"] is False
    # The reported next-token probabilities are those of the resolved edit.
    ids = [m.cfg.bos_token_id] + [int(t) for t in m.tokenizer.encode("w1 w2 w3")]
    edit = iv.FeatureEdit(LAYER, f, None, "set", 10 * float(top[f]))
    logits = iv.free_logits(m.params, m.cfg, cfg, params, None, (edit,),
                            tokens=jnp.asarray(ids, jnp.int32))[-1]
    p = np.asarray(jax.nn.softmax(logits))
    best = int(np.argmax(p))
    assert r["top_after"][0][1] == pytest.approx(float(p[best]), abs=1e-5)
    capsys.readouterr()


# --- an SAE on some layers: edits, directions and cards address model layers ----------------------
SOME = (0, 2)  # model layers of the 3-layer tiny Gemma-2; layer 1 is not covered
UNCOVERED = "layer 1 is not covered: this SAE has dictionaries at model layers 0, 2 only"


@pytest.fixture(scope="module")
def some(tiny):
    """The fixture's SAE cut down to layers 0 and 2 (its dictionaries 0 and 1): the reference
    for each is the all-layer SAE at the same model layer."""
    from tests.clt.test_sae import _restricted

    _, _, cfg, params = tiny
    return _restricted(cfg, params, SOME)


def test_sae_on_some_layers_edits_and_directions_address_model_layers(tiny, some):
    _, m, cfg, params = tiny
    sub, sp = some
    toks = _tokens(m)
    edits = (iv.FeatureEdit(2, 5, None, "set", 4.0), iv.FeatureEdit(0, 3, 2, "add", 1.5))
    got = iv.free_logits(m.params, m.cfg, sub, sp, None, edits, tokens=toks)
    ref = iv.free_logits(m.params, m.cfg, cfg, params, None, edits, tokens=toks)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    plain, _ = forward(m.params, m.cfg, toks[None])
    assert float(jnp.abs(plain[0] - got).max()) > 1e-3  # the edits matter
    np.testing.assert_array_equal(iv.feature_direction(sub, sp, 2, 5), params.W_dec[2][5, 0])
    # Nx values: the maxima's rows are the SAE's dictionaries.
    maxima = np.arange(2 * 16, dtype=np.float64).reshape(2, 16) + 1.0
    e = iv.FeatureEdit(2, 3, None, "set", 10.0, of_max=True)
    assert iv.resolve_multiples((e,), maxima, tc_cfg=sub)[0].value == 10.0 * maxima[1, 3]
    for refused in (lambda: iv.FeatureEdit(1, 0, None).check(sub),
                    lambda: iv.feature_direction(sub, sp, 1, 0),
                    lambda: iv.free_logits(m.params, m.cfg, sub, sp, None,
                                           (iv.FeatureEdit(1, 0, None, "set", 1.0),), toks)):
        with pytest.raises(ConfigError, match=UNCOVERED):
            refused()


def test_cards_of_an_sae_on_some_layers_are_by_model_layer(tiny, some, tmp_path, capsys):
    from clt.data import open_contexts
    from tests.clt.test_sae import _restricted
    from viewer.explain import directions
    from viewer.features import CARDS_FILE, FeatureCards, FeaturesConfig, card_maxima, scan

    d, m, cfg, params = tiny
    sub, sp = some
    corpus = write_corpus(tmp_path / "c.txt", n_docs=30)
    ctx = open_contexts(str(corpus), m.tokenizer, 16, cache_dir=tmp_path).take(0, 8)
    config = FeaturesConfig(transcoder="x", n_contexts=8, context_length=16, batch_size=8,
                            top_k=2, n_samples=1, window=4, n_output_tokens=2)
    full = scan(m, cfg, params, ctx, config)
    part = scan(m, sub, sp, ctx, config)
    assert part.layers == SOME and part.meta["layers"] == [0, 2] and part.n_layers == 2
    for layer in SOME:
        for f in range(16):
            assert part.card(layer, f) == full.card(layer, f), (layer, f)
    with pytest.raises(ConfigError, match=UNCOVERED):
        part.card(1, 0)
    save(tmp_path / "sae", sub, sp)
    path = part.save(tmp_path / "sae" / CARDS_FILE)
    assert FeatureCards.load(path).card(2, 7) == part.card(2, 7)
    maxima, _ = card_maxima(str(tmp_path / "sae"), None, sub)
    np.testing.assert_array_equal(maxima, full.arrays["top_act"][[0, 2], :, 0])
    full.save(tmp_path / "full.npz")
    with pytest.raises(ConfigError, match="cards are for 3 layers x 16 features but the "
                       "transcoder has 2 layers"):
        card_maxima("x", str(tmp_path / "full.npz"), sub)
    other, op = _restricted(cfg, params, (0, 1))
    scan(m, other, op, ctx, config).save(tmp_path / "other.npz")
    with pytest.raises(ConfigError, match="cards are for model layers 0, 1 but the transcoder "
                       "covers 0, 2"):
        card_maxima("x", str(tmp_path / "other.npz"), sub)
    # Self-explanations read the directions of model layers too.
    np.testing.assert_array_equal(directions(sub, sp, [2, 0], [5, 1]),
                                  directions(cfg, params, [2, 0], [5, 1]))
    # End to end: --set 2:F=10x is 10 x the card's maximum of model layer 2's feature F.
    f = int(np.argmax(part.arrays["top_act"][1, :, 0]))
    top = float(part.arrays["top_act"][1, f, 0])
    assert top > 0
    out = tmp_path / "r.json"
    assert main(["steer", "w1 w2 w3", "--model", str(d), "--transcoder", str(tmp_path / "sae"),
                 "--set", f"2:{f}=10x", "--max-new-tokens", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["edits"][0]["layer"] == 2
    assert r["edits"][0]["value"] == pytest.approx(10 * top, rel=1e-6)
    capsys.readouterr()
