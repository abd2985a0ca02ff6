"""Shared test machinery: random transcoders with calibrated thresholds, and an independent
reference for edges (interventions in the frozen model, run through `clt.lm.forward` itself)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from clt import transcoder as tcm
from clt.lm.model import FREEZABLE, Capture, MLPHook, embed, forward, norm
from clt.transcoder import TranscoderConfig


def random_transcoder(model_cfg, n_features: int, *, max_reach=None, skip=False,
                      input_point="resid_mid", seed=0, dtype=jnp.float32):
    cfg = TranscoderConfig(d_model=model_cfg.d_model, n_layers=model_cfg.n_layers,
                           n_features=n_features, max_reach=max_reach, skip=skip,
                           input_point=input_point)
    p = tcm.init_params(cfg, jax.random.key(seed), dtype=dtype)
    k1, k2, k3 = jax.random.split(jax.random.key(seed + 1), 3)
    # Nonzero biases and skip weights, so that their paths are exercised.
    p = dataclasses.replace(
        p, b_enc=0.01 * jax.random.normal(k1, p.b_enc.shape, dtype),
        b_dec=0.05 * jax.random.normal(k2, p.b_dec.shape, dtype),
        W_skip=None if not skip else
        (0.1 / np.sqrt(cfg.d_model)) * jax.random.normal(k3, p.W_skip.shape, dtype))
    return cfg, p


def calibrate(params, model_cfg, tc_cfg, tc_params, ids, per_layer_pos: float):
    """Set each layer's JumpReLU threshold so that about `per_layer_pos` features are active per
    position on this prompt (a random transcoder otherwise has arbitrary sparsity)."""
    _, cap = forward(params, model_cfg, jnp.asarray(ids)[None], capture=("resid_mid", "mlp_in"))
    x = cap.resid_mid if tc_cfg.input_point == "resid_mid" else cap.mlp_in
    pre = tcm.encode_pre(tc_params, jnp.swapaxes(x[:, 0], 0, 1))  # [pos layer feature]
    q = 1.0 - per_layer_pos / tc_cfg.n_features
    th = np.quantile(np.asarray(pre, np.float64).transpose(1, 0, 2).reshape(tc_cfg.n_layers, -1),
                     q, axis=1)
    th = np.maximum(th, 1e-6)
    return dataclasses.replace(tc_params, log_threshold=jnp.log(
        jnp.broadcast_to(jnp.asarray(th, jnp.float32)[:, None], tc_params.log_threshold.shape)))


@dataclass(frozen=True)
class SkipHook(MLPHook):
    """MLP slot = given substitution + the transcoder's skip of its input (test reference)."""

    input_point: str

    def apply(self, hook_params, layer, resid_mid, mlp_in, state, true_mlp):
        m, w_skip = hook_params
        x = resid_mid if self.input_point == "resid_mid" else mlp_in
        return m[layer] + x @ w_skip[layer], state


