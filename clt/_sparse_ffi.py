"""The sparse step's CPU kernels (`clt._sparse_cpu`: the decoder's forward and backward, the
encoder's gradient over the entries, the support's selection and BatchTopK's cut) as XLA FFI
handlers: XLA hands them its own buffers, so nothing is copied in or out.

Through `jax.pure_callback` a sparse CLT step spent much of its time moving data: the decoder
(2.3 GB for SmolLM2 at 2,048 features per layer) went to the forward and backward callbacks and
its 2.3 GB gradient came back. Side by side (scripts/bench_train.py, jax 0.10.2, 2-core CPU) the
step takes 9.6 s with these handlers against 13.3 s through callbacks (the dense step: 26.2 s);
the encoder's, the selection's and the cut's callbacks had copied the 250 MB pre-activations
and the encoder's inputs and gradient (~0.2 s of a 3.7 s step).
Here each kernel is a numba `cfunc` with XLA's typed FFI signature
(`XLA_FFI_Error* handler(XLA_FFI_CallFrame*)`, xla/ffi/api/c_api.h), registered with
`jax.ffi.register_ffi_target` and called with `jax.ffi.ffi_call`. The handler reads the call
frame's argument and result buffers (address, rank, extents) and runs the same njit kernels on
them in place. At registration XLA asks the handler for its metadata (the API version it was
built against): it answers with XLA's own version, read from the call frame.

The byte offsets below are those of the C API's structs on a 64-bit platform:
  XLA_FFI_CallFrame: struct_size, extension_start, api, ctx, stage (+pad), args (5 words: struct_size,
    extension_start, size, types, args), rets (5 words), attrs (6 words), future
  XLA_FFI_Buffer: struct_size, extension_start, dtype (+pad), data, rank, dims
  XLA_FFI_Extension_Base: struct_size, type (+pad), next; metadata extension: + metadata pointer
  XLA_FFI_Metadata: struct_size, api_version (struct_size, extension_start, major, minor), traits
`available()` registers them and checks them once per process against the numpy kernels (else
`clt.sparse` keeps pure_callback).
"""

from __future__ import annotations

import ctypes
import threading
from typing import no_type_check

import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from clt import _sparse_cpu as K

_METADATA = 1  # XLA_FFI_Extension_Metadata
_ARGS, _RETS = 9, 14  # words of the call frame holding args.args and rets.rets (void**)


def _pointer(ty):
    @intrinsic
    def cast(typingctx, addr):  # an int64 address as a typed pointer
        sig = ty(addr)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ty))

        return sig, codegen

    return cast


_i64 = _pointer(types.CPointer(types.int64))
_i32 = _pointer(types.CPointer(types.int32))
_f32 = _pointer(types.CPointer(types.float32))
_u8 = _pointer(types.CPointer(types.uint8))


@njit(inline="always")
@no_type_check
def _word(addr, k):
    return carray(_i64(addr), (k + 1,))[k]


@njit(inline="always")
@no_type_check
def _buffer(frame, which, i):
    """(data address, dims address) of argument or result buffer i."""
    b = _word(_word(frame, which), i)  # XLA_FFI_Buffer*
    return _word(b, 3), _word(b, 5)


@njit(inline="always")
@no_type_check
def _metadata(frame):
    """Answers XLA's metadata query (registration): 1 if the frame was one, else 0."""
    ext = _word(frame, 1)
    if ext == 0:
        return 0
    if carray(_i32(ext + 8), (1,))[0] == _METADATA:
        meta = _word(ext, 3)
        xla_version = carray(_i32(_word(frame, 2) + 32), (2,))  # api->api_version.major/minor
        ours = carray(_i32(meta + 24), (2,))
        ours[0] = xla_version[0]
        ours[1] = xla_version[1]
        carray(_i32(meta + 32), (1,))[0] = 0  # no traits
    return 1


