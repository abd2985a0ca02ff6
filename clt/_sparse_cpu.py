"""CPU kernels of the sparse decoder (`clt.sparse`), in numba, called through pure_callback.

Entries are token-major: those of token n are row_ptr[n] .. row_ptr[n + 1]. Every kernel walks
one target layer j at a time, so the decoder slice W[:, j] (n_features x d_model floats, a few MB)
stays in cache while all tokens read their rows from it; the two threads split tokens (forward,
value gradient) or features (weight gradient: entries are first bucketed by feature, so each
thread owns whole rows of dW and no two threads add into the same row).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, fastmath=True, cache=True)
def _forward(row_ptr, feat, vals, W, out):
    n_tok, nt, D = out.shape
    for j in range(nt):
        for n in prange(n_tok):
            for e in range(row_ptr[n], row_ptr[n + 1]):
                v = vals[e]
                f = feat[e]
                for d in range(D):
                    out[n, j, d] += v * W[f, j, d]


@njit(parallel=True, fastmath=True, cache=True)
def _grad_vals(row_ptr, feat, W, g, gv):
    n_tok, nt, D = g.shape
    for j in range(nt):
        for n in prange(n_tok):
            for e in range(row_ptr[n], row_ptr[n + 1]):
                f = feat[e]
                acc = np.float32(0.0)
                for d in range(D):
                    acc += W[f, j, d] * g[n, j, d]
                gv[e] += acc


@njit(cache=True)
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
def _grad_W(col_ptr, entry, token, vals, g, gW):
    n_features, nt, D = gW.shape
    for j in range(nt):
        for f in prange(n_features):
            for p in range(col_ptr[f], col_ptr[f + 1]):
                v = vals[entry[p]]
                n = token[p]
                for d in range(D):
                    gW[f, j, d] += v * g[n, j, d]


def _np(a, dtype=None):
    """A plain ndarray (callbacks may pass buffer objects numba cannot type)."""
    return np.ascontiguousarray(np.asarray(a), dtype=dtype)


def forward(vals, feat, row_ptr, W):
    W, feat, row_ptr = _np(W), _np(feat, np.int32), _np(row_ptr, np.int64)
    out = np.zeros((row_ptr.shape[0] - 1,) + W.shape[1:], W.dtype)
    _forward(row_ptr, feat, _np(vals, W.dtype), W, out)
    return out


def backward(vals, feat, row_ptr, W, g):
    W, g, feat, row_ptr = _np(W), _np(g, np.asarray(W).dtype), _np(feat, np.int32), \
        _np(row_ptr, np.int64)
    vals = _np(vals, W.dtype)
    gv = np.zeros(vals.shape, W.dtype)
    _grad_vals(row_ptr, feat, W, g, gv)
    col_ptr, entry, token = _by_feature(row_ptr, feat, W.shape[0])
    gW = np.zeros(W.shape, W.dtype)
    _grad_W(col_ptr, entry, token, vals, g, gW)
    return gv, gW
