"""CPU kernels of the sparse decoder (`clt.sparse`), in numba, called through pure_callback.

Entries arrive token-major: those of token n are row_ptr[n] .. row_ptr[n + 1]. The kernels are
bound by reading decoder rows (each entry reads one 2.3 KB row per target layer), so they are
tiled for the core's own cache (L2, ~2 MB here):
- the forward walks one target layer j at a time and, within it, one block of `FEATURE_BLOCK`
  features: the entries are first regrouped by (feature block, token), so the block's rows of
  W[:, j] (~1.2 MB) stay in L2 while every token reads from them (untiled, the whole slice
  W[:, j], 4.7 MB, came from L3 for every entry);
- the backward buckets entries by (feature, block of `TOKEN_BLOCK` tokens), so the tokens'
  gradient rows g[block, j] stay in L2 while every feature's row of dW is summed; each thread
  owns whole rows of dW (and those features' entries), so no two threads add into the same
  place. The value gradient is taken in the same pass (`_grad_both`): each gradient row read
  serves both, and the feature's row of W stays in L1.
Inner loops take four entries at a time (one pass over the output row for four input rows).
Tiling changed the kernels' time on the bench case (SmolLM2 CLT, 2,048 features per layer, 1,024
tokens, k = 64) from 2.1 + 2.0 + 1.8 s to 1.0 + 1.0 + 1.1 s (forward, value and weight
gradients); one pass for both gradients took the backward of source layer 0 (30 target layers)
from 0.105 to 0.080 s (median of 10, numpy path, random entries with Zipf-skewed features).
One callback covers all source layers: source layer s writes into out[:, s:] of one [token,
layer, d_model] array, and reads its gradient there, so no per-layer [token, n_targets, d_model]
array is made or copied (in a CLT they add up to ~15x the output).
"""

from __future__ import annotations

from typing import no_type_check

import numpy as np
from numba import njit, prange

# Every kernel is @no_type_check: the tests' jaxtyping import hook would otherwise wrap it in a
# Python type checker, which numba cannot compile.

FEATURE_BLOCK = 512  # decoder rows of one target layer kept in L2 together (x d_model x 4 bytes)
TOKEN_BLOCK = 512  # gradient rows of one target layer kept in L2 together (256: ~10% slower)


@njit(cache=True)
@no_type_check
def _bucket(major, minor, n_major, n_minor):
    """The entries (token-major) sorted stably by the key (major, minor): ptr [n_major,
    n_minor + 1] (bucket (a, b) is ptr[a, b] .. ptr[a, b + 1]) and the entry ids in that order."""
    count = np.zeros((n_major, n_minor), np.int64)
    for e in range(major.shape[0]):
        count[major[e], minor[e]] += 1
    ptr = np.empty((n_major, n_minor + 1), np.int64)
    c = 0
    for a in range(n_major):
        for b in range(n_minor):
            ptr[a, b] = c
            c += count[a, b]
        ptr[a, n_minor] = c
    fill = ptr[:, :n_minor].copy()
    order = np.empty(c, np.int64)
    for e in range(major.shape[0]):
        order[fill[major[e], minor[e]]] = e
        fill[major[e], minor[e]] += 1
    return ptr, order


@njit(cache=True)
@no_type_check
def _tokens(row_ptr):
    """The token of every entry (entries of token n: row_ptr[n] .. row_ptr[n + 1])."""
    n_tok = row_ptr.shape[0] - 1
    tok = np.empty(row_ptr[n_tok], np.int64)
    for t in range(n_tok):
        tok[row_ptr[t]:row_ptr[t + 1]] = t
    return tok


