"""The neurons-vs-features case study (scripts/cases/neurons_vs_features.py): N80 on a hand-built
graph with hand-computed influence, card readability on hand-made cards, and the whole script on a
tiny Llama with a random transcoder and its cards (both graphs traced, their pruned node counts
equal to what their saved graphs hold, neuron cards over the transcoder cards' contexts, the
report and results written)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from attribution.graph import Graph, error_nodes

CASES = Path(__file__).resolve().parents[1] / "scripts" / "cases"
PROMPTS = ["w1 w5 w9 w13 w2", "w7 w11 w3"]


@pytest.fixture(scope="module")
def N():
    sys.path.insert(0, str(CASES))
    try:
        spec = importlib.util.spec_from_file_location("case_neurons_vs_features",
                                                      CASES / "neurons_vs_features.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(CASES))


def _graph(weights) -> Graph:
    """Features (layer 0, position 1) that each write only to one logit (p = 1) with these
    weights; the token feeds every feature. A node's influence is then its share of the logit's
    |inputs|: |w_i| / sum |w|."""
    F = len(weights)
    el, ep = error_nodes(1, 2, True)
    E, T = len(el), 2
    n = F + E + T + 1
    A = np.zeros((n, n), np.float32)
    A[n - 1, :F] = weights
    A[:F, F + E + 1] = 1.0
    return Graph(tokens=np.array([1, 5], np.int32), token_strings=["<bos>", " a"],
                 feature_layer=np.zeros(F, np.int32), feature_pos=np.ones(F, np.int32),
                 feature_index=np.arange(F, dtype=np.int32), activation=np.ones(F, np.float32),
                 error_layer=el, error_pos=ep, logit_tokens=np.array([7], np.int32),
                 logit_strings=[" b"], logit_probs=np.array([1.0], np.float32), adjacency=A,
                 n_layers=1, bos=True)


def test_n80_by_hand(N):
    g = _graph([5.0, -3.0, 2.0])  # influences 0.5, 0.3, 0.2
    assert N.n_for_share(g, 0.79) == 2  # 0.5 + 0.3
    assert N.n_for_share(g, 0.81) == 3
    assert N.n_for_share(g, 0.45) == 1
    assert N.n_for_share(g, 0.55) == 2
    assert N.n_for_share(_graph([2.0, 1.0, 1.0]), 0.6) == 3  # 0.5 + 0.25: the tie kept
    assert N.n_for_share(_graph([0.0, 0.0]), 0.8) == 0  # no feature influence


def test_readability_by_hand(N):
    vocab = {10: " Paris", 11: "paris", 12: " the", 13: "\n"}
    card = {"label": "Paris", "d": 0.01,
            "top": [[3.0, [12, 10], [0, 255], 1], [2.0, [11, 12], [255, 0], 0],
                    [1.5, [12, 12], [0, 255], 1], [1.0, [10, 13], [255, 0], 0]]}
    r = N.readability(card, vocab, " Paris")
    assert r["fired"] == ["paris", "paris", "the", "paris"] and r["top_token"] == "paris"
    assert r["top_share"] == 0.75 and r["one_token"] and r["on_prompt_token"]
    r = N.readability(card, vocab, " London")
    assert not r["on_prompt_token"]
    empty = N.readability({"label": "never", "d": 0.0, "top": []}, vocab, " a")
    assert empty["top_share"] == 0 and not empty["one_token"] and not empty["fired"]
    rows = [r, empty]
    assert N.card_summary(rows) == {"one_token": 0.5, "on_prompt_token": 0.0,
                                    "top_share": 0.375, "never_active": 0.5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (HF directory, word-level tokenizer), a calibrated random transcoder saved
    with its feature cards next to it."""
    from clt import transcoder as tcm
    from clt.lm import load_model
    from tests.attribution.helpers import calibrate, random_transcoder
    from tests.clt.hf_tiny import make_tiny
    from tests.clt.tiny_train import tiny_tokenizer
    from viewer.features import CARDS_FILE, FeaturesConfig, scan

    root = tmp_path_factory.mktemp("nvf")
    model_dir = root / "tiny_llama"
    make_tiny("llama", model_dir)
    tiny_tokenizer().backend.save(str(model_dir / "tokenizer.json"))
    m = load_model(str(model_dir), dtype=jnp.float32)
    tc_cfg, tc = random_transcoder(m.cfg, 24)
    ids = [m.cfg.bos_token_id] + m.tokenizer.encode(PROMPTS[0], add_bos=False)
    tc = calibrate(m.params, m.cfg, tc_cfg, tc, ids, per_layer_pos=3.0)
    tc_dir = tcm.save(root / "transcoder", tc_cfg.replace(model_name=str(model_dir)), tc)
    rng = np.random.default_rng(0)
    ctx = rng.integers(3, m.cfg.vocab_size, (12, 16)).astype(np.int32)
    ctx[:, 0] = m.cfg.bos_token_id
    config = FeaturesConfig(transcoder=str(tc_dir), n_contexts=12, context_length=16,
                            batch_size=4, top_k=4, n_samples=2, window=6, n_output_tokens=3)
    scan(m, tc_cfg, tc, ctx, config).save(Path(tc_dir) / CARDS_FILE)
    return model_dir, tc_dir, m


def test_the_script_on_a_tiny_model(N, tiny, tmp_path):
    from attribution.prune import prune

    model_dir, tc_dir, m = tiny
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--transcoder", str(tc_dir), "--out", str(out),
            "--top", "3", "--max-feature-nodes", "200", "--detail", "1"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    report = N.main(argv)
    res = json.loads((out / "results.json").read_text())
    assert [r["prompt"] for r in res["prompts"]] == PROMPTS
    for i, r in enumerate(res["prompts"]):
        # The neurons kept per layer and position match the transcoder graph's active features.
        assert r["neuron_top_k"] == max(1, round(r["transcoder_active_per_site"]))
        for kind in ("transcoder", "neurons"):
            g = Graph.load(out / f"graph{i:02d}_{kind}.npz")
            assert g.neurons == (kind == "neurons")
            row = r[kind]
            # The saved (slim) graph holds the pruned graph: its own pruning gives the counts.
            kept = prune(g, 0.8, 0.98).node_mask
            assert row["pruned_features"] == int(kept[g.ranges.feature].sum())
            assert row["pruned_errors"] == int(kept[g.ranges.error].sum())
            assert 0 < row["n80"] <= row["feature_nodes"]
            assert row["replacement"] == pytest.approx(g.scores.replacement)
            assert len(row["top_nodes"]) == 3 and row["cards"]
            assert (out / f"graph{i:02d}_{kind}.html").exists()
    cards = N.FeatureCards.load(out / "neuron_cards.npz")
    assert (cards.n_layers, cards.n_features) == (m.cfg.n_layers, m.cfg.d_mlp)
    assert cards.meta["n_contexts"] == 12  # the transcoder cards' contexts
    text = report.read_text()
    assert "## Summary" in text and "MLP neurons" in text and "N80" in text
    # A second run reuses the neuron cards.
    mtime = (out / "neuron_cards.npz").stat().st_mtime_ns
    N.main(argv[:-4] + ["--prompt", PROMPTS[1]])
    assert (out / "neuron_cards.npz").stat().st_mtime_ns == mtime
