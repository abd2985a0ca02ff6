"""Neuron graphs (`TraceConfig.neurons`, attribution/neurons.py): the MLPs linearised at the
prompt reproduce their outputs and the model's logits; every edge equals a float64 intervention
on a tiny model of each MLP family (gated SiLU/GELU, GPT-2's non-gated GELU with biases, Gemma's
post-MLP norm), with every unit kept and with the rest folded into the error ("other neurons")
nodes; with every unit kept completeness is 1 up to the biases.

The reference computes each unit's value, frozen factor and write here, from the weights
(`clt.lm.model.activation`), and runs `clt.lm.forward` through `helpers.Reference.run`: it
shares no code with attribution.neurons or attribution.trace."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attribution import replacement as rep
from attribution.trace import TraceConfig, trace_tokens
from clt.configs import ConfigError
from clt.lm import forward, load_model
from clt.lm.model import FREEZABLE, activation, logits_of
from tests.attribution.helpers import Reference

IDS = [5, 9, 22, 7, 3, 100]
FAMILIES = ["llama", "gemma3", "gpt2"]  # gated SiLU; gated GELU + post-MLP norm; GELU + biases


class _Neurons:
    """Every unit's activation, factor and decoder row on the prompt, in float64 numpy."""

    def __init__(self, params, cfg, ids):
        _, cap = forward(params, cfg, jnp.asarray(ids)[None],
                         capture=FREEZABLE + ("mlp_in", "mlp_out"))
        n = np.asarray(cap.mlp_in[:, 0], np.float64)  # [layer pos d_model]
        lp = params.layers
        up = np.einsum("lpd,ldm->lpm", n, np.asarray(lp.W_in))
        if lp.b_in is not None:
            up = up + np.asarray(lp.b_in)[:, None]
        if cfg.mlp == "gated":
            gate = np.asarray(activation(cfg.activation, jnp.asarray(
                np.einsum("lpd,ldm->lpm", n, np.asarray(lp.W_gate)))))
            hidden, factor = gate * up, gate
        else:
            hidden = np.asarray(activation(cfg.activation, jnp.asarray(up)))
            factor = hidden / up
        dec = np.asarray(lp.W_out, np.float64)
        bias = np.zeros((cfg.n_layers, 1, cfg.d_model)) if lp.b_out is None else \
            np.asarray(lp.b_out)[:, None]
        if cfg.post_mlp_norm:
            s = np.asarray(cap.post_mlp_norm_scale[:, 0])[..., None]  # [layer pos 1]
            w = np.asarray(lp.post_mlp_norm_w) + cfg.norm_offset
            hidden, factor = hidden * s, factor * s
            dec = dec * w[:, None, :]
            bias = bias * w[:, None, :] * s
        self.acts = np.swapaxes(hidden, 0, 1)  # [pos layer d_mlp]
        self.factor = np.swapaxes(factor, 0, 1)
        self.dec, self.bias = dec, bias  # [layer d_mlp d_model], [layer pos|1 d_model]
        self.mlp_out = np.asarray(cap.mlp_out[:, 0], np.float64)

    def chosen(self, top_k: int) -> np.ndarray:
        if top_k == 0:
            return self.acts
        size = np.abs(self.acts) * np.linalg.norm(self.dec, axis=-1)[None]
        keep = np.argsort(-size, axis=-1, kind="stable")[..., :top_k]
        out = np.zeros_like(self.acts)
        np.put_along_axis(out, keep, np.take_along_axis(self.acts, keep, -1), -1)
        return out


class _NeuronReference(Reference):
    """helpers.Reference with the MLP units as the features (targets read through their frozen
    factors, sources write their decoder rows into their own layer)."""

    def __init__(self, params, cfg, ids, units: _Neurons, acts):
        self.params, self.cfg = params, cfg
        self.tok = jnp.asarray(ids)[None]
        _, self.cap = forward(params, cfg, self.tok,
                              capture=FREEZABLE + ("mlp_in", "mlp_out", "resid_final"))

        class _Cfg:
            input_point = "mlp_in"

        class _Params:
            W_skip = None
            W_dec = tuple(units.dec[s][:, None, :] for s in range(cfg.n_layers))

        self.tc_cfg, self.tc_params, self.units = _Cfg(), _Params(), units
        self.acts = acts
        recon = np.einsum("plm,lmd->lpd", acts, units.dec)
        self.mlp_out = units.mlp_out
        self.error = units.mlp_out - recon
        self.m0 = jnp.asarray(units.mlp_out)
        from clt.lm.model import embed

        T = self.tok.shape[1]
        self.e0 = embed(params, cfg, self.tok, jnp.arange(T)[None])[0]

    def target_values(self, graph, reads, h, targets, directions=None):
        r = graph.ranges
        out = []
        for t in targets:
            if r.feature.start <= t < r.feature.stop:
                layer, pos, f = (int(graph.feature_layer[t]), int(graph.feature_pos[t]),
                                 int(graph.feature_index[t]))
                w = self.units.factor[pos, layer, f] * self.params.layers.W_in[layer][:, f]
                out.append(reads[layer, :, pos] @ w)
            else:
                v = int(graph.logit_tokens[t - r.logit.start])
                W_U = self.params.W_U
                out.append(h[:, -1] @ (W_U[:, v] - W_U.mean(axis=1)))
        return jnp.stack(out, axis=1)


