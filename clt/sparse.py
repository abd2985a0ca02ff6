"""The sparse training step's pieces: the decoder touches only the features that are active.

A transcoder's decoder is most of its training cost (a CLT's decoders hold ~94% of its weights),
yet a token activates ~50 of thousands of features per layer. The dense step multiplies every
decoder row by mostly zero activations; here each source layer's activations are kept as a list
of entries (token, feature, value), token-major, and the decoder's forward and both gradients run
over those entries only:
    forward   out[n, j] = sum_{e: tok_e = n} v_e W[f_e, j]          (sparse x dense)
    d value   g_e = sum_j W[f_e, j] . g_out[tok_e, j]                (sampled dense-dense)
    d W       dW[f, j] = sum_{e: f_e = f} v_e g_out[tok_e, j]        (sparse^T x dense)
The entries of a layer are its *support*: every (token, feature) whose training gradient can be
non-zero (`training_support`): the active features, plus for JumpReLU the inactive ones inside
the straight-through band. The encoder's weight and bias gradients run over the same entries
(`encoder_entries`: dW_enc[:, f] = sum over entries of feature f of x[tok] dz), except when
JumpReLU's pre-activation penalty reads every feature; the encoder's forward stays dense (the
support is chosen from all pre-activations). Penalties and Adam are unchanged, so a sparse step
gives the dense step's parameters up to float32 rounding (tests/clt/test_sparse.py). Entries
live in a fixed capacity per layer; a batch whose support overflows it is reported
(`Active.count`) and the trainer runs that batch densely.

Two kernel sets compute these products: `xla` (gathers and segment sums; any device, any
mesh: what GPUs and TPUs use) and `cpu` (numba loops run inside XLA as FFI handlers, or through
`jax.pure_callback`; single device: XLA's CPU gathers run at memory speed, ~2 GB/s here, slower than the dense matmul they
replace, while the numba loops keep each decoder slice in cache; see scripts/bench_train.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from clt.lm.params import Leaf
from clt.transcoder import (
    TranscoderConfig,
    TranscoderParams,
    _rect,
    batchtopk_mask,
    jumprelu,
    kth_largest,
    topk_mask,
)

KERNELS = ("xla", "cpu")


# --- which entries can carry gradient --------------------------------------------------------------
def training_support(cfg: TranscoderConfig, params: TranscoderParams, z, bandwidth: float,
                     layer_major: bool = False, kernels: str = "xla"):
    """(support, cut): support is boolean, shaped as z ([batch, layer, feature], or [layer,
    batch, feature] if layer_major), where the training activation or its gradient can be
    non-zero. JumpReLU: active (z > threshold) or inside the
    straight-through band (the same float32 expression as `jumprelu`'s backward); ReLU: z > 0;
    topk / batchtopk: their masks. cut: batchtopk's per-layer cut value (found by `kernels`),
    else None."""
    if cfg.activation == "relu":
        return z > 0, None
    if cfg.activation == "topk":
        return topk_mask(z, cfg.k) > 0, None
    if cfg.activation == "batchtopk":
        mask, cut = batchtopk_mask(z, cfg.k, layer_major, kth_fn=_KERNELS[kernels].kth)
        return mask > 0, cut
    th = params.threshold.astype(jnp.float32)
    th = th[:, None, :] if layer_major else th
    band = _rect((z.astype(jnp.float32) - th) / bandwidth) > 0
    return (z > th.astype(z.dtype)) | band, None


def activate_entries(cfg: TranscoderConfig, params: TranscoderParams, z_e, layer_feat,
                     bandwidth: float):
    """The training activation at support entries z_e [layer, C] (features `layer_feat`): the
    dense rule restricted to entries, with the same gradients there."""
    if cfg.activation == "relu":
        return jax.nn.relu(z_e)
    if cfg.activation in ("topk", "batchtopk"):
        return z_e  # entries are exactly the mask (a = z * mask, the mask a constant)
    th = jnp.take_along_axis(params.threshold, layer_feat, axis=1).astype(z_e.dtype)
    return jumprelu(z_e, th, bandwidth)


# --- entries ---------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclass
class Active:
    """Support entries of every layer, token-major, padded to a fixed capacity C.

    Entry e of layer l is (tok[l, e], feat[l, e]); entries of token n are row_ptr[l, n] ..
    row_ptr[l, n + 1]; entries at or past `count` are padding (tok = n_tokens: dropped by segment
    sums; excluded by row_ptr). `count` is the true support size, which may exceed C (overflow).
    """

    tok: Leaf  # [layer, C] int32
    feat: Leaf  # [layer, C] int32
    valid: Leaf  # [layer, C] float32, 1 for real entries
    row_ptr: Leaf  # [layer, n_tokens + 1] int32
    count: Leaf  # [layer] int32

    @property
    def overflow(self):
        return jnp.any(self.count > self.tok.shape[1])


def select(support, capacity: int, kernels: str = "xla") -> Active:
    """The first `capacity` support entries of every layer (token-major) from a boolean
    [layer, batch, feature] support."""
    return _KERNELS[kernels].select(support, capacity)


def _select_xla(support, capacity: int) -> Active:
    L, N, F = support.shape

    def one(mask):  # [N, F]
        flat = mask.reshape(-1)
        (idx,) = jnp.nonzero(flat, size=capacity, fill_value=N * F)
        count = flat.sum(dtype=jnp.int32)
        valid = jnp.arange(capacity) < count
        tok = jnp.where(valid, idx // F, N).astype(jnp.int32)
        feat = jnp.where(valid, idx % F, 0).astype(jnp.int32)
        row_ptr = jnp.searchsorted(tok, jnp.arange(N + 1), side="left").astype(jnp.int32)
        return tok, feat, valid.astype(jnp.float32), row_ptr, count

    tok, feat, valid, row_ptr, count = jax.vmap(one)(support)
    return Active(tok=tok, feat=feat, valid=valid, row_ptr=row_ptr, count=count)


def gather_entries(a, act: Active):
    """Values of a dense [layer, batch, feature] array at every layer's entries: [layer, C]."""
    L, N, F = a.shape
    flat = a.reshape(L, N * F)
    idx = jnp.minimum(act.tok, N - 1) * F + act.feat
    return jnp.take_along_axis(flat, idx, axis=1)


# --- the encoder's gradient over entries -----------------------------------------------------------
def encoder_entries(params: TranscoderParams, z_e, x_lm, act: Active, kernels: str = "xla"):
    """Pre-activations at the entries, z_e [layer, C] (values computed densely, with no gradient,
    because choosing the support needs them all), made differentiable in W_enc and b_enc over the
    entries only: dW_enc[l, :, f] = sum over entries e of layer l with feature f of
    x[l, tok_e] dz_e; db_enc likewise. x_lm: the inputs, [layer, n_tokens, d_model]. Exact
    wherever the loss reads pre-activations at entries only (not JumpReLU's pre-activation
    penalty, which reads every feature)."""
    return _enc(params.W_enc, params.b_enc, z_e, x_lm, act.tok, act.feat, act.row_ptr, kernels)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _enc(W_enc, b_enc, z_e, x_lm, tok, feat, row_ptr, kernels):
    return z_e


def _enc_fwd(W_enc, b_enc, z_e, x_lm, tok, feat, row_ptr, kernels):
    return z_e, (W_enc, b_enc, x_lm, tok, feat, row_ptr)


def _enc_bwd(kernels, res, g):
    W_enc, b_enc, x_lm, tok, feat, row_ptr = res
    dW, db = _KERNELS[kernels].encoder_grad(g.astype(x_lm.dtype), tok, feat, row_ptr, x_lm,
                                            W_enc.shape[-1])  # dW: [layer, d_model, feature]
    dW = dW.astype(W_enc.dtype)
    # z_e and x come from values without gradient (stop_gradient; data): zero cotangents.
    return (dW, db.astype(b_enc.dtype), jnp.zeros_like(g), jnp.zeros_like(x_lm), None, None,
            None)


_enc.defvjp(_enc_fwd, _enc_bwd)


def _encoder_grad_xla(dz, tok, feat, row_ptr, x_lm, n_features: int):
    N = x_lm.shape[1]

    def one(args):  # one layer: entries' input rows times their cotangents, summed by feature
        dz_l, tok_l, feat_l, x_l = args
        dz_l = jnp.where(tok_l < N, dz_l, 0)  # padding entries add nothing
        rows = x_l[jnp.minimum(tok_l, N - 1)] * dz_l[:, None]
        return (jax.ops.segment_sum(rows, feat_l, n_features).T,
                jax.ops.segment_sum(dz_l, feat_l, n_features))

    return jax.lax.map(one, (dz, tok, feat, x_lm))  # ([layer, d_model, F], [layer, F])


# --- the decoder over entries ----------------------------------------------------------------------
def decode_entries(cfg: TranscoderConfig, params: TranscoderParams, vals, act: Active,
                   n_tokens: int, kernels: str = "xla"):
    """Decoder writes of all source layers, [n_tokens, layer, d_model] (no bias, no skip): the
    sum over s of entries' values times W_dec[s], as `transcoder.decode` computes densely."""
    W = tuple(w.astype(vals.dtype) for w in params.W_dec)
    return spmm(vals, act.tok, act.feat, act.row_ptr, W, n_tokens, kernels)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def spmm(vals, tok, feat, row_ptr, W, n_tokens: int, kernels: str):
    """out[n, s + j] = sum over source layers s and entries e of token n in layer s of
    vals[s, e] * W[s][feat[s, e], j]: [n_tokens, layer, d]. vals, tok, feat: [layer, C];
    row_ptr: [layer, n_tokens + 1]; W: a tuple of [F, n_targets(s), d]."""
    return _KERNELS[kernels].forward(vals, tok, feat, row_ptr, W, n_tokens)


def _spmm_fwd(vals, tok, feat, row_ptr, W, n_tokens, kernels):
    return spmm(vals, tok, feat, row_ptr, W, n_tokens, kernels), (vals, tok, feat, row_ptr, W)


def _spmm_bwd(n_tokens, kernels, res, g):
    vals, tok, feat, row_ptr, W = res
    g_vals, g_W = _KERNELS[kernels].backward(vals, tok, feat, row_ptr, W, g.astype(W[0].dtype))
    return g_vals.astype(vals.dtype), None, None, None, tuple(g_W)


spmm.defvjp(_spmm_fwd, _spmm_bwd)


class _Xla:
    """Gathers and segment sums, one source and target layer at a time (bounded memory)."""

    select = staticmethod(_select_xla)
    kth = staticmethod(kth_largest)
    encoder_grad = staticmethod(_encoder_grad_xla)

    @staticmethod
    def forward(vals, tok, feat, row_ptr, W, n_tokens):
        out = jnp.zeros((n_tokens, len(W), W[0].shape[-1]), W[0].dtype)
        for s, w in enumerate(W):
            def one(wj, s=s):  # [F, d]
                return jax.ops.segment_sum(vals[s][:, None] * wj[feat[s]], tok[s], n_tokens,
                                           indices_are_sorted=True)

            contrib = jnp.moveaxis(jax.lax.map(one, jnp.moveaxis(w, 1, 0)), 0, 1)
            out = out.at[:, s:s + w.shape[1]].add(contrib)
        return out

    @staticmethod
    def backward(vals, tok, feat, row_ptr, W, g):
        gv, gW = [], []
        for s, w in enumerate(W):
            F, n = w.shape[0], w.shape[1]
            tok_in = jnp.minimum(tok[s], g.shape[0] - 1)  # padding entries have vals 0

            def one(wg, s=s, tok_in=tok_in, F=F):
                wj, gj = wg  # [F, d], [n_tokens, d]
                rows = gj[tok_in]
                return (wj[feat[s]] * rows).sum(-1), jax.ops.segment_sum(
                    vals[s][:, None] * rows, feat[s], F)

            gvs, gws = jax.lax.map(one, (jnp.moveaxis(w, 1, 0),
                                         jnp.moveaxis(g[:, s:s + n], 1, 0)))
            gv.append(gvs.sum(0) * (tok[s] < g.shape[0]))  # padding: 0
            gW.append(jnp.moveaxis(gws, 0, 1))
        return jnp.stack(gv), tuple(gW)


class _Cpu:
    """numba loops over the entries (see `clt._sparse_cpu`). The decoder's forward and backward
    run inside XLA as FFI handlers (`clt._sparse_ffi`: no copies of the decoder or its gradient)
    where this jax takes them and the decoder is float32; everything else, and those otherwise,
    through pure_callback."""

    @staticmethod
    def select(support, capacity: int) -> Active:
        from clt import _sparse_cpu, _sparse_ffi

        L, N, F = support.shape
        i32 = jnp.int32
        shapes = (jax.ShapeDtypeStruct((L, capacity), i32),) * 2 + (
            jax.ShapeDtypeStruct((L, capacity), jnp.float32),
            jax.ShapeDtypeStruct((L, N + 1), i32), jax.ShapeDtypeStruct((L,), i32))
        if _sparse_ffi.available():
            return Active(*_sparse_ffi.select(support, shapes))
        out = jax.pure_callback(partial(_sparse_cpu.select, capacity=capacity), shapes, support,
                                vmap_method="sequential")
        return Active(*out)

    @staticmethod
    def encoder_grad(dz, tok, feat, row_ptr, x_lm, n_features: int):
        from clt import _sparse_cpu, _sparse_ffi

        L, _, D = x_lm.shape
        if x_lm.dtype == jnp.float32 and _sparse_ffi.available():
            return _sparse_ffi.encoder_grad(dz, feat, row_ptr, x_lm, n_features)
        shapes = (jax.ShapeDtypeStruct((L, D, n_features), x_lm.dtype),
                  jax.ShapeDtypeStruct((L, n_features), x_lm.dtype))
        return jax.pure_callback(partial(_sparse_cpu.encoder_grad, n_features=n_features),
                                 shapes, dz, feat, row_ptr, x_lm, vmap_method="sequential")

    @staticmethod
    def kth(x, k: int):
        from clt import _sparse_cpu, _sparse_ffi

        if x.dtype == jnp.float32 and x.ndim == 2 and _sparse_ffi.available():
            return _sparse_ffi.kth_largest(x, k)
        out = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
        return jax.pure_callback(partial(_sparse_cpu.kth_largest, k=k), out, x,
                                 vmap_method="sequential").astype(x.dtype)

    @staticmethod
    def forward(vals, tok, feat, row_ptr, W, n_tokens):
        from clt import _sparse_cpu, _sparse_ffi

        if W[0].dtype == jnp.float32 and _sparse_ffi.available():
            return _sparse_ffi.forward(vals, feat, row_ptr, W, n_tokens)
        shape = jax.ShapeDtypeStruct((n_tokens, len(W), W[0].shape[-1]), W[0].dtype)
        return jax.pure_callback(_sparse_cpu.forward, shape, vals, feat, row_ptr, W,
                                 vmap_method="sequential")

    @staticmethod
    def backward(vals, tok, feat, row_ptr, W, g):
        from clt import _sparse_cpu, _sparse_ffi

        if W[0].dtype == jnp.float32 and _sparse_ffi.available():
            return _sparse_ffi.backward(vals, feat, row_ptr, W, g)
        shapes = (jax.ShapeDtypeStruct(vals.shape, W[0].dtype),
                  tuple(jax.ShapeDtypeStruct(w.shape, w.dtype) for w in W))
        return jax.pure_callback(_sparse_cpu.backward, shapes, vals, feat, row_ptr, W, g,
                                 vmap_method="sequential")


_KERNELS = {"xla": _Xla, "cpu": _Cpu}


def cpu_kernels_available() -> str | None:
    """None when the `cpu` kernels can run here, else why not. They need numba, and at least
    two CPU threads: jax.pure_callback copies its arguments onto the CPU device with XLA's
    thread pool, which is one thread on a one-CPU machine and busy running the callback (the
    step then waits forever)."""
    import os

    try:
        import numba  # noqa: F401
    except ImportError:
        return "numba is not installed (pip install numba)"
    if len(os.sched_getaffinity(0)) < 2:
        return "this process may use only one CPU (the callback would deadlock)"
    return None


__all__ = ["Active", "KERNELS", "activate_entries", "cpu_kernels_available",
           "decode_entries", "encoder_entries", "gather_entries", "select", "spmm", "training_support"]
