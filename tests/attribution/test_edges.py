"""Every edge against an intervention in the frozen model (float64), and the completeness identity.

The reference (`helpers.Reference`) runs `clt.lm.forward` with the captured patterns and norm
scales, the given input embeddings and MLP slots (plus the transcoder's skip through an MLP hook)
and reads the targets from its captures: it shares no code with `attribution.trace`.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attribution.trace import TraceConfig, trace_tokens
from clt.lm import ModelConfig, load_model, random_params
from clt.lm.config import known_config
from tests.attribution.helpers import Reference, calibrate, random_transcoder

IDS = [5, 9, 22, 7, 3, 100]  # BOS (1) is prepended by the tracer
# (family, max_reach, skip, input_point): every family as a PLT and as a CLT with skip reading
# the normalised MLP input; the remaining combinations on llama; a windowed CLT.
# The default suite runs one case per family; the rest are marked slow.
_FAST = {("llama", 1, False, "resid_mid"), ("llama", None, True, "mlp_in"),
         ("llama", None, False, "resid_mid"),  # a CLT without skip: the values layout's case
         ("gpt2", None, False, "mlp_in"),
         ("gemma2", None, True, "mlp_in"), ("gemma3", 1, False, "resid_mid"),
         ("gpt2", None, True, "mlp_in"), ("gemma2", 2, True, "resid_mid")}
CASES = [(f, 1, False, "resid_mid") for f in ("llama", "gemma2", "gemma3", "gpt2")] + \
        [(f, None, True, "mlp_in") for f in ("llama", "gemma2", "gemma3", "gpt2")] + \
        [("llama", None, False, "resid_mid"), ("llama", 1, True, "resid_mid"),
         ("gemma2", 2, True, "resid_mid"),
         # without a skip, reading the normalised MLP input: the values layout's residual path
         # through the frozen norm (`rep.read_rows`)
         ("gemma2", 1, False, "mlp_in"), ("gpt2", None, False, "mlp_in")]
CASES = [c if c in _FAST else pytest.param(*c, marks=pytest.mark.slow) for c in CASES]


def _trace(params, cfg, tc_cfg, tc_params, ids, **kw):
    # Prefixes of 2 positions: every batch runs on the shortest prefix holding its targets.
    config = TraceConfig(prompt="test", dtype="float64",
                         **{"batch_size": 16, "position_bucket": 2, **kw})
    return trace_tokens(params, cfg, tc_cfg, tc_params, ids, config)


def _setup(tiny_dirs, family, reach, skip, point, per=3.0):
    m = load_model(tiny_dirs(family), dtype=jnp.float64)
    tc_cfg, tc_params = random_transcoder(m.cfg, 16, max_reach=reach, skip=skip,
                                          input_point=point, dtype=jnp.float64)
    ids = [m.cfg.bos_token_id] + IDS
    tc_params = calibrate(m.params, m.cfg, tc_cfg, tc_params, ids, per)
    return m.params, m.cfg, tc_cfg, tc_params, ids


def _check_all_edges(graph, ref):
    r = graph.ranges
    targets = list(range(r.feature.start, r.feature.stop)) + list(range(r.logit.start,
                                                                         r.logit.stop))
    sources = list(range(r.token.stop))
    A_ref = ref.interventions(graph, targets, sources)
    A = graph.adjacency[np.ix_(targets, sources)]
    scale = np.abs(A_ref).max()
    np.testing.assert_allclose(A, A_ref, rtol=1e-9, atol=1e-12 * scale)
    # Errors and tokens have no incoming edges; logits no outgoing ones.
    assert not graph.adjacency[r.error.start:r.token.stop].any()
    assert not graph.adjacency[:, r.logit].any()


@pytest.mark.parametrize("layout", ["slots", "sources", "values", "values-g1", "values-chunks"])
@pytest.mark.parametrize("family,reach,skip,point", CASES)
def test_every_edge_is_an_intervention(tiny_dirs, x64, family, reach, skip, point, layout,
                                       monkeypatch):
    """Every decoder layout: laid out slot by slot once, gathered by every batch, or contracted
    at the attention values (`_edges_by_values`; a transcoder with a skip connection falls back
    to the slots), its value slots in groups of `VALUE_GROUP` (3: one short group on these
    3-layer models) or one by one (values-g1), its value matrices made from unit vectors kept
    for every layer in one chunk (values) or made again for each layer in chunks of 7 rows, the
    last padded (values-chunks)."""
    if layout == "values-g1":
        monkeypatch.setattr(importlib.import_module("attribution.trace"), "VALUE_GROUP", 1)
        layout = "values"
    if layout == "values-chunks":
        tiling = importlib.import_module("attribution.tiling")
        monkeypatch.setattr(tiling, "VALUE_CHUNK", 7)
        monkeypatch.setattr(tiling, "KEEP_UNITS", 0)
        layout = "values"
    params, cfg, tc_cfg, tc_params, ids = _setup(tiny_dirs, family, reach, skip, point)
    # Every layout on prefixes of 2 positions (the laid-out ones cut into blocks of 2).
    kw = ({"decoder_rows_gb": 0.0} if layout == "sources" else
          {"decoder_rows_gb": 1.0, "value_contraction": "on" if layout == "values" else "off"})
    graph = _trace(params, cfg, tc_cfg, tc_params, ids[1:], **kw)
    assert graph.info["decoder_layout"] == ("slots" if layout == "values" and skip else layout)
    assert graph.adjacency.dtype == np.float64
    n_feat = graph.ranges.feature.stop
    assert 10 < n_feat < 200, n_feat  # a small graph, but with features at every layer
    assert set(graph.feature_layer) == set(range(cfg.n_layers))
    assert graph.bos and 0 not in graph.feature_pos and 0 not in graph.error_pos
    ref = Reference(params, cfg, tc_cfg, tc_params, ids)
    # Activations in the graph are the transcoder's on the real run.
    np.testing.assert_allclose(
        graph.activation,
        np.asarray(ref.acts)[graph.feature_pos, graph.feature_layer, graph.feature_index],
        rtol=1e-12)
    _check_all_edges(graph, ref)


@pytest.mark.parametrize("family,reach,skip,point", [
    ("llama", 1, False, "resid_mid"), ("gemma2", None, True, "mlp_in"),
    ("gemma2", 2, True, "resid_mid")])
def test_completeness_identity(tiny_dirs, x64, family, reach, skip, point):
    """Each feature's pre-activation = its incoming edges + its bias terms; likewise each logit
    direction's value. The bias terms are what the frozen model gives with every node's
    contribution removed (zero embeddings; MLP slots holding only b_dec, and at the BOS position,
    which is no node, the whole slot), plus b_enc for a feature."""
    params, cfg, tc_cfg, tc_params, ids = _setup(tiny_dirs, family, reach, skip, point)
    graph = _trace(params, cfg, tc_cfg, tc_params, ids[1:])
    ref = Reference(params, cfg, tc_cfg, tc_params, ids)
    r = graph.ranges
    M = jnp.broadcast_to(tc_params.b_dec[:, None, :], ref.m0.shape).at[:, 0].set(ref.m0[:, 0])
    reads, h = ref.run(jnp.zeros_like(ref.e0)[None], M[:, None])
    targets = list(range(r.feature.start, r.feature.stop)) + list(range(r.logit.start,
                                                                         r.logit.stop))
    bias = np.asarray(ref.target_values(graph, reads, h, targets))[0]
    incoming = graph.adjacency[targets].sum(axis=1)
    f = r.feature.stop
    pre = np.asarray(ref.pre)[graph.feature_pos, graph.feature_layer, graph.feature_index]
    b_enc = np.asarray(tc_params.b_enc)[graph.feature_layer, graph.feature_index]
    np.testing.assert_allclose(incoming[:f] + bias[:f] + b_enc, pre, rtol=1e-9, atol=1e-12)
    W_U = np.asarray(params.W_U)
    logits = np.asarray(ref.h_final[-1]) @ W_U  # before any soft-capping
    want = logits[graph.logit_tokens] - logits.mean()
    np.testing.assert_allclose(incoming[f:] + bias[f:], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("skip", [True, False])
def test_float32_graph_matches_float64(tiny_dirs, x64, skip):
    """float32 and bfloat16 against float64; without a skip, contracted at the values."""
    params, cfg, tc_cfg, tc_params, ids = _setup(tiny_dirs, "llama", None, skip, "resid_mid")
    kw = {} if skip else {"value_contraction": "on", "decoder_rows_gb": 1.0, "position_bucket": 0}
    g64 = _trace(params, cfg, tc_cfg, tc_params, ids[1:], **kw)
    p32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    t32 = jax.tree.map(lambda a: a.astype(jnp.float32), tc_params)
    g32 = trace_tokens(p32, cfg, tc_cfg, t32, ids[1:], TraceConfig(prompt="t", **kw))
    gbf = trace_tokens(p32, cfg, tc_cfg, t32, ids[1:], TraceConfig(prompt="t", dtype="bfloat16",
                                                                   **kw))
    if not skip:
        assert {g.info["decoder_layout"] for g in (g64, g32, gbf)} == {"values"}
    scale = np.abs(g64.adjacency).max()
    assert g32.adjacency.dtype == np.float32
    np.testing.assert_allclose(g32.adjacency, g64.adjacency, atol=1e-5 * scale)
    np.testing.assert_allclose(gbf.adjacency, g64.adjacency, atol=3e-2 * scale)


def test_feature_cap_keeps_a_consistent_subgraph(tiny_dirs, x64):
    """max_feature_nodes: the kept rows and columns are those of the full graph."""
    params, cfg, tc_cfg, tc_params, ids = _setup(tiny_dirs, "gemma3", None, False, "resid_mid")
    full = _trace(params, cfg, tc_cfg, tc_params, ids[1:])
    capped = _trace(params, cfg, tc_cfg, tc_params, ids[1:], max_feature_nodes=20,
                    update_interval=1, batch_size=8)
    assert capped.ranges.feature.stop == 20 and capped.n_active_total == full.ranges.feature.stop
    key = {(a, b, c): i for i, (a, b, c) in enumerate(zip(
        full.feature_layer, full.feature_pos, full.feature_index))}
    sel = np.array([key[k] for k in zip(capped.feature_layer, capped.feature_pos,
                                        capped.feature_index)])
    fr = full.ranges
    keep = np.concatenate([sel, np.arange(fr.error.start, fr.logit.stop)])
    np.testing.assert_allclose(capped.adjacency, full.adjacency[np.ix_(keep, keep)], rtol=1e-12)
    # Greedy by influence: the strongest direct logit sources are among the kept features.
    direct = np.abs(full.adjacency[fr.logit, fr.feature]).sum(0)
    assert set(np.argsort(-direct)[:5]) <= set(sel)


@pytest.mark.slow  # ~80 s on 2 CPU cores
def test_sampled_edges_on_a_30_layer_smollm2_shaped_model(x64):
    cfg = known_config("smollm2-135m").replace(vocab_size=512, name="smollm2-shaped")
    assert isinstance(cfg, ModelConfig) and cfg.n_layers == 30
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          random_params(cfg, jax.random.key(0), scale=0.05))
    ids = [cfg.bos_token_id, 17, 301, 42, 99, 7]
    tc_cfg, tc_params = random_transcoder(cfg, 16, max_reach=None, skip=True,
                                          dtype=jnp.float64)
    tc_params = calibrate(params, cfg, tc_cfg, tc_params, ids, 1.5)
    graph = _trace(params, cfg, tc_cfg, tc_params, ids[1:], batch_size=32)
    ref = Reference(params, cfg, tc_cfg, tc_params, ids)
    r = graph.ranges
    rng = np.random.default_rng(0)
    # Targets at late layers and logits (long paths); sources of every kind.
    late = np.nonzero(graph.feature_layer >= 20)[0]
    targets = list(rng.choice(late, 6, replace=False)) + list(range(r.logit.start, r.logit.stop))
    feats = np.nonzero(graph.feature_layer < 20)[0]
    sources = list(rng.choice(feats, 16, replace=False)) + \
        list(rng.choice(np.arange(r.error.start, r.error.stop), 6, replace=False)) + \
        list(range(r.token.start, r.token.stop))
    A_ref = ref.interventions(graph, targets, sources)
    A = graph.adjacency[np.ix_(targets, sources)]
    assert np.abs(A_ref).max() > 0
    np.testing.assert_allclose(A, A_ref, rtol=1e-9, atol=1e-12 * np.abs(A_ref).max())