def _model(tiny_dirs, family):
    m = load_model(tiny_dirs(family), dtype=jnp.float64)
    return m.params, m.cfg, [m.cfg.bos_token_id] + IDS


@pytest.mark.parametrize("family", FAMILIES)
def test_linearised_mlps_reproduce_the_model(tiny_dirs, x64, family):
    params, cfg, ids = _model(tiny_dirs, family)
    units = _Neurons(params, cfg, ids)
    # Every unit's write (activation x decoder row) plus the bias is the MLP's output.
    recon = np.einsum("plm,lmd->lpd", units.acts, units.dec) + units.bias
    np.testing.assert_allclose(recon, units.mlp_out, rtol=1e-9, atol=1e-12)
    rm, acts, factors, _, _ = rep.build_neurons(params, cfg, np.asarray(ids), 0)
    np.testing.assert_allclose(np.asarray(acts), units.acts, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(np.asarray(factors), units.factor, rtol=1e-9, atol=1e-14)
    # With every unit kept, the error nodes hold the bias only; the linear model with the MLP
    # slots substituted gives the model's logits.
    np.testing.assert_allclose(np.asarray(rm.error), np.broadcast_to(units.bias, rm.error.shape),
                               atol=1e-10)
    logits, _ = forward(params, cfg, jnp.asarray(ids)[None])
    np.testing.assert_allclose(np.asarray(rm.last_logits), np.asarray(logits[0, -1]),
                               rtol=1e-9, atol=1e-10)
    # The same in float32: the replacement's parts reproduce the logits to 1e-5.
    m32 = load_model(tiny_dirs(family))
    rm32, *_ = rep.build_neurons(m32.params, m32.cfg, np.asarray(ids), 0)
    _, h = rep.linear_forward(rm32, m32.params, m32.cfg, *_neuron_tc(m32), rm32.embeds,
                              rm32.recon + rm32.error)
    lg = np.asarray(logits_of(m32.params, m32.cfg, h[-1]))
    ref = np.asarray(forward(m32.params, m32.cfg, jnp.asarray(ids)[None])[0][0, -1])
    np.testing.assert_allclose(lg, ref, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def _neuron_tc(m):
    from attribution.neurons import neuron_transcoder

    return neuron_transcoder(m.params, m.cfg)


@pytest.mark.parametrize("top_k", [0, 3], ids=["every unit", "top 3, rest folded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_neuron_edge_is_an_intervention(tiny_dirs, x64, family, top_k):
    params, cfg, ids = _model(tiny_dirs, family)
    config = TraceConfig(prompt="test", dtype="float64", neurons=True, neuron_top_k=top_k,
                         batch_size=16, position_bucket=2)
    graph = trace_tokens(params, cfg, None, None, ids[1:], config)
    units = _Neurons(params, cfg, ids)
    acts = units.chosen(top_k)
    kept = acts.copy()
    kept[0] = 0  # the BOS position's units are not nodes (their writes stay in the slots)
    assert graph.ranges.feature.stop == int(np.count_nonzero(kept))
    np.testing.assert_allclose(
        graph.activation, acts[graph.feature_pos, graph.feature_layer, graph.feature_index],
        rtol=1e-9, atol=1e-13)
    ref = _NeuronReference(params, cfg, ids, units, acts)
    r = graph.ranges
    # Every unit kept makes thousands of nodes: a seeded sample of 120 feature targets and 120
    # feature sources (each a float64 forward of the reference), with every error, token and logit.
    rng = np.random.default_rng(0)
    feats = np.arange(r.feature.start, r.feature.stop)
    pick = (lambda n: sorted(rng.choice(feats, n, replace=False).tolist())
            if len(feats) > n else feats.tolist())
    targets = pick(120) + list(range(r.logit.start, r.logit.stop))
    sources = pick(120) + list(range(r.error.start, r.token.stop))
    A_ref = ref.interventions(graph, targets, sources)
    A = graph.adjacency[np.ix_(targets, sources)]
    np.testing.assert_allclose(A, A_ref, rtol=1e-8, atol=1e-11 * np.abs(A_ref).max())
    s = graph.scores
    if top_k == 0 and params.layers.b_out is None:  # errors hold float rounding only
        assert s.completeness == pytest.approx(1.0, abs=1e-9)
    else:
        assert 0 < s.completeness < 1


def test_neuron_settings(tiny_dirs):
    with pytest.raises(ConfigError, match="not both"):
        TraceConfig(prompt="x", neurons=True, transcoder="some/dir")
    with pytest.raises(ConfigError, match="neuron_top_k must be >= 0"):
        TraceConfig(prompt="x", neurons=True, neuron_top_k=-1)