@njit(cache=True)
@no_type_check
def _by_block(row_ptr, feat, vals, fb):
    """Entries regrouped by (feature block, token), token order kept within a block: ptr
    [n_blocks, n_tokens + 1] (those of block b and token n are ptr[b, n] .. ptr[b, n + 1]), the
    original entry ids, features and values in that order."""
    tok = _tokens(row_ptr)
    f = feat[:tok.shape[0]].astype(np.int64)
    n_blocks = f.max() // fb + 1 if f.shape[0] else 0
    ptr, order = _bucket(f // fb, tok, n_blocks, row_ptr.shape[0] - 1)
    return ptr, order, f[order], vals[order]


@njit(cache=True)
@no_type_check
def _by_feature(row_ptr, feat, vals, n_features, tb):
    """Entries bucketed by (feature, block of tb tokens), token order kept: ptr [n_features,
    n_token_blocks + 1], then the entries' tokens and values in that order, and their ids."""
    tok = _tokens(row_ptr)
    n_tb = (row_ptr.shape[0] - 1 + tb - 1) // tb
    ptr, order = _bucket(feat[:tok.shape[0]].astype(np.int64), tok // tb, n_features, n_tb)
    return ptr, tok[order], vals[order], order


@njit(parallel=True, fastmath=True, cache=True)
@no_type_check
def _forward(ptr, pfeat, pval, W, out, s):
    """Adds source layer s's writes into out[:, s:s + n_targets]."""
    n_tok = ptr.shape[1] - 1
    _, nt, D = W.shape
    for j in range(nt):
        for b in range(ptr.shape[0]):
            for n in prange(n_tok):
                p, end = ptr[b, n], ptr[b, n + 1]
                while p + 4 <= end:
                    f0, f1, f2, f3 = pfeat[p], pfeat[p + 1], pfeat[p + 2], pfeat[p + 3]
                    v0, v1, v2, v3 = pval[p], pval[p + 1], pval[p + 2], pval[p + 3]
                    for d in range(D):
                        out[n, s + j, d] += ((v0 * W[f0, j, d] + v1 * W[f1, j, d])
                                             + (v2 * W[f2, j, d] + v3 * W[f3, j, d]))
                    p += 4
                for q in range(p, end):
                    v, f = pval[q], pfeat[q]
                    for d in range(D):
                        out[n, s + j, d] += v * W[f, j, d]


@njit(parallel=True, fastmath=True, cache=True)
@no_type_check
def _grad_both(ptr, token, pval, W, g, gW, gp, s):
    """gW[f, j] = sum over entries of feature f of v g[n, s + j] and, in the same pass, the
    value gradient gp[q] += W[f, j] . g[n_q, s + j] of every entry q (`_by_feature` order): the
    entry's gradient row is read once for both, and the feature's rows of W and dW stay in L1
    while its entries stream by. One thread owns a feature's rows and its entries, so no two
    threads write the same place."""
    n_features, nt, D = gW.shape
    if ptr.shape[1] == 1:  # no tokens: no block to zero the rows in
        gW[:] = 0.0
    for j in range(nt):
        for b in range(ptr.shape[1] - 1):
            for f in prange(n_features):
                if b == 0:  # every row is zeroed here, just before its first sums (in cache):
                    for d in range(D):  # `gW` comes uninitialised
                        gW[f, j, d] = 0.0
                q, end = ptr[f, b], ptr[f, b + 1]
                while q + 4 <= end:
                    n0, n1, n2, n3 = token[q], token[q + 1], token[q + 2], token[q + 3]
                    v0, v1, v2, v3 = pval[q], pval[q + 1], pval[q + 2], pval[q + 3]
                    a0 = a1 = a2 = a3 = np.float32(0.0)
                    for d in range(D):
                        w = W[f, j, d]
                        x0, x1, x2, x3 = g[n0, s + j, d], g[n1, s + j, d], g[n2, s + j, d], \
                            g[n3, s + j, d]
                        gW[f, j, d] += (v0 * x0 + v1 * x1) + (v2 * x2 + v3 * x3)
                        a0 += w * x0
                        a1 += w * x1
                        a2 += w * x2
                        a3 += w * x3
                    gp[q] += a0
                    gp[q + 1] += a1
                    gp[q + 2] += a2
                    gp[q + 3] += a3
                    q += 4
                for r in range(q, end):
                    v, n = pval[r], token[r]
                    acc = np.float32(0.0)
                    for d in range(D):
                        x = g[n, s + j, d]
                        gW[f, j, d] += v * x
                        acc += W[f, j, d] * x
                    gp[r] += acc


@njit(cache=True)
@no_type_check
def _bias_grad(ptr, pval, db):
    for f in range(db.shape[0]):
        acc = np.float32(0.0)
        for q in range(ptr[f, 0], ptr[f, ptr.shape[1] - 1]):
            acc += pval[q]
        db[f] = acc


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


@njit(inline="always")
@no_type_check
def _key(b):
    """float32 bits (as int64) -> an unsigned key that orders as the float does."""
    return (0xFFFFFFFF ^ b) if b >= 0x80000000 else (b | 0x80000000)


@njit(parallel=True, cache=True)
@no_type_check
def _kth(x, k, out):
    """Radix select on `_key`: a histogram of the keys' high 16 bits finds the bucket holding
    the k-th largest, a second pass over that bucket's low 16 bits finds it exactly (the same
    order-preserving view as `clt.transcoder.kth_largest`)."""
    rows, n = x.shape
    for row in prange(rows):
        bits = x[row].view(np.uint32)
        hist = np.zeros(65536, np.int64)
        for i in range(n):
            hist[_key(np.int64(bits[i])) >> 16] += 1
        above, hi = 0, 65535
        while above + hist[hi] < k:
            above += hist[hi]
            hi -= 1
        need = k - above  # its rank within bucket hi
        hist[:] = 0
        for i in range(n):
            key = _key(np.int64(bits[i]))
            if (key >> 16) == hi:
                hist[key & 0xFFFF] += 1
        above, lo = 0, 65535
        while above + hist[lo] < need:
            above += hist[lo]
            lo -= 1
        key = (hi << 16) | lo
        back = (key & 0x7FFFFFFF) if key >= 0x80000000 else (0xFFFFFFFF ^ key)
        out[row] = np.array([back], np.uint32).view(np.float32)[0]


def kth_largest(x, k):
    """The k-th largest entry of every row of x [rows, n] (1 <= k <= n): two counting passes
    per row (`_kth`; on a BatchTopK CLT's [30, 2M] pre-activations 0.115 s against 0.44 s for
    numpy's introselect on a copy of each row)."""
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


@njit(parallel=True, cache=True)
@no_type_check
def _transpose_into(src, dst):
    """dst [D, F] = src [F, D]^T, in 64 x 64 tiles (both sides' cache lines used whole)."""
    F, D = src.shape
    for bd in prange((D + 63) // 64):
        for bf in range(0, F, 64):
            for d in range(bd * 64, min(D, bd * 64 + 64)):
                for f in range(bf, min(F, bf + 64)):
                    dst[d, f] = src[f, d]


@njit(cache=True)
@no_type_check
def _encoder_layers(dz, feat, row_ptr, x, dW, db, tb):
    """The encoder's gradients over the entries, into dW [layer, d_model, feature] (W_enc's own
    layout, so nothing transposes it on the way to the update) and db [layer, feature]: each
    layer's rows are summed feature-major, tb tokens at a time (`_grad_both`, a zero W: its
    value gradient is not wanted) into a [feature, d_model] scratch that stays in cache, then
    tiled into dW."""
    L, N, D = x.shape
    F = dW.shape[2]
    scratch = np.empty((F, 1, D), x.dtype)
    no_W = np.zeros((F, 1, D), x.dtype)
    for layer in range(L):
        ptr, token, pval, _ = _by_feature(row_ptr[layer].astype(np.int64), feat[layer],
                                          dz[layer], F, tb)
        _grad_both(ptr, token, pval, no_W, x[layer].reshape(N, 1, D), scratch,
                   np.zeros(pval.shape[0], x.dtype), 0)
        _bias_grad(ptr, pval, db[layer])
        _transpose_into(scratch.reshape(F, D), dW[layer])


@njit(parallel=True, cache=True)
@no_type_check
def _adam(p, g, m, v, c):
    """`clt.train.adam_update`'s elementwise rule on float32 [rows, n] arrays, in place (p, m,
    v) and in one pass: XLA's CPU backend runs it as three loops (m, v, then p, reading the
    gradient and the new moments again), 10 sweeps of the tensor against 7 here. c: float32
    [a1, b1, a2, b2, c1, c2, step, scale, ok, eps] (a = 1 - b), computed by the caller as the
    XLA rule computes them; no fast-math, so each operation rounds as XLA's does. Row by row
    (row views vectorize; flat index ranges did not: 0.28 against 0.7-1.1 s on a CLT's
    decoders)."""
    a1, b1, a2, b2, c1, c2, step, scale, eps = c[0], c[1], c[2], c[3], c[4], c[5], c[6], \
        c[7], c[9]
    if c[8] == 0:  # a refused step changes nothing (the rule's decay 1, gradient 0, step 0)
        return
    for r in prange(p.shape[0]):
        pr, gr, mr, vr = p[r], g[r], m[r], v[r]
        for i in range(pr.shape[0]):
            gi = gr[i] * scale
            mi = a1 * gi + b1 * mr[i]
            vi = a2 * (gi * gi) + b2 * vr[i]
            mr[i] = mi
            vr[i] = vi
            pr[i] = pr[i] - step * ((mi / c1) / (np.sqrt(vi / c2) + eps))


def adam(p, g, m, v, c):
    """`_adam` on numpy arrays: the new (p, m, v), the inputs untouched (the FFI handler's
    reference in its self-test)."""
    rows = np.shape(p)[0]  # tensors of rank >= 1, as the handler takes them
    p, m, v = (np.array(a, np.float32).reshape(rows, -1) for a in (p, m, v))
    _adam(p, _np(g, np.float32).reshape(rows, -1), m, v, _np(c, np.float32))
    return p, m, v


def encoder_grad(dz, feat, row_ptr, x, n_features):
    """Encoder gradients over the entries: dz [layer, C] (the pre-activations' cotangents), x
    [layer, n_tokens, d_model] the inputs; returns (dW_enc [layer, d_model, F], db_enc
    [layer, F]). Rows of features without entries are 0."""
    x, feat, row_ptr = _np(x), _np(feat, np.int32), _np(row_ptr, np.int64)
    dz = _np(dz, x.dtype)
    L, N, D = x.shape
    dW = np.empty((L, D, n_features), x.dtype)
    db = np.empty((L, n_features), x.dtype)
    _encoder_layers(dz, feat, row_ptr, x, dW, db, TOKEN_BLOCK)
    return dW, db


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
        ptr, _, pfeat, pval = _by_block(row_ptr[s], feat[s], vals[s], FEATURE_BLOCK)
        _forward(ptr, pfeat, pval, w, out, s)
    return out


def backward(vals, feat, row_ptr, W, g):
    """Gradients of `forward` given g [n_tokens, layer, d_model]: (d vals [layer, C], d W)."""
    W = tuple(_np(w) for w in W)
    vals, feat, row_ptr = _np(vals, W[0].dtype), _np(feat, np.int32), _np(row_ptr, np.int64)
    g = _np(g, W[0].dtype)
    gv = np.zeros(vals.shape, W[0].dtype)  # padding entries keep 0
    gW = []
    for s, w in enumerate(W):
        ptr, token, pval, order = _by_feature(row_ptr[s], feat[s], vals[s], w.shape[0],
                                              TOKEN_BLOCK)
        gp = np.zeros(order.shape[0], w.dtype)
        gW.append(np.empty(w.shape, w.dtype))
        _grad_both(ptr, token, pval, w, g, gW[-1], gp, s)
        gv[s][order] = gp
    return gv, tuple(gW)