@njit(inline="always")
@no_type_check
def _entries(frame):
    """vals, feat [L, C] and row_ptr [L, N + 1] (arguments 0-2), with L, C, N."""
    d, dims = _buffer(frame, _ARGS, 0)
    L, C = _word(dims, 0), _word(dims, 1)
    vals = carray(_f32(d), (L, C))
    d, _ = _buffer(frame, _ARGS, 1)
    feat = carray(_i32(d), (L, C))
    d, dims = _buffer(frame, _ARGS, 2)
    row_ptr = carray(_i32(d), (L, _word(dims, 1)))
    return vals, feat, row_ptr, L, C, _word(dims, 1) - 1


@njit(inline="always")
@no_type_check
def _decoder(frame, which, i):
    d, dims = _buffer(frame, which, i)
    return carray(_f32(d), (_word(dims, 0), _word(dims, 1), _word(dims, 2)))


@cfunc(types.int64(types.int64))
@no_type_check
def _forward_handler(frame):
    """Arguments vals, feat, row_ptr, W_dec[0..L-1]; result out [N, L, D] (`forward`)."""
    if _metadata(frame):
        return 0
    vals, feat, row_ptr, L, _, _ = _entries(frame)
    d, dims = _buffer(frame, _RETS, 0)
    N, D = _word(dims, 0), _word(dims, 2)
    out = carray(_f32(d), (N, L, D))
    out[:] = 0.0
    for s in range(L):
        w = _decoder(frame, _ARGS, 3 + s)
        ptr, _, pfeat, pval = K._by_block(row_ptr[s].astype(np.int64), feat[s], vals[s],
                                          K.FEATURE_BLOCK)
        K._forward(ptr, pfeat, pval, w, out, s)
    return 0


@cfunc(types.int64(types.int64))
@no_type_check
def _backward_handler(frame):
    """Arguments vals, feat, row_ptr, W_dec[0..L-1], g [N, L, D]; results d vals [L, C], then
    d W_dec[0..L-1] (`backward`)."""
    if _metadata(frame):
        return 0
    vals, feat, row_ptr, L, C, N = _entries(frame)
    d, dims = _buffer(frame, _ARGS, 3 + L)
    g = carray(_f32(d), (N, L, _word(dims, 2)))
    d, _ = _buffer(frame, _RETS, 0)
    gv = carray(_f32(d), (L, C))
    gv[:] = 0.0  # padding entries keep 0
    for s in range(L):
        w = _decoder(frame, _ARGS, 3 + s)
        rp = row_ptr[s].astype(np.int64)
        ptr, token, pval, order = K._by_feature(rp, feat[s], vals[s], w.shape[0],
                                                K.TOKEN_BLOCK)
        gp = np.zeros(order.shape[0], np.float32)
        K._grad_both(ptr, token, pval, w, g, _decoder(frame, _RETS, 1 + s), gp, s)
        for p in range(order.shape[0]):
            gv[s, order[p]] = gp[p]
    return 0


@cfunc(types.int64(types.int64))
@no_type_check
def _encoder_handler(frame):
    """Arguments dz, feat [L, C], row_ptr, x [L, N, D]; results d W_enc [L, D, F], d b_enc
    [L, F] (`encoder_grad`)."""
    if _metadata(frame):
        return 0
    dz, feat, row_ptr, L, _, N = _entries(frame)
    d, dims = _buffer(frame, _ARGS, 3)
    x = carray(_f32(d), (L, N, _word(dims, 2)))
    d, dims = _buffer(frame, _RETS, 0)
    dW = carray(_f32(d), (L, _word(dims, 1), _word(dims, 2)))
    d, _ = _buffer(frame, _RETS, 1)
    db = carray(_f32(d), (L, dW.shape[2]))
    K._encoder_layers(dz, feat, row_ptr, x, dW, db, K.TOKEN_BLOCK)
    return 0


