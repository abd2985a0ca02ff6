"""User-chosen attribution targets (`TraceConfig.target` / `minus` / `target_vector`): a token
that is not among the most probable, a logit difference, a direction after the final norm.

Every edge into a target is checked against an intervention in the frozen model in float64
(`helpers.Reference`, which shares no code with the tracer; the test writes each target's
direction itself), a difference's row against the difference of its two tokens' rows, and the
targets' weights in influence against a truncated power series written out here.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attribution.export import node_ids, to_neuronpedia
from attribution.prune import node_influence
from attribution.trace import Targets, TraceConfig, resolve_targets, trace_tokens
from clt.configs import ConfigError
from clt.lm import load_model
from tests.attribution.helpers import Reference, calibrate, random_transcoder

IDS = [5, 9, 22, 7, 3, 100]


@pytest.fixture
def setup(tiny_dirs, x64):
    m = load_model(tiny_dirs("llama"), dtype=jnp.float64)
    tc_cfg, tc_params = random_transcoder(m.cfg, 16, max_reach=None, skip=True,
                                          input_point="mlp_in", dtype=jnp.float64)
    ids = [m.cfg.bos_token_id] + IDS
    tc_params = calibrate(m.params, m.cfg, tc_cfg, tc_params, ids, 3.0)
    return m.params, m.cfg, tc_cfg, tc_params, ids


def _trace(setup, targets=None, **kw):
    params, cfg, tc_cfg, tc_params, ids = setup
    config = TraceConfig(prompt="test", dtype="float64",
                         **{"batch_size": 16, "position_bucket": 2, **kw})
    return trace_tokens(params, cfg, tc_cfg, tc_params, ids[1:], config, targets=targets)


def _tokens(setup, ref):
    """A token far down the ranking (rank 40: no default logit node) and the second one."""
    params = setup[0]
    logits = np.asarray(ref.h_final[-1]) @ np.asarray(params.W_U)
    order = np.argsort(-logits, kind="stable")
    return int(order[40]), int(order[1])


def test_custom_target_edges_are_interventions(setup, x64):
    params, cfg, tc_cfg, tc_params, ids = setup
    ref = Reference(params, cfg, tc_cfg, tc_params, ids)
    a, b = _tokens(setup, ref)
    W = np.asarray(params.W_U)
    v = np.random.default_rng(0).normal(size=cfg.d_model)
    cases = [(Targets(tokens=(a,)), [W[:, a] - W.mean(axis=1)]),
             (Targets(tokens=(a,), minus=(b,)), [W[:, a] - W[:, b]]),
             (Targets(tokens=(a, b), minus=(b,)), [W[:, a] - W[:, b], np.zeros(cfg.d_model)]),
             (Targets(vector=tuple(v), vector_name="v"), [v])]
    default = _trace(setup)
    assert a not in default.logit_tokens  # the custom target is not a default logit node
    for targets, dirs in cases:
        g = _trace(setup, targets)
        r = g.ranges
        assert g.custom_targets and r.logit.stop - r.logit.start == len(dirs)
        np.testing.assert_allclose(g.logit_weights()[r.logit], 1.0 / len(dirs))
        tgt = list(range(r.logit.start, r.logit.stop))
        src = list(range(r.token.stop))
        A_ref = ref.interventions(g, tgt, src, directions=dict(zip(tgt, dirs)))
        A = g.adjacency[np.ix_(tgt, src)]
        np.testing.assert_allclose(A, A_ref, rtol=1e-9, atol=1e-12 * np.abs(A_ref).max())
        # Feature rows do not depend on the targets.
        np.testing.assert_array_equal(g.adjacency[r.feature, :r.token.stop],
                                      default.adjacency[r.feature, :r.token.stop])
    # b - b is no direction at all: its row is zero.
    g = _trace(setup, Targets(tokens=(a, b), minus=(b,)))
    assert not g.adjacency[g.ranges.logit.start + 1].any()


def test_difference_row_is_the_difference_of_its_token_rows(setup, x64):
    ref = Reference(*setup)
    a, b = _tokens(setup, ref)
    both = _trace(setup, Targets(tokens=(a, b)))
    diff = _trace(setup, Targets(tokens=(a,), minus=(b,)))
    lg, n_src = both.ranges.logit.start, both.ranges.token.stop
    np.testing.assert_allclose(diff.adjacency[diff.ranges.logit.start, :n_src],
                               both.adjacency[lg, :n_src] - both.adjacency[lg + 1, :n_src],
                               rtol=1e-12, atol=1e-13 * np.abs(both.adjacency[lg:]).max())
    assert diff.logit_strings == [f"{a} − {b}"]
    t = diff.info["targets"][0]
    assert t["kind"] == "logit difference" and t["probs"][0] < t["probs"][1]
    assert t["tokens"] == [a, b]
    assert t["logit_difference"] < 0  # rank 40 against rank 1


def test_influence_follows_the_targets(setup, x64):
    """Node influence under custom targets = sum over paths of normalised |edges| weighted by
    1/n per target, as a truncated series (the graph is acyclic: the series ends)."""
    ref = Reference(*setup)
    a, b = _tokens(setup, ref)
    g = _trace(setup, Targets(tokens=(a, b)))
    A = np.abs(g.adjacency)
    s = A.sum(axis=1, keepdims=True)
    B = np.divide(A, s, out=np.zeros_like(A), where=s > 0)
    w = np.zeros(g.n_nodes)
    w[g.ranges.logit] = 0.5
    want, term = np.zeros(g.n_nodes), w.copy()
    for _ in range(g.n_nodes):
        term = term @ B
        if not term.any():
            break
        want += term
    np.testing.assert_allclose(node_influence(g), want, rtol=1e-10, atol=1e-14)
    default = _trace(setup)
    assert not np.allclose(node_influence(default)[g.ranges.feature],
                           want[g.ranges.feature])


def test_streamed_and_capped_graphs_weigh_the_targets(setup, x64):
    ref = Reference(*setup)
    a, b = _tokens(setup, ref)
    t = Targets(tokens=(a,), minus=(b,))
    dense = _trace(setup, t)
    streamed = _trace(setup, t, adjacency="stream", stream_features=5)
    assert streamed.streamed
    for name in ("replacement", "completeness"):
        assert getattr(streamed.scores, name) == pytest.approx(getattr(dense.scores, name),
                                                               rel=1e-9)
    capped = _trace(setup, t, max_feature_nodes=6)
    # Greedy by influence on the target: the feature with the strongest direct edge into it is
    # visited first.
    r = dense.ranges
    direct = np.abs(dense.adjacency[r.logit.start, r.feature])
    sel = {(la, p, f) for la, p, f in zip(capped.feature_layer, capped.feature_pos,
                                          capped.feature_index)}
    i = int(np.argmax(direct))
    assert (dense.feature_layer[i], dense.feature_pos[i], dense.feature_index[i]) in sel


def test_graph_file_and_neuronpedia_json_keep_the_targets(setup, x64, tmp_path):
    from attribution.graph import Graph

    g = _trace(setup, Targets(vector=tuple(np.ones(setup[1].d_model)), vector_name="vector v"))
    back = Graph.load(g.save(tmp_path / "g.npz"))
    assert back.custom_targets and back.logit_strings == ["vector v"]
    np.testing.assert_array_equal(back.target_weights, g.target_weights)
    ids = node_ids(g)
    assert len(set(ids)) == len(ids)
    js = to_neuronpedia(g)
    logits = [n for n in js["nodes"] if n["feature_type"] == "logit"]
    assert logits and all(n["is_target_logit"] for n in logits)
    assert logits[0]["clerp"] == "Target vector v" and logits[0]["token_prob"] == 0.0


class _Tok:
    """A tokenizer splitting on '|' (each piece one token id: its length)."""

    def encode(self, s, add_bos=False):
        return [len(p) for p in s.split("|")]

    def token_strings(self, ids):
        return ["x" * i for i in ids]


def test_resolve_targets_refuses_bad_input(tmp_path):
    tok = _Tok()
    t = resolve_targets(TraceConfig(prompt="p", target=("abc",), minus=("de",)), tok, 4)
    assert t == Targets(tokens=(3,), minus=(2,))
    with pytest.raises(ConfigError, match=r"'ab\|c' is 2 tokens \('xx' 'x'\), not one"):
        resolve_targets(TraceConfig(prompt="p", target=("ab|c",)), tok, 4)
    np.save(tmp_path / "v.npy", np.ones(3))
    with pytest.raises(ConfigError, match=r"shape \(3,\), the model needs a \[4\] direction"):
        resolve_targets(TraceConfig(prompt="p", target_vector=str(tmp_path / "v.npy")), tok, 4)
    np.save(tmp_path / "z.npy", np.zeros(4))
    with pytest.raises(ConfigError, match="finite and non-zero"):
        resolve_targets(TraceConfig(prompt="p", target_vector=str(tmp_path / "z.npy")), tok, 4)
    for bad, msg in [({"minus": ("a",)}, "needs a target"),
                     ({"target": ("a", "b", "c"), "minus": ("x", "y")}, "one per target"),
                     ({"target": ("a",), "target_vector": "v.npy"}, "not both"),
                     ({"target": ("a", "a")}, "repeated"),
                     ({"target_vector": "v.txt"}, "must be a .npy")]:
        with pytest.raises(ConfigError, match=msg):
            TraceConfig(prompt="p", **bad)


def test_logit_direction_against_float64_and_the_eager_ops():
    """A logit's direction (its unembedding column minus the vocabulary's mean, or minus another
    column) against a float64 sum, and bit for bit against the eager ops it replaced (two
    programs instead of ~12; fused into one, the mean's sum changed order by an ulp)."""
    import jax

    from attribution.trace import logit_direction

    # A vocabulary as wide as SmolLM2's: over a narrow one the fused sum kept its order.
    W = np.random.default_rng(0).normal(size=(64, 49152)).astype(np.float32)
    Wj = jax.device_put(W)
    for plus, minus in (([5, 17, 300], None), ([4], [9]), (np.arange(10), None)):
        got = np.asarray(logit_direction(Wj, plus, minus))
        base = W.astype(np.float64).mean(1)[None] if minus is None else W[:, minus].T
        np.testing.assert_allclose(got, W[:, plus].T - base, rtol=0, atol=1e-6)
        eager = Wj[:, jnp.asarray(plus)].T - (Wj.mean(axis=1)[None] if minus is None
                                               else Wj[:, jnp.asarray(minus)].T)
        np.testing.assert_array_equal(got, np.asarray(eager))
