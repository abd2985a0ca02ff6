"""CPU kernels of the sparse decoder (`clt.sparse`), in numba, called through pure_callback.

Entries are token-major: those of token n are row_ptr[n] .. row_ptr[n + 1]. Every kernel walks
one target layer j at a time, so the decoder slice W[:, j] (n_features x d_model floats, a few MB)
stays in cache while all tokens read their rows from it; the two threads split tokens (forward,
value gradient) or features (weight gradient: entries are first bucketed by feature, so each
thread owns whole rows of dW and no two threads add into the same row). One callback covers all
source layers: source layer s writes into out[:, s:] of one [token, layer, d_model] array, and
reads its gradient there, so no per-layer [token, n_targets, d_model] array is made or copied
(in a CLT they add up to ~15x the output; the copies cost more than the loops).
"""

from __future__ import annotations

from typing import no_type_check

import numpy as np
from numba import njit, prange

# Every kernel is @no_type_check: the tests' jaxtyping import hook would otherwise wrap it in a
# Python type checker, which numba cannot compile.


@njit(parallel=True, fastmath=True, cache=True)
@no_type_check
def _forward(row_ptr, feat, vals, W, out, s):
    """Adds source layer s's writes into out[:, s:s + n_targets]."""
    n_tok = out.shape[0]
    _, nt, D = W.shape
    for j in range(nt):
        for n in prange(n_tok):
            for e in range(row_ptr[n], row_ptr[n + 1]):
                v = vals[e]
                f = feat[e]
                for d in range(D):
                    out[n, s + j, d] += v * W[f, j, d]


@njit(parallel=True, fastmath=True, cache=True)
@no_type_check
def _grad_vals(row_ptr, feat, W, g, gv, s):
    n_tok = g.shape[0]
    _, nt, D = W.shape
    for j in range(nt):
        for n in prange(n_tok):
            for e in range(row_ptr[n], row_ptr[n + 1]):
                f = feat[e]
                acc = np.float32(0.0)
                for d in range(D):
                    acc += W[f, j, d] * g[n, s + j, d]
                gv[e] += acc


@njit(cache=True)
@no_type_check
def _by_feature(row_ptr, feat, n_features):
    """Entries bucketed by feature: col_ptr [F + 1], entry ids and their tokens."""
    n_tok = row_ptr.shape[0] - 1
    n = row_ptr[n_tok]
    col_ptr = np.zeros(n_features + 1, np.int64)
    for e in range(n):
        col_ptr[feat[e] + 1] += 1
    for f in range(n_features):
        col_ptr[f + 1] += col_ptr[f]
    fill = col_ptr[:-1].copy()
    entry = np.empty(n, np.int64)
    token = np.empty(n, np.int64)
    for t in range(n_tok):
        for e in range(row_ptr[t], row_ptr[t + 1]):
            p = fill[feat[e]]
            entry[p] = e
            token[p] = t
            fill[feat[e]] += 1
    return col_ptr, entry, token


@njit(parallel=True, fastmath=True, cache=True)
@no_type_check
def _grad_W(col_ptr, entry, token, vals, g, gW, s):
    n_features, nt, D = gW.shape
    for j in range(nt):
        for f in prange(n_features):
            for d in range(D):  # every row is written here: `gW` comes uninitialised
                gW[f, j, d] = 0.0
            for p in range(col_ptr[f], col_ptr[f + 1]):
                v = vals[entry[p]]
                n = token[p]
                for d in range(D):
                    gW[f, j, d] += v * g[n, s + j, d]


@njit(parallel=True, cache=True)
@no_type_check
def _select(mask, tok, feat, valid, row_ptr, count):
    L, N, F = mask.shape
    cap = tok.shape[1]
    for layer in prange(L):
        c = 0
        for n in range(N):
            row_ptr[layer, n] = min(c, cap)
            for f in range(F):
                if mask[layer, n, f]:
                    if c < cap:
                        tok[layer, c] = n
                        feat[layer, c] = f
                        valid[layer, c] = 1.0
                    c += 1
        row_ptr[layer, N] = min(c, cap)
        count[layer] = c
        for e in range(min(c, cap), cap):  # padding
            tok[layer, e] = N
            feat[layer, e] = 0
            valid[layer, e] = 0.0