@cfunc(types.int64(types.int64))
@no_type_check
def _select_handler(frame):
    """Argument support [L, N, F] (bool, one byte each); results tok, feat [L, C], valid
    [L, C], row_ptr [L, N + 1], count [L] (`select`)."""
    if _metadata(frame):
        return 0
    d, dims = _buffer(frame, _ARGS, 0)
    L, N, F = _word(dims, 0), _word(dims, 1), _word(dims, 2)
    mask = carray(_u8(d), (L, N, F))
    d, dims = _buffer(frame, _RETS, 0)
    C = _word(dims, 1)
    tok = carray(_i32(d), (L, C))
    d, _ = _buffer(frame, _RETS, 1)
    feat = carray(_i32(d), (L, C))
    d, _ = _buffer(frame, _RETS, 2)
    valid = carray(_f32(d), (L, C))
    d, _ = _buffer(frame, _RETS, 3)
    row_ptr = carray(_i32(d), (L, N + 1))
    d, _ = _buffer(frame, _RETS, 4)
    K._select(mask, tok, feat, valid, row_ptr, carray(_i32(d), (L,)))
    return 0


@cfunc(types.int64(types.int64))
@no_type_check
def _kth_handler(frame):
    """Arguments x [rows, n] (float32), k (int32, one element); result the k-th largest of
    every row [rows] (`kth_largest`)."""
    if _metadata(frame):
        return 0
    d, dims = _buffer(frame, _ARGS, 0)
    rows, n = _word(dims, 0), _word(dims, 1)
    x = carray(_f32(d), (rows, n))
    d, _ = _buffer(frame, _ARGS, 1)
    k = carray(_i32(d), (1,))[0]
    d, _ = _buffer(frame, _RETS, 0)
    K._kth(x, k, carray(_f32(d), (rows,)))
    return 0


@njit(inline="always")
@no_type_check
def _rows(frame, which, i):
    """Argument or result buffer i (float32, any rank >= 1) as [first extent, the rest]."""
    b = _word(_word(frame, which), i)  # XLA_FFI_Buffer*
    rank, dims = _word(b, 4), _word(b, 5)
    n = 1
    for r in range(1, rank):
        n *= _word(dims, r)
    return carray(_f32(_word(b, 3)), (_word(dims, 0), n))


@cfunc(types.int64(types.int64))
@no_type_check
def _adam_handler(frame):
    """Arguments c [10], then n tensors p, then their g, m, v (float32; p, g, m, v of one
    tensor share a shape); results the n new p, then m, then v (`adam`), each the buffer of
    its input (aliased), updated in place one tensor after another."""
    if _metadata(frame):
        return 0
    n = (_word(frame, 7) - 1) // 4  # args.size
    c = _rows(frame, _ARGS, 0)[0]
    for t in range(n):
        p, m = _rows(frame, _RETS, t), _rows(frame, _RETS, n + t)
        v = _rows(frame, _RETS, 2 * n + t)
        for src, dst in ((_rows(frame, _ARGS, 1 + t), p), (_rows(frame, _ARGS, 1 + 2 * n + t), m),
                         (_rows(frame, _ARGS, 1 + 3 * n + t), v)):
            if src.ctypes.data != dst.ctypes.data:  # not aliased after all: start from a copy
                dst[:] = src
        K._adam(p, _rows(frame, _ARGS, 1 + n + t), m, v, c)
    return 0


FORWARD, BACKWARD = "cltrace_sparse_forward", "cltrace_sparse_backward"
ENCODER, SELECT = "cltrace_sparse_encoder_grad", "cltrace_sparse_select"
KTH, ADAM = "cltrace_sparse_kth", "cltrace_adam"
_state: dict[str, bool] = {}


