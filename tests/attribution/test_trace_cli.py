"""The `cltrace trace` command, bad inputs (one-line errors), graphs without active features,
save/load and the Neuronpedia export."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attribution.export import node_ids, to_neuronpedia
from attribution.graph import Graph
from attribution.prune import graph_scores, prune
from attribution.replacement import unswept_bytes
from attribution.trace import TraceConfig, trace_tokens
from clt.configs import ConfigError
from clt.lm import load_model
from clt.transcoder import save
from cltrace.cli import main
from tests.attribution.helpers import random_transcoder


@pytest.fixture(scope="module")
def smol_transcoder(tmp_path_factory):
    """A random 8-feature PLT for SmolLM2, thresholds low enough for a few active features."""
    m = load_model("smollm2-135m")
    cfg, p = random_transcoder(m.cfg, 8, max_reach=1)
    p = dataclasses.replace(p, log_threshold=jnp.full_like(p.log_threshold, np.log(0.5)))
    d = tmp_path_factory.mktemp("smol_plt")
    save(d, cfg, p)
    return d


def _error_line(capsys):
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cltrace")]
    assert len(err) == 1, err
    return err[0]


def test_cli_trace_writes_graph_and_json(smol_transcoder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["trace", "The capital of France is", "--model", "smollm2-135m", "--transcoder",
               str(smol_transcoder), "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "replacement score" in text and "completeness score" in text and "' Paris'" in text
    g = Graph.load(out / "graph.npz")
    assert (out / "config.json").exists() and g.config["prompt"] == "The capital of France is"
    assert g.token_strings[0] == "<bos>" and g.bos and g.logit_strings[0] == " Paris"
    assert g.ranges.feature.stop > 0 and g.scores.replacement >= 0
    data = json.loads((out / "graph.json").read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids))
    assert {n["feature_type"] for n in data["nodes"]} >= {"embedding", "logit"}
    known = set(ids)
    assert all(lk["source"] in known and lk["target"] in known for lk in data["links"])


def test_cli_trace_with_a_logit_difference_target(smol_transcoder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["trace", "The capital of France is", "--model", "smollm2-135m", "--transcoder",
               str(smol_transcoder), "--out", str(out), "--no-progress", "--target", " London",
               "--minus", " Paris"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "targets: 'London − Paris': logit difference -" in text
    g = Graph.load(out / "graph.npz")
    assert g.custom_targets and g.logit_strings == ["London − Paris"]
    data = json.loads((out / "graph.json").read_text())
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert [n["clerp"] for n in logits] == ["Target London − Paris"]
    assert logits[0]["is_target_logit"]


def test_cli_streamed_trace_prints_the_full_graph(smol_transcoder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["trace", "The capital of France is", "--model", "smollm2-135m", "--transcoder",
               str(smol_transcoder), "--out", str(out), "--no-progress", "--adjacency",
               "stream", "--stream-features", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    g = Graph.load(out / "graph.npz")
    assert g.streamed and g.ranges.feature.stop == 3 and g.n_active_total > 3
    full = g.full_graph
    assert f"full graph: {full.nodes} nodes ({g.n_active_total} features)" in text
    # The scores printed and saved are the full graph's.
    assert g.scores.replacement == pytest.approx(full.replacement_score)
    assert f"replacement score {full.replacement_score:.4f}" in text
    assert "full graph" in text.splitlines()[-1] and text.splitlines()[-1].startswith("page:")


@pytest.mark.parametrize("args,message", [
    (["", "--transcoder", "X"], "the prompt is empty"),
    (["a " * 9000, "--transcoder", "T"], "context of 8192"),
    (["hello", "--transcoder", "/nonexistent/tc"], "no transcoder"),
    (["hello", "--target", " basketballs", "--transcoder", "T"],
     "--target ' basketballs' is 2 tokens (' basket' 'balls'), not one"),
    (["hello", "--minus", " Paris", "--transcoder", "T"], "needs a target"),
    (["hello", "--target-vector", "/nonexistent/v.npy", "--transcoder", "T"], "no file at"),
])
def test_cli_bad_inputs(smol_transcoder, capsys, args, message):
    if args[-1] == "T":
        args = args[:-1] + [str(smol_transcoder)]
    rc = main(["trace", *args, "--model", "smollm2-135m", "--no-progress"])
    assert rc == 2
    assert message in _error_line(capsys)


def test_mismatched_and_incomplete_transcoders(tiny_dirs, tmp_path, capsys):
    m = load_model(tiny_dirs("llama"))
    cfg, p = random_transcoder(m.cfg, 8)
    save(tmp_path / "tc", cfg, p)
    rc = main(["trace", "hello", "--model", "smollm2-135m", "--transcoder",
               str(tmp_path / "tc"), "--no-progress"])
    assert rc == 2 and "transcoder/model mismatch" in _error_line(capsys)
    (tmp_path / "tc" / "transcoder.safetensors").unlink()
    rc = main(["trace", "hello", "--model", "smollm2-135m", "--transcoder",
               str(tmp_path / "tc"), "--no-progress"])
    assert rc == 2 and "missing" in _error_line(capsys)
    # No --transcoder, and none bundled for this model.
    rc = main(["trace", "hello", "--model", str(tiny_dirs("llama")), "--no-progress"])
    assert rc == 2 and "none is bundled" in _error_line(capsys)
    # Layer count mismatch, through the library call.
    short, _ = random_transcoder(m.cfg.replace(n_layers=2), 8)
    with pytest.raises(ConfigError, match="n_layers=2"):
        trace_tokens(m.params, m.cfg, short, random_transcoder(m.cfg.replace(n_layers=2), 8)[1],
                     [5, 6], TraceConfig(prompt="x"))
    with pytest.raises(ConfigError, match="context of 64"):
        trace_tokens(m.params, m.cfg, cfg, p, list(range(3, 70)), TraceConfig(prompt="x"))
    with pytest.raises(ConfigError, match="empty"):
        trace_tokens(m.params, m.cfg, cfg, p, [], TraceConfig(prompt="x"))


def test_no_active_feature_still_gives_a_valid_graph(tiny_dirs, tmp_path):
    m = load_model(tiny_dirs("gpt2"))
    cfg, p = random_transcoder(m.cfg, 8)
    p = dataclasses.replace(p, log_threshold=jnp.full_like(p.log_threshold, np.log(1e6)))
    g = trace_tokens(m.params, m.cfg, cfg, p, [5, 6, 7], TraceConfig(prompt="x"))
    r = g.ranges
    assert r.feature.stop == 0 and r.error.stop == 3 * 3 and len(g.tokens) == 4
    assert len(g.logit_tokens) >= 1 and g.adjacency[r.logit, r.error].any()
    rep, comp = graph_scores(g)
    assert 0 <= rep <= 1 and 0 <= comp <= 1
    res = prune(g)
    assert res.node_mask[r.token.start:].all()
    data = to_neuronpedia(g, res)
    assert len({n["node_id"] for n in data["nodes"]}) == len(data["nodes"])
    g2 = Graph.load(g.save(tmp_path / "g.npz", full=True, exact=True))
    np.testing.assert_array_equal(g2.adjacency, g.adjacency)
    assert g2.token_strings == g.token_strings and g2.config == g.config


def test_node_ids_never_collide():
    """A feature whose index equals an error's position, at the same layer, and a logit whose
    token id equals a feature index: all ids distinct."""
    from tests.attribution.test_prune import hand_graph

    g = hand_graph()
    g.feature_index[:] = 1  # == every error's position
    g.feature_layer[:] = np.arange(6) % 3
    g.feature_pos[:] = np.arange(6) // 3
    ids = node_ids(g)
    assert len(ids) == len(set(ids)) == g.n_nodes


def test_graph_save_load_roundtrip_and_version(tmp_path):
    from tests.attribution.test_prune import hand_graph

    g = hand_graph()
    path = g.save(tmp_path / "out" / "graph.npz", full=True, exact=True)
    assert (tmp_path / "out" / "config.json").exists()
    g2 = Graph.load(tmp_path / "out")
    for f in ("adjacency", "feature_layer", "logit_probs", "error_pos", "tokens"):
        np.testing.assert_array_equal(getattr(g2, f), getattr(g, f))
    assert g2.ranges == g.ranges and g2.label(0).startswith("0:0@0 ")
    z = dict(np.load(path))
    meta = json.loads(str(z["meta"]))
    meta["schema_version"] = 99
    z["meta"] = np.array(json.dumps(meta))
    np.savez(tmp_path / "old.npz", **z)
    with pytest.raises(ConfigError, match="schema 99"):
        Graph.load(tmp_path / "old.npz")


@pytest.mark.parametrize("family,skip,layout", [
    ("llama", True, "slots"), ("gemma3", True, "slots"), ("gpt2", True, "slots"),
    ("llama", False, "values"), ("llama", True, "sources")])
def test_a_last_trace_frees_the_weights_no_row_reads(tiny_dirs, family, skip, layout):
    """`release_model` (a single `cltrace trace`) frees the MLPs and embeddings once the
    forward pass is done, and the transcoder's decoder once its rows are laid out (slots or
    values; kept when each batch gathers them); the graph is the one traced with everything
    kept, edge for edge, and `load_model` then gives a whole model again (it was kept in its
    in-process cache)."""
    m = load_model(tiny_dirs(family))
    cfg, p = random_transcoder(m.cfg, 16, skip=skip)
    config = TraceConfig(prompt="x", batch_size=8,
                         decoder_rows_gb=0.0 if layout == "sources" else None,
                         value_contraction="on" if layout == "values" else "off")
    kept = trace_tokens(m.params, m.cfg, cfg, p, [5, 9, 3, 7], config)
    assert kept.info["decoder_layout"] == layout
    once = jax.tree.map(jnp.copy, p)  # the transcoder of a single trace
    layers = m.params.layers
    mlp = [a for a in (layers.W_in, layers.W_gate, layers.W_out, layers.b_in, layers.b_out,
                       layers.post_mlp_norm_w) if a is not None]
    embeddings = [a for a in (m.params.embed, m.params.pos_embed, m.params.unembed) if a is not None]
    assert unswept_bytes(m.params) == sum(a.nbytes for a in mlp + embeddings)  # the plan's
    freed = trace_tokens(m.params, m.cfg, cfg, once, [5, 9, 3, 7], config, release_model=True)
    np.testing.assert_array_equal(freed.adjacency, kept.adjacency)
    assert freed.scores == kept.scores
    assert all(W.is_deleted() == (layout != "sources") for W in once.W_dec)
    assert not (once.W_enc.is_deleted() or any(W.is_deleted() for W in p.W_dec))
    assert layers.W_in.is_deleted() and layers.W_out.is_deleted() and m.params.embed.is_deleted()
    assert not (layers.W_V.is_deleted() or layers.W_O.is_deleted() or layers.mlp_norm_w.is_deleted()
                or m.params.final_norm_w.is_deleted())
    again = load_model(tiny_dirs(family))
    assert again is not m and not again.params.layers.W_in.is_deleted()
    np.testing.assert_array_equal(
        trace_tokens(again.params, again.cfg, cfg, p, [5, 9, 3, 7], config).adjacency,
        kept.adjacency)


def test_automatic_batch_size(tiny_dirs):
    """batch_size 0: GREEDY_BATCH targets per sweep under a feature cap, FULL_BATCH for a full
    graph, each under batch_memory_gb; a full graph's rows are the same at any batch size."""
    from attribution.trace import FULL_BATCH, GREEDY_BATCH, batch_size

    m = load_model(tiny_dirs("llama"))
    auto = TraceConfig(prompt="x")
    assert auto.batch_size == 0
    assert batch_size(auto, m.cfg, 8) == FULL_BATCH
    assert batch_size(auto, m.cfg, 8, capped=True) == GREEDY_BATCH
    assert batch_size(dataclasses.replace(auto, batch_size=5), m.cfg, 8, capped=True) == 5
    per_target = m.cfg.n_layers * 8 * m.cfg.d_model * 4
    tight = dataclasses.replace(auto, batch_memory_gb=10 * per_target / 2**30)
    assert batch_size(tight, m.cfg, 8) == 10
    cfg, p = random_transcoder(m.cfg, 16, skip=False)
    ids = [5, 9, 3, 7, 2, 8]
    full = trace_tokens(m.params, m.cfg, cfg, p, ids, auto)
    assert full.info["batch_size"] == FULL_BATCH
    small = trace_tokens(m.params, m.cfg, cfg, p, ids, dataclasses.replace(auto, batch_size=4))
    np.testing.assert_allclose(full.adjacency, small.adjacency, rtol=1e-5,
                               atol=1e-6 * float(np.abs(small.adjacency).max()))
    capped = trace_tokens(m.params, m.cfg, cfg, p, ids,
                          dataclasses.replace(auto, max_feature_nodes=3))
    assert capped.info["batch_size"] == GREEDY_BATCH