@njit(parallel=True, cache=True)
@no_type_check
def _kth(x, k, out):
    n = x.shape[1]
    for row in prange(x.shape[0]):
        out[row] = np.partition(x[row].copy(), n - k)[n - k]


def kth_largest(x, k):
    """The k-th largest entry of every row of x [rows, n] (introselect, O(n) per row)."""
    x = _np(x, np.float32)
    out = np.empty(x.shape[0], np.float32)
    _kth(x, k, out)
    return out


def select(support, capacity):
    """Support entries of every layer, token-major (what `clt.sparse.select` makes with XLA)."""
    mask = _np(support, np.bool_)
    L, N, _ = mask.shape
    tok, feat = np.empty((L, capacity), np.int32), np.empty((L, capacity), np.int32)
    valid = np.empty((L, capacity), np.float32)
    row_ptr, count = np.empty((L, N + 1), np.int32), np.empty(L, np.int32)
    _select(mask, tok, feat, valid, row_ptr, count)
    return tok, feat, valid, row_ptr, count


def encoder_grad(dz, feat, row_ptr, x, n_features):
    """Encoder gradients over the entries: dz [layer, C] (the pre-activations' cotangents), x
    [layer, n_tokens, d_model] the inputs; returns (dW_enc^T [layer, F, d_model], db_enc
    [layer, F]). Rows of features without entries are 0."""
    x, feat, row_ptr = _np(x), _np(feat, np.int32), _np(row_ptr, np.int64)
    dz = _np(dz, x.dtype)
    L, N, D = x.shape
    dW = np.empty((L, n_features, 1, D), x.dtype)
    db = np.zeros((L, n_features), x.dtype)
    for layer in range(L):
        col_ptr, entry, token = _by_feature(row_ptr[layer], feat[layer], n_features)
        _grad_W(col_ptr, entry, token, dz[layer], x[layer].reshape(N, 1, D), dW[layer], 0)
        _bias_grad(col_ptr, entry, dz[layer], db[layer])
    return dW.reshape(L, n_features, D), db


@njit(cache=True)
@no_type_check
def _bias_grad(col_ptr, entry, dz, db):
    for f in range(db.shape[0]):
        acc = np.float32(0.0)
        for p in range(col_ptr[f], col_ptr[f + 1]):
            acc += dz[entry[p]]
        db[f] = acc


def _np(a, dtype=None):
    """A plain ndarray (callbacks may pass buffer objects numba cannot type)."""
    return np.ascontiguousarray(np.asarray(a), dtype=dtype)


def forward(vals, feat, row_ptr, W):
    """Writes of all source layers: vals, feat [layer, C], row_ptr [layer, n_tokens + 1], W the
    tuple of W_dec[s] [features, n_targets(s), d_model]; returns [n_tokens, layer, d_model]."""
    W = tuple(_np(w) for w in W)
    vals, feat, row_ptr = _np(vals, W[0].dtype), _np(feat, np.int32), _np(row_ptr, np.int64)
    out = np.zeros((row_ptr.shape[1] - 1, len(W), W[0].shape[2]), W[0].dtype)
    for s, w in enumerate(W):
        _forward(row_ptr[s], feat[s], vals[s], w, out, s)
    return out


def backward(vals, feat, row_ptr, W, g):
    """Gradients of `forward` given g [n_tokens, layer, d_model]: (d vals [layer, C], d W)."""
    W = tuple(_np(w) for w in W)
    vals, feat, row_ptr = _np(vals, W[0].dtype), _np(feat, np.int32), _np(row_ptr, np.int64)
    g = _np(g, W[0].dtype)
    gv = np.zeros(vals.shape, W[0].dtype)  # padding entries keep 0
    gW = []
    for s, w in enumerate(W):
        _grad_vals(row_ptr[s], feat[s], w, g, gv[s], s)
        col_ptr, entry, token = _by_feature(row_ptr[s], feat[s], w.shape[0])
        gW.append(np.empty(w.shape, w.dtype))
        _grad_W(col_ptr, entry, token, vals[s], g, gW[-1], s)
    return gv, tuple(gW)