def available() -> bool:
    """Whether the handlers are registered and give the numpy kernels' results here (checked
    once per process, bit for bit, on a small case with several feature and token blocks).
    False (and `clt.sparse` keeps `jax.pure_callback`) if this jax has no `jax.ffi`, refuses
    the handlers, or $CLTRACE_SPARSE_FFI is 0 (for side-by-side measurements)."""
    import os

    if os.environ.get("CLTRACE_SPARSE_FFI", "1") == "0":
        return False
    if "ok" not in _state:
        _state["ok"] = False
        try:
            import jax

            new = ctypes.pythonapi.PyCapsule_New
            new.restype = ctypes.py_object
            new.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)
            for name, fn in ((FORWARD, _forward_handler), (BACKWARD, _backward_handler),
                             (ENCODER, _encoder_handler), (SELECT, _select_handler),
                             (KTH, _kth_handler), (ADAM, _adam_handler)):
                jax.ffi.register_ffi_target(name, new(fn.address, None, None), platform="cpu")
        except (AttributeError, RuntimeError, TypeError, ValueError):  # no jax.ffi; refused
            return False
        # In a thread of its own: available() is usually first called while a step is being
        # traced, and the test must run eagerly (JAX's trace state is per thread).
        done: list[bool] = []
        t = threading.Thread(target=lambda: done.append(_self_test()))
        t.start()
        t.join()
        _state["ok"] = bool(done and done[0])
    return _state["ok"]


