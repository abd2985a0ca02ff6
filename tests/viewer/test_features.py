"""Feature cards against brute force: the one-pass scan's top examples, samples and density equal
those computed from every activation at once; top output tokens equal a numpy reference of the
decoders through the final norm and the unembedding; the file round-trips; bad files fail in one
line."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from clt.configs import ConfigError
from clt.data import open_contexts
from clt.lm.model import forward
from clt.transcoder import encode
from tests.attribution.helpers import random_transcoder
from tests.clt.tiny_train import tiny_model, write_corpus
from viewer.features import FeatureCards, FeaturesConfig, cards_for, scan, top_output_tokens

K, Q, W = 6, 3, 8


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cards")
    m = tiny_model()
    tc_cfg, tc = random_transcoder(m.cfg, 16, seed=3)
    corpus = write_corpus(tmp / "c.txt", n_docs=60)
    ctx = open_contexts(str(corpus), m.tokenizer, 24, cache_dir=tmp).take(0, 21)  # 21: padded
    config = FeaturesConfig(transcoder="t", n_contexts=21, context_length=24, batch_size=8,
                            top_k=K, n_samples=Q, window=W, n_output_tokens=5)
    cards = scan(m, tc_cfg, tc, ctx, config)
    _, cap = forward(m.params, m.cfg, jnp.asarray(ctx), capture=("resid_mid",))
    acts = np.array(encode(tc_cfg, tc, jnp.moveaxis(cap.resid_mid, 0, 2)))  # [ctx pos layer f]
    acts[:, 0] = 0  # the BOS position is left out of the scan
    return m, tc_cfg, tc, ctx, cards, acts, tmp


def test_top_examples_and_density_match_brute_force(scanned):
    _, tc_cfg, _, ctx, cards, acts, _ = scanned
    a = cards.arrays
    L, F = tc_cfg.n_layers, tc_cfg.n_features
    for layer in range(L):
        for f in range(F):
            every = acts[:, :, layer, f]
            want = np.sort(every.ravel())[::-1][:K]
            np.testing.assert_allclose(a["top_act"][layer, f], np.where(want > 0, want, 0),
                                       rtol=1e-5, atol=1e-7)
            assert a["density"][layer, f] == pytest.approx((every[:, 1:] > 0).mean(), abs=1e-6)
    # Each stored example points at a token where the feature has that activation, and its
    # window holds the activations around it (as uint8 of the feature's max).
    ids = cards.arrays["vocab_ids"]
    assert set(np.unique(a["contexts"])) <= set(ids)
    for layer, f in [(0, 0), (1, 7), (2, 15)]:
        c = cards.card(layer, f)
        top = a["top_act"][layer, f, 0]
        for j, (act, toks, win, at) in enumerate(c["top"]):
            hits = np.argwhere(np.isclose(acts[:, :, layer, f], act, rtol=0, atol=6e-5))
            assert len(hits)
            ci, pi = hits[0]
            start = pi - at
            np.testing.assert_array_equal(toks, ctx[ci, start:start + W])
            np.testing.assert_allclose(np.array(win) / 255, acts[ci, start:start + W, layer, f]
                                       / top, atol=1 / 255)
            if j == 0:
                assert win[at] == 255
        # Samples: activating tokens (all > 0), sorted by activation, real activations.
        smp = [s[0] for s in c["smp"]]
        assert smp == sorted(smp, reverse=True) and all(s > 0 for s in smp)
        for s in smp:
            assert np.isclose(acts[:, :, layer, f], s, rtol=0, atol=6e-5).any()


def test_cards_read_together_are_each_card(scanned):
    """`FeatureCards.cards` reads many features at once (one gather per array): each card
    equals the card read alone, its examples are the positive ones stored for it, in order, and
    labels go to their own feature."""
    _, tc_cfg, _, _, cards, _, _ = scanned
    a = cards.arrays
    pairs = [(layer, f) for layer in range(tc_cfg.n_layers) for f in range(tc_cfg.n_features)]
    pairs = pairs[::-1] + [pairs[3]]  # any order, a repeat
    labels = [f"label {k}" if k % 5 == 0 else "" for k in range(len(pairs))]
    together = cards.cards([p[0] for p in pairs], [p[1] for p in pairs], labels)
    assert len(together) == len(pairs)
    for (layer, f), label, c in zip(pairs, labels, together):
        assert c == cards.card(layer, f, label)
        assert c["label"] == (label or c["auto"])
        for p in ("top", "smp"):
            acts = a[f"{p}_act"][layer, f]
            assert [e[0] for e in c[p]] == [round(float(x), 4) for x in acts[acts > 0]]
    assert cards.cards([], []) == []


def test_samples_are_spread_over_the_range(scanned):
    """Random samples, not the top: over all features most samples are below the top-k."""
    _, _, _, _, cards, _, _ = scanned
    a = cards.arrays
    below = a["smp_act"][..., 0] < a["top_act"][..., -1]
    assert below.mean() > 0.5


@pytest.mark.parametrize("variant", ["rmsnorm", "gemma_offset", "layernorm"])
def test_top_output_tokens_match_numpy(scanned, variant):
    m, tc_cfg, tc, *_ = scanned
    cfg = m.cfg
    if variant == "gemma_offset":
        cfg = dataclasses.replace(cfg, norm_offset=1.0)
    elif variant == "layernorm":
        cfg = dataclasses.replace(cfg, norm="layernorm")
    out = top_output_tokens(m.params, cfg, tc_cfg, tc, n=5)
    W_U = np.asarray(m.params.W_U, np.float64)
    w = np.asarray(m.params.final_norm_w, np.float64) + cfg.norm_offset
    for s in range(tc_cfg.n_layers):
        d = np.asarray(tc.W_dec[s], np.float64).sum(axis=1)
        if cfg.norm == "layernorm":
            d = d - d.mean(-1, keepdims=True)
        logits = (d * w) @ W_U
        np.testing.assert_array_equal(out["out_pos_tok"][s], np.argsort(-logits, axis=1)[:, :5])
        np.testing.assert_array_equal(out["out_neg_tok"][s], np.argsort(logits, axis=1)[:, :5])
        np.testing.assert_allclose(out["out_pos_val"][s], -np.sort(-logits, axis=1)[:, :5],
                                   rtol=1e-4, atol=1e-6)


def test_cards_round_trip_and_page_payload(scanned):
    *_, cards, _, tmp = scanned
    path = cards.save(tmp / "feature_cards.npz")
    back = FeatureCards.load(path)
    assert back.meta == json.loads(json.dumps(cards.meta))
    for name, v in cards.arrays.items():
        np.testing.assert_array_equal(back.arrays[name], v)
    payload = cards_for(back, [1, 1, 2], [3, 3, 4], labels={(2, 4): "my label"})
    assert set(payload["cards"]) == {"1_3", "2_4"}
    assert payload["cards"]["2_4"]["label"] == "my label"
    # The provisional label (its rule: tests/viewer/test_labels.py).
    assert payload["cards"]["1_3"]["label"] == back.auto_label(back.card(1, 3))
    used = {t for c in payload["cards"].values() for ex in c["top"] + c["smp"] for t in ex[1]}
    assert used <= {int(k) for k in payload["vocab"]}


def test_bad_cards_files_fail_in_one_line(scanned, tmp_path):
    *_, cards, _, _ = scanned
    good = cards.save(tmp_path / "good.npz")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ConfigError, match="truncated or corrupt") as e:
        FeatureCards.load(cut)
    assert "\n" not in str(e.value)
    other = FeatureCards({**cards.meta, "schema_version": 99}, cards.arrays).save(
        tmp_path / "v99.npz")
    with pytest.raises(ConfigError, match="schema 99 is not supported"):
        FeatureCards.load(other)
    with pytest.raises(ConfigError, match="no feature cards"):
        FeatureCards.load(tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match="build cards for its transcoder"):
        cards.check(cards.n_layers + 1, cards.n_features)


def test_cltrace_features_writes_next_to_the_transcoder(pipeline):
    cards = FeatureCards.load(pipeline.transcoder_dir)  # the directory finds feature_cards.npz
    assert pipeline.cards.exists() and cards.meta["transcoder"] == str(pipeline.transcoder_dir)
    assert cards.meta["n_contexts"] <= 48 and cards.arrays["top_act"].shape[-1] == 8
    assert (cards.arrays["top_act"][..., 0] > 0).mean() > 0.5  # most features fire somewhere