class Reference:
    """The frozen model of one prompt, evaluated with `clt.lm.forward` for a batch of substituted
    inputs (input embeddings and MLP slots); independent of `attribution`."""

    def __init__(self, params, cfg, tc_cfg, tc_params, ids):
        self.params, self.cfg, self.tc_cfg, self.tc_params = params, cfg, tc_cfg, tc_params
        self.tok = jnp.asarray(ids)[None]
        T = self.tok.shape[1]
        _, cap = forward(params, cfg, self.tok,
                         capture=FREEZABLE + ("resid_mid", "mlp_in", "mlp_out", "resid_final"))
        self.cap = cap
        x = cap.resid_mid if tc_cfg.input_point == "resid_mid" else cap.mlp_in
        self.x = x[:, 0]  # [layer pos d_model]
        xs = jnp.swapaxes(self.x, 0, 1)
        self.pre = tcm.encode_pre(tc_params, xs)  # [pos layer feature]
        self.acts = tcm.encode(tc_cfg, tc_params, xs)
        recon = jnp.swapaxes(tcm.decode(tc_cfg, tc_params, self.acts, xs), 0, 1)
        self.mlp_out = cap.mlp_out[:, 0]
        self.error = self.mlp_out - recon
        skip = 0 if tc_params.W_skip is None else jnp.einsum("lpd,lde->lpe", self.x,
                                                               tc_params.W_skip)
        self.m0 = self.mlp_out - skip  # the MLP slot's substitution at the real input
        self.e0 = embed(params, cfg, self.tok, jnp.arange(T)[None])[0]
        self.h_final = norm(cap.resid_final, params.final_norm_w, params.final_norm_b, cfg,
                            cap.final_norm_scale)[0][0]

    def run(self, E, M):
        """E [n, pos, d_model], M [layer, n, pos, d_model] -> (reads [layer, n, pos, d_model],
        final hidden [n, pos, d_model])."""
        n = E.shape[0]
        fr = {}
        for k in FREEZABLE:
            v = getattr(self.cap, k)
            if v is not None:
                fr[k] = jnp.repeat(v, n, axis=0 if k == "final_norm_scale" else 1)
        tok = jnp.repeat(self.tok, n, axis=0)
        want = ("resid_mid", "mlp_in", "resid_final")
        if self.tc_params.W_skip is None:
            _, cap = forward(self.params, self.cfg, tok, frozen=Capture(**fr, mlp_out=M),
                             input_embeds=E, capture=want)
        else:
            _, cap = forward(self.params, self.cfg, tok, frozen=Capture(**fr), input_embeds=E,
                             capture=want, mlp_hook=SkipHook(self.tc_cfg.input_point),
                             hook_params=(M, self.tc_params.W_skip))
        reads = cap.resid_mid if self.tc_cfg.input_point == "resid_mid" else cap.mlp_in
        h, _ = norm(cap.resid_final, self.params.final_norm_w, self.params.final_norm_b,
                    self.cfg, fr["final_norm_scale"])
        return reads, h

    def target_values(self, graph, reads, h, targets, directions=None):
        """Values of the given target nodes (features: pre-activation minus bias; logits: the
        logit direction, or `directions[node]` when given, on the final hidden) for each batch
        entry: [n, len(targets)]."""
        r = graph.ranges
        W_U = self.params.W_U
        out = []
        for t in targets:
            if r.feature.start <= t < r.feature.stop:
                layer, pos, f = (int(graph.feature_layer[t]), int(graph.feature_pos[t]),
                                 int(graph.feature_index[t]))
                out.append(reads[layer, :, pos] @ self.tc_params.W_enc[layer][:, f])
            elif directions is not None and t in directions:
                out.append(h[:, -1] @ jnp.asarray(directions[t]))
            else:
                v = int(graph.logit_tokens[t - r.logit.start])
                d = W_U[:, v] - W_U.mean(axis=1)
                out.append(h[:, -1] @ d)
        return jnp.stack(out, axis=1)

    def source_deltas(self, graph, sources):
        """The contribution of each source node: (dE [n, pos, d_model], dM [layer, n, ...])."""
        r = graph.ranges
        T, D, L = self.tok.shape[1], self.cfg.d_model, self.cfg.n_layers
        dE = np.zeros((len(sources), T, D), np.asarray(self.e0).dtype)
        dM = np.zeros((L, len(sources), T, D), dE.dtype)
        acts, err, e0 = np.asarray(self.acts), np.asarray(self.error), np.asarray(self.e0)
        for i, s in enumerate(sources):
            kind = r.kind_of(int(s))
            if kind == "feature":
                layer, pos, f = (int(graph.feature_layer[s]), int(graph.feature_pos[s]),
                                 int(graph.feature_index[s]))
                dec = np.asarray(self.tc_params.W_dec[layer][f])  # [n_targets, d_model]
                dM[layer:layer + dec.shape[0], i, pos] += acts[pos, layer, f] * dec
            elif kind == "error":
                j = s - r.error.start
                layer, pos = int(graph.error_layer[j]), int(graph.error_pos[j])
                dM[layer, i, pos] += err[layer, pos]
            else:
                pos = s - r.token.start
                dE[i, pos] = e0[pos]
        return jnp.asarray(dE), jnp.asarray(dM)

    def interventions(self, graph, targets, sources, directions=None):
        """A_ref[targets, sources]: change of each target when each source's contribution is
        added to the real inputs of the frozen model."""
        dE, dM = self.source_deltas(graph, sources)
        E = jnp.concatenate([self.e0[None], self.e0[None] + dE])
        M = jnp.concatenate([self.m0[:, None], self.m0[:, None] + dM], axis=1)
        reads, h = self.run(E, M)
        vals = self.target_values(graph, reads, h, targets, directions)
        return np.asarray(vals[1:] - vals[:1]).T