def forward(vals, feat, row_ptr, W, n_tokens: int):
    """`clt._sparse_cpu.forward` inside XLA: vals float32 [L, C], feat and row_ptr int32, W the
    float32 decoders; returns [n_tokens, L, d_model]."""
    import jax
    import jax.numpy as jnp

    out = jax.ShapeDtypeStruct((n_tokens, len(W), W[0].shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(
        vals.astype(jnp.float32), feat.astype(jnp.int32), row_ptr.astype(jnp.int32), *W)


def backward(vals, feat, row_ptr, W, g):
    """`clt._sparse_cpu.backward` inside XLA: (d vals [L, C], tuple of d W_dec[s])."""
    import jax
    import jax.numpy as jnp

    outs = (jax.ShapeDtypeStruct(vals.shape, jnp.float32),) + tuple(
        jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in W)
    r = jax.ffi.ffi_call(BACKWARD, outs, vmap_method="sequential")(
        vals.astype(jnp.float32), feat.astype(jnp.int32), row_ptr.astype(jnp.int32), *W,
        g.astype(jnp.float32))
    return r[0], tuple(r[1:])


def encoder_grad(dz, feat, row_ptr, x_lm, n_features: int):
    """`clt._sparse_cpu.encoder_grad` inside XLA: (d W_enc [L, D, F], d b_enc [L, F])."""
    import jax
    import jax.numpy as jnp

    L, _, D = x_lm.shape
    outs = (jax.ShapeDtypeStruct((L, D, n_features), jnp.float32),
            jax.ShapeDtypeStruct((L, n_features), jnp.float32))
    return tuple(jax.ffi.ffi_call(ENCODER, outs, vmap_method="sequential")(
        dz.astype(jnp.float32), feat.astype(jnp.int32), row_ptr.astype(jnp.int32),
        x_lm.astype(jnp.float32)))


def select(support, shapes):
    """`clt._sparse_cpu.select` inside XLA: (tok, feat, valid, row_ptr, count), of `shapes`."""
    import jax
    import jax.numpy as jnp

    return tuple(jax.ffi.ffi_call(SELECT, shapes, vmap_method="sequential")(
        support.astype(jnp.bool_)))


def kth_largest(x, k: int):
    """`clt._sparse_cpu.kth_largest` inside XLA: the k-th largest of every row of x [rows, n]
    (float32), with no copy of x (a BatchTopK CLT's x is 250 MB)."""
    import jax
    import jax.numpy as jnp

    out = jax.ShapeDtypeStruct(x.shape[:1], jnp.float32)
    return jax.ffi.ffi_call(KTH, out, vmap_method="sequential")(
        x.astype(jnp.float32), jnp.full((1,), k, jnp.int32))


def adam(p, g, m, v, c):
    """`clt._sparse_cpu.adam` inside XLA over lists of tensors p, g, m, v, in place: the new
    p, m, v take p's, m's and v's buffers (donated by the train step, so nothing is copied).
    One call for all tensors, so XLA does not run two at once on the cores each one uses."""
    import jax

    n = len(p)
    outs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in p) * 3
    aliases = {1 + i: i for i in range(n)}
    aliases.update({1 + 2 * n + i: n + i for i in range(n)})
    aliases.update({1 + 3 * n + i: 2 * n + i for i in range(n)})
    r = jax.ffi.ffi_call(ADAM, outs, vmap_method="sequential", input_output_aliases=aliases)(
        c, *p, *g, *m, *v)
    return list(r[:n]), list(r[n:2 * n]), list(r[2 * n:])


def _self_test() -> bool:
    """The handlers (decoder forward and backward, encoder gradient, selection, k-th largest,
    Adam) against the numpy kernels on a small random case (3 source layers, 700 features: two
    feature blocks; 300 tokens: two token blocks; padding entries), bit for bit."""
    import warnings

    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    L, N, F, D, k = 3, 300, 700, 8, 5
    W = tuple(rng.standard_normal((F, L - s, D)).astype(np.float32) for s in range(L))
    C = N * k + 7
    feat = np.zeros((L, C), np.int32)
    vals = np.zeros((L, C), np.float32)
    for s in range(L):
        feat[s, :N * k] = np.sort(np.stack([rng.choice(F, k, replace=False)
                                            for _ in range(N)]), 1).ravel()
        vals[s, :N * k] = rng.random(N * k)
    row_ptr = np.tile(np.arange(N + 1, dtype=np.int32) * k, (L, 1))
    g = rng.standard_normal((N, L, D)).astype(np.float32)
    try:
        Wj = tuple(map(jnp.asarray, W))
        out = jax.jit(forward, static_argnums=4)(vals, feat, row_ptr, Wj, N)
        gv, gW = jax.jit(backward)(vals, feat, row_ptr, Wj, g)
        ref_out = K.forward(vals, feat, row_ptr, W)
        ref_gv, ref_gW = K.backward(vals, feat, row_ptr, W, g)
        x = np.moveaxis(g, 1, 0).copy()  # [L, N, D] encoder inputs
        enc = jax.jit(encoder_grad, static_argnums=4)(vals, feat, row_ptr, x, F)
        ref_enc = K.encoder_grad(vals, feat, row_ptr, x, F)
        mask = rng.random((L, N, F)) < 0.01
        ref_sel = K.select(mask, N * k)
        sel = jax.jit(lambda m: select(m, tuple(jax.ShapeDtypeStruct(a.shape, a.dtype)
                                                for a in ref_sel)))(mask)
        z = rng.standard_normal((L, N * F // 7)).astype(np.float32)
        kth = jax.jit(kth_largest, static_argnums=1)(z, 3 * k)
        c = np.array([0.1, 0.9, 1e-3, 0.999, 0.19, 2e-3, 1e-3, 0.5, 1, 1e-8], np.float32)
        pgmv = [rng.standard_normal((5, 70001)).astype(np.float32) for _ in range(4)]
        pgmv[3] = np.abs(pgmv[3])
        ref_adam = K.adam(*pgmv, c)
        got_adam = jax.jit(adam)(*([a] for a in pgmv), c)
        ok = (all(np.array_equal(np.asarray(a[0]), b.reshape(a[0].shape))
                  for a, b in zip(got_adam, ref_adam))
              and np.array_equal(np.asarray(kth), K.kth_largest(z, 3 * k))
              and all(np.array_equal(np.asarray(a), b) for a, b in zip(sel, ref_sel))
              and np.array_equal(np.asarray(out), ref_out)
              and np.array_equal(np.asarray(gv), ref_gv)
              and all(np.array_equal(np.asarray(a), b) for a, b in zip(gW, ref_gW))
              and all(np.array_equal(np.asarray(a), b) for a, b in zip(enc, ref_enc)))
    except Exception as e:  # noqa: BLE001 - any failure means: keep the callbacks
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "results differ from the numpy kernels"
    if not ok:
        warnings.warn(f"the sparse step's XLA FFI kernels are not usable with this jax ({why}); "
                      "using jax.pure_callback (slower)", RuntimeWarning, stacklevel=2)
    return ok
