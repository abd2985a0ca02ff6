"""Training cross-layer transcoders: loss, optimizer, sharded train step, loop, checkpoints.

The loss is the one of "Circuit Tracing" (Ameisen et al., 2025), in a space where every layer's
inputs and outputs are normalised (`clt.transcoder.Norms`, estimated from data, folded into the
weights on export):
    L = sum_l mean_d (y_hat_l - y_l)^2                              reconstruction, per token
      + lambda(step) * sum_{l,i} tanh(c * ||W_dec,l,i|| * a_l,i)     sparsity (lambda ramped)
      + mu * sum_{l,i} relu(threshold_l,i - z_l,i) * ||W_dec,l,i||   pre-activation (dead features)
averaged over tokens, with ||W_dec,l,i|| the norm of feature i's decoders over its target layers.
Adam with warm-up, decay and gradient clipping. Parameters and optimizer state are sharded over
the mesh axis 'feature', batches over 'data' (`clt.sharding`); with several processes whose
devices split 'data', each generates only its own rows of every batch (`clt.data`, shares).
Checkpoints are orbax, resumable to the identical next step and restorable onto another mesh.

Nothing is silently wrong or lost: settings and inputs are checked before the model loads
(`TrainConfig.__post_init__`, `preflight`); the run directory is locked (`clt.train_run.RunLock`);
`resume=False` moves an earlier run aside instead of mixing with it; a step whose loss, gradients
or updated parameters are NaN/inf is refused, so only finite states are saved; a checkpoint is
reported saved only once it is on disk; metrics, configs and the export are written atomically,
and a full disk is one line naming what was not written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clt import sharding as shd
from clt import sparse as sp
from clt.configs import ConfigError, to_dict
from clt.data import DataPosition
from clt.io import atomic_write, check_output_dir
from clt.lm.params import Leaf
from clt.train_config import TrainConfig, check_resume
from clt.train_run import (
    Interrupts,
    MetricsLog,
    RunLock,
    TrainBar,
    move_aside,
    note,
    tensorboard_writer,
)
from clt.transcoder import (
    Norms,
    TranscoderConfig,
    TranscoderParams,
    activate,
    add_bias_and_skip,
    decode,
    decoder_norms,
    encode_pre,
    fold_norms,
    init_params,
)

# How one step runs: None is the dense step; (capacity, kernels) the sparse one with `capacity`
# support entries per token and layer and the kernel set of `clt.sparse`.
StepMode = tuple[int, str] | None


@jax.tree_util.register_dataclass
@dataclass
class TrainState:
    params: TranscoderParams
    opt_state: optax.OptState
    norms: Norms
    step: Leaf  # int32 scalar


# --- loss ----------------------------------------------------------------------------------------
def sparsity_lambda(train_cfg: TrainConfig, step):
    ramp = max(1, int(train_cfg.steps * train_cfg.sparsity_ramp))
    return train_cfg.sparsity_coef * jnp.minimum(1.0, step.astype(jnp.float32) / ramp)


def loss_fn(params: TranscoderParams, tc_cfg: TranscoderConfig, train_cfg: TrainConfig, x, y, lam,
            mode: StepMode = None, kernels: str = "xla"):
    """Loss and metrics of one batch x, y [batch, layer, d_model] (normalised space).

    With a sparse `mode` the activations are kept at the support entries only (`clt.sparse`):
    the same loss and gradients, the decoder run over the entries. `kernels` finds BatchTopK's
    cut in the dense step (the sparse step uses its mode's)."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    n_tok = x.shape[0]
    kernels = mode[1] if mode is not None else kernels
    preact = tc_cfg.activation == "jumprelu" and train_cfg.preact_coef > 0
    # Decoder norms only where a penalty reads them (a CLT's norms cost ~5% of a sparse step).
    dn = decoder_norms(tc_cfg, params, train_cfg.decoder_norm) \
        if train_cfg.sparsity_coef > 0 or preact else None  # [l, f]
    # The sparse step works layer-major ([layer, batch, feature]): faster batched matmuls, and
    # each layer's entries are one contiguous block.
    lm = mode is not None
    # The sparse step takes the encoder's gradient over the entries only, unless a penalty reads
    # every pre-activation (JumpReLU's): the dense z then carries no gradient.
    sparse_enc = lm and not preact
    x_in = jnp.moveaxis(x, 1, 0) if lm else x
    z = encode_pre(jax.lax.stop_gradient(params) if sparse_enc else params, x_in, layer_major=lm)
    per_lf = (lambda v: v[:, None, :]) if lm else (lambda v: v)  # [l, f] against z
    # The support is where gradients can flow; the dense step reports it to size sparse steps.
    support, cut = sp.training_support(tc_cfg, params, jax.lax.stop_gradient(z),
                                       train_cfg.jumprelu_bandwidth, layer_major=lm,
                                       kernels=kernels)
    if mode is None:
        a = activate(tc_cfg, params, z, bandwidth=train_cfg.jumprelu_bandwidth, training=True,
                     mask=support.astype(z.dtype) if cut is not None else None)
        y_hat = decode(tc_cfg, params, a, x)
        dn_a, overflow = dn, jnp.zeros((), bool)
        counts = support.sum((0, 2))
    else:
        act = sp.select(support, mode[0] * n_tok, mode[1])
        z_e = sp.gather_entries(z, act)
        if sparse_enc:
            z_e = sp.encoder_entries(params, z_e, x_in, act, mode[1])
        a = sp.activate_entries(tc_cfg, params, z_e, act.feat,
                                train_cfg.jumprelu_bandwidth) * act.valid  # [l, C]
        writes = sp.decode_entries(tc_cfg, params, a, act, n_tok, mode[1])
        y_hat = add_bias_and_skip(params, writes, x)
        dn_a = None if dn is None else jnp.take_along_axis(dn, act.feat, 1)
        overflow, counts = act.overflow, act.count
    err = jnp.square(y_hat - y)  # [b, l, d]
    mse = err.mean(-1).sum(-1).mean()
    # Sums over every (token,) layer, feature, or entry, per token: zeros add nothing.
    sparsity = jnp.zeros(()) if dn_a is None else \
        jnp.tanh(train_cfg.sparsity_c * dn_a * a).sum() / n_tok
    loss = mse + lam * sparsity
    if preact:
        loss = loss + train_cfg.preact_coef * (
            jax.nn.relu(per_lf(params.threshold) - z) * per_lf(dn)).sum() / n_tok
    # NMSE per layer over this batch: sum ||y_hat - y||^2 / sum ||y - mean y||^2.
    var = jnp.square(y - y.mean(0)).sum((0, 2))
    nmse = err.sum((0, 2)) / jnp.maximum(var, 1e-12)
    per_layer = (a > 0).sum(-1) if mode is not None else (a > 0).sum((0, 2))
    l0 = per_layer.astype(jnp.float32) / n_tok  # [layer]
    metrics = {"loss": loss, "mse": mse, "sparsity": sparsity, "nmse": nmse, "l0": l0,
               "lambda": lam, "overflow": overflow,
               "support": counts.max().astype(jnp.float32) / n_tok,
               "finite_batch": jnp.isfinite(x).all() & jnp.isfinite(y).all()}
    if cut is not None:
        metrics["batch_cut"] = cut
    return loss, metrics


# --- optimizer and step ----------------------------------------------------------------------------
ADAM_EPS = 1e-8  # optax's default, written out: adam_update and make_optimizer share it


def learning_rate(train_cfg: TrainConfig) -> optax.Schedule:
    """Adam's step size at each step: linear warmup, then cosine, linear or constant."""
    decay_steps = max(1, train_cfg.steps - train_cfg.warmup_steps)
    end = train_cfg.lr * train_cfg.final_lr_fraction
    if train_cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(train_cfg.lr, decay_steps,
                                            alpha=train_cfg.final_lr_fraction)
    elif train_cfg.decay == "linear":
        after = optax.linear_schedule(train_cfg.lr, end, decay_steps)
    else:
        after = optax.constant_schedule(train_cfg.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, train_cfg.lr, max(1, train_cfg.warmup_steps)), after],
        [train_cfg.warmup_steps])


def make_optimizer(train_cfg: TrainConfig) -> optax.GradientTransformation:
    """optax's clip-by-global-norm + Adam: the optimizer state's layout (init, shardings,
    checkpoints) and the reference that `adam_update`, the step's own update, is tested against."""
    parts = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip > 0 else []
    parts.append(optax.adam(learning_rate(train_cfg), b1=train_cfg.beta1, b2=train_cfg.beta2,
                            eps=ADAM_EPS))
    return optax.chain(*parts)


def adam_update(params, grads, opt_state, train_cfg: TrainConfig, ok, kernels: str = "xla"):
    """`make_optimizer`'s update and `optax.apply_updates` in one elementwise pass per tensor.

    optax runs clip, moments, bias correction, step size and apply as separate sweeps (4.4 s on a
    CLT's 580M parameters on 2 CPU cores, against 0.8 s fused). XLA's CPU backend still splits
    the rule into three loops per tensor (m, v, then p, which reads the gradient and the new
    moments again); with `kernels` "cpu" (one CPU device) the float32 tensors are updated in
    place by one numba pass (`clt._sparse_cpu._adam`, the same operations in the same order).
    When `ok` is false (or the gradient norm or the step size is not finite) nothing changes:
    the moments keep their values (decay 1, gradient 0), the step size is 0 and the counts
    stay, so no select over the state is needed. Returns (params, opt_state, applied, step size)."""
    adam, sched = opt_state[-1]
    g_norm = optax.global_norm(grads)
    count = adam.count + 1  # optax's count after this update (bias correction)
    lr = learning_rate(train_cfg)(sched.count)
    ok = ok & jnp.isfinite(g_norm) & jnp.isfinite(lr)
    scale = jnp.float32(1.0)
    if train_cfg.grad_clip > 0:
        scale = jnp.where(ok & (g_norm >= train_cfg.grad_clip),
                          train_cfg.grad_clip / jnp.maximum(g_norm, 1e-30), 1.0)
    b1 = jnp.where(ok, jnp.float32(train_cfg.beta1), 1.0)
    b2 = jnp.where(ok, jnp.float32(train_cfg.beta2), 1.0)
    c1 = 1.0 - jnp.float32(train_cfg.beta1) ** count.astype(jnp.float32)
    c2 = 1.0 - jnp.float32(train_cfg.beta2) ** count.astype(jnp.float32)
    step = jnp.where(ok, lr, 0.0)

    def one(p, g, m, v):
        g = jnp.where(ok, g.astype(jnp.float32), 0.0) * scale
        m = (1.0 - b1) * g + b1 * m
        v = (1.0 - b2) * (g * g) + b2 * v
        new = p - step * ((m / c1) / (jnp.sqrt(v / c2) + ADAM_EPS))
        return new.astype(p.dtype), m, v

    tdef = jax.tree.structure(params)
    leaves = list(zip(jax.tree.leaves(params), jax.tree.leaves(grads), jax.tree.leaves(adam.mu),
                      jax.tree.leaves(adam.nu)))
    out = [None] * len(leaves)
    fused = [i for i, t in enumerate(leaves)
             if t[0].ndim and all(a.dtype == jnp.float32 for a in t)]
    if kernels == "cpu" and fused:
        from clt import _sparse_ffi  # compiles its handlers: only where they may run

        if _sparse_ffi.available():
            consts = jnp.stack([1.0 - b1, b1, 1.0 - b2, b2, c1, c2, step, scale,
                                ok.astype(jnp.float32), jnp.float32(ADAM_EPS)])
            ps, ms, vs = _sparse_ffi.adam(*([leaves[i][j] for i in fused] for j in range(4)),
                                          consts.astype(jnp.float32))  # `one`, in one pass
            for i, p, m, v in zip(fused, ps, ms, vs):
                out[i] = (p, m, v)
    out = [o if o is not None else one(*t) for o, t in zip(out, leaves)]
    new_p, mu, nu = (jax.tree.unflatten(tdef, [o[i] for o in out]) for i in range(3))
    inc = ok.astype(adam.count.dtype)
    last = (adam._replace(count=adam.count + inc, mu=mu, nu=nu),
            sched._replace(count=sched.count + inc))
    return new_p, opt_state[:-1] + (last,), ok, lr


def _train_step(state: TrainState, x, y, tc_cfg: TranscoderConfig, train_cfg: TrainConfig,
                mode: StepMode = None, kernels: str = "xla"):
    """One Adam step on raw activations x, y [batch, layer, d_model] (normalised here). A sparse
    step whose support overflowed its capacity leaves the state untouched (metrics['overflow'])
    for the caller to run the batch densely."""
    lam = sparsity_lambda(train_cfg, state.step)
    nm = state.norms
    x = (x.astype(jnp.float32) - nm.in_mean) / nm.in_scale[:, None]
    y = (y.astype(jnp.float32) - nm.out_mean) / nm.out_scale[:, None]
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, tc_cfg, train_cfg, x, y, lam, mode, kernels)
    # A non-finite loss, gradient or step size, or an overflowed sparse support, leaves the state
    # untouched (checked before the update: no select over the state). A finite update of finite
    # parameters stays finite (Adam moves each by at most ~lr/sqrt(1-beta2), lr <= 10).
    params, opt_state, ok, lr = adam_update(state.params, grads, state.opt_state, train_cfg,
                                            jnp.isfinite(loss) & ~metrics["overflow"],
                                            mode[1] if mode is not None else kernels)
    if tc_cfg.activation == "batchtopk":
        params = _follow_batch_cut(params, metrics["batch_cut"], state.step, ok)
    new = TrainState(params=params, opt_state=opt_state, norms=state.norms,
                     step=state.step + ok.astype(state.step.dtype))
    metrics["finite"] = ok | metrics["overflow"]
    metrics["lr"] = lr
    return new, metrics


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.isfinite(a).all() for a in jax.tree.leaves(tree)
              if jnp.issubdtype(a.dtype, jnp.floating)]
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def _follow_batch_cut(params: TranscoderParams, cut, step, ok) -> TranscoderParams:
    """BatchTopK's inference threshold: a running mean (then a 1% moving average) of each
    layer's batch cut, the smallest kept pre-activation (Bussmann et al. 2024). The threshold
    gets no gradient in training, so Adam leaves it alone."""
    rate = jnp.maximum(0.01, 1.0 / (step.astype(jnp.float32) + 1.0))
    th = jnp.exp(params.log_threshold)
    th = th + rate * (jnp.maximum(cut, 1e-6)[:, None] - th)
    return dataclasses.replace(params, log_threshold=jnp.where(ok, jnp.log(th),
                                                               params.log_threshold))


def state_shardings(tc_cfg: TranscoderConfig, train_cfg: TrainConfig, mesh) -> TrainState:
    """Where every leaf of the training state lives on `mesh` (optimizer state like params)."""
    ps = shd.param_shardings(tc_cfg, mesh)
    rep = shd.replicated(mesh)
    identity = Norms.identity(tc_cfg.n_layers, tc_cfg.d_model)
    abstract = jax.eval_shape(lambda: init_state(tc_cfg, train_cfg, identity))
    opt = optax.tree_map_params(make_optimizer(train_cfg), lambda _, s: s, abstract.opt_state, ps,
                                transform_non_params=lambda _: rep)
    return TrainState(params=ps, opt_state=opt, norms=jax.tree.map(lambda _: rep, abstract.norms),
                      step=rep)


def init_state(tc_cfg: TranscoderConfig, train_cfg: TrainConfig, norms: Norms,
               params: TranscoderParams | None = None) -> TrainState:
    if params is None:
        params = init_params(tc_cfg, jax.random.key(train_cfg.seed),
                             threshold=train_cfg.threshold_init)
    return TrainState(params=params, opt_state=make_optimizer(train_cfg).init(params), norms=norms,
                      step=jnp.zeros((), jnp.int32))


def _initial_params(tc_cfg: TranscoderConfig, train_cfg: TrainConfig, norms: Norms
                    ) -> TranscoderParams | None:
    """`train_cfg.init_from`'s weights in the normalised space of `norms` (None: random init)."""
    if train_cfg.init_from is None:
        return None
    from clt.transcoder import load, unfold_norms

    _check_init_from(tc_cfg, train_cfg)
    return unfold_norms(tc_cfg, load(train_cfg.init_from)[1], norms)


def _check_init_from(tc_cfg: TranscoderConfig, train_cfg: TrainConfig) -> None:
    """Refuse (reading its config.json only) an init_from transcoder of another architecture."""
    if train_cfg.init_from is None:
        return
    path = Path(train_cfg.init_from) / "config.json"
    if not path.exists():
        raise ConfigError(f"init_from {train_cfg.init_from} is not a cltrace transcoder: "
                          "config.json is missing")
    old = TranscoderConfig.from_json(path.read_text())
    fields = ("d_model", "n_layers", "n_features", "max_reach", "activation", "skip",
              "input_point", "output_point", "layers")
    diff = [f for f in fields if getattr(old, f) != getattr(tc_cfg, f)]
    if diff:
        raise ConfigError(f"init_from {train_cfg.init_from} has a different {', '.join(diff)} "
                          f"({', '.join(f'{f}={getattr(old, f)}' for f in diff)}); train with "
                          "its architecture or drop init_from")


def compile_step(tc_cfg: TranscoderConfig, train_cfg: TrainConfig, mesh, mode: StepMode = None,
                 kernels: str = "xla", donate: bool = False):
    """The jitted train step (dense, or sparse with `mode`) with in/out shardings for `mesh`.

    donate: the step reuses the input state's buffers for its output (a CLT's state is ~3x its
    parameters: without donation a step holds two), so the caller must drop the state it passed
    and keep the returned one, which equals the input when the step was refused (non-finite or
    overflow)."""
    ss = state_shardings(tc_cfg, train_cfg, mesh)
    bs = shd.batch_sharding(mesh)
    return jax.jit(partial(_train_step, tc_cfg=tc_cfg, train_cfg=train_cfg, mode=mode,
                           kernels=kernels),
                   in_shardings=(ss, bs, bs), out_shardings=(ss, shd.replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


def place_state(state: TrainState, tc_cfg, train_cfg, mesh) -> TrainState:
    return jax.device_put(state, state_shardings(tc_cfg, train_cfg, mesh))


def export_params(tc_cfg: TranscoderConfig, state: TrainState) -> TranscoderParams:
    """Parameters acting on raw model activations (normalisation folded in), on the host. With
    several processes every one calls it: the parameters are gathered from all of them."""
    params = fold_norms(tc_cfg, state.params, state.norms)
    if jax.process_count() > 1:  # features sharded over processes: no process holds them all
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.device_get(params)
    if not bool(_all_finite(params)):
        raise NonFiniteError(f"the state at step {int(jax.device_get(state.step))} folds into "
                             "NaN/inf parameters; not exported")
    return params


class Steps:
    """Runs each batch with the dense or the sparse step, as `train_cfg.sparse` says, sizing the
    sparse step's capacity from the support the steps report.

    The capacity grows as soon as a batch overflows it (that batch then runs densely, so every
    update is exact) and shrinks when the last 50 batches needed at most half of it; steps are
    compiled once per capacity. `auto` runs sparse when the capacity is at most a quarter of
    the features and the kernels are fast on this device (`kernels_for`)."""

    WINDOW = 50

    def __init__(self, tc_cfg: TranscoderConfig, train_cfg: TrainConfig, mesh,
                 donate: bool = False):
        self.cfg, self.train_cfg, self.mesh, self.donate = tc_cfg, train_cfg, mesh, donate
        self.kernels = kernels_for(train_cfg, mesh)
        self.fixed = train_cfg.sparse_capacity > 0
        # topk / batchtopk keep k per token (on average), plus one for ties at the cut.
        topk = tc_cfg.activation in ("topk", "batchtopk")
        self.capacity = train_cfg.sparse_capacity or (tc_cfg.k + 1 if topk else None)
        self._compiled: dict = {}
        self._need: list[float] = []
        self.dense_reruns = 0

    def mode(self) -> StepMode:
        train_cfg, cap = self.train_cfg, self.capacity
        if train_cfg.sparse == "off" or cap is None:
            return None
        if train_cfg.sparse == "on":
            return cap, self.kernels or "xla"
        if self.kernels is None or 4 * cap > self.cfg.n_features:
            return None
        return cap, self.kernels

    def fn(self, mode: StepMode):
        if mode not in self._compiled:
            self._compiled[mode] = compile_step(self.cfg, self.train_cfg, self.mesh, mode,
                                                kernels=self.kernels or "xla",
                                                donate=self.donate)
        return self._compiled[mode]

    def __call__(self, state: TrainState, x, y):
        mode = self.mode()
        if self.donate:  # a donated state may not hold one array twice
            state = _distinct_leaves(state)
        new, m = self.fn(mode)(state, x, y)
        if mode is not None and bool(m["overflow"]):
            self.dense_reruns += 1
            new, m = self.fn(None)(new, x, y)  # `new` is the untouched state
        self._resize(float(m["support"]))
        m["sparse"] = 0 if mode is None else mode[0]
        return new, m

    def _resize(self, need: float):
        if self.fixed:
            return
        self._need = (self._need + [need])[-self.WINDOW:]
        if self.capacity is None or need > self.capacity:
            self.capacity = _pow2_at_least(1.25 * need, self.cfg.n_features)
        elif len(self._need) == self.WINDOW:
            want = _pow2_at_least(1.25 * max(self._need), self.cfg.n_features)
            if want <= self.capacity // 2:
                self.capacity = want


def _pow2_at_least(v: float, cap: int) -> int:
    return int(min(cap, 2 ** int(np.ceil(np.log2(max(v, 1.0))))))


def kernels_for(train_cfg: TrainConfig, mesh) -> str | None:
    """The sparse step's kernel set on `mesh`, or None where no fast one exists (`auto` then
    stays dense): XLA's gathers on GPU/TPU, numba on one CPU device (on a 2-core CPU, an XLA
    row gather took 3-4x longer than the dense matmul it replaces: an ad-hoc measurement,
    noted on issue 14; `--sparse-kernels xla` with scripts/bench_train.py measures it)."""
    devices = mesh.devices.ravel()
    single_cpu = devices[0].platform == "cpu" and len(devices) == 1 and jax.process_count() == 1
    if train_cfg.sparse_kernels == "cpu":
        why = "they run on one CPU device only" if not single_cpu else sp.cpu_kernels_available()
        if why:
            raise ConfigError(f"sparse_kernels=cpu cannot run here: {why}; use xla or auto")
    if train_cfg.sparse_kernels != "auto":
        return train_cfg.sparse_kernels
    if devices[0].platform != "cpu":
        return "xla"
    if single_cpu and sp.cpu_kernels_available() is None:
        return "cpu"
    return None


def _prefetch(train_cfg: TrainConfig, mesh) -> bool:
    """Overlap generation with training on accelerators; on a CPU both use the same cores."""
    if train_cfg.prefetch != "auto":
        return train_cfg.prefetch == "on"
    return mesh.devices.ravel()[0].platform != "cpu"


class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf; the message names the step and the last good checkpoint."""




# --- checkpoints -----------------------------------------------------------------------------------
def _manager(out: Path, keep: int, asynchronous: bool = True):
    import orbax.checkpoint as ocp

    if keep < 1:  # orbax deletes every checkpoint with max_to_keep=0
        raise ConfigError(f"keep_checkpoints must be at least 1, got {keep}")
    return ocp.CheckpointManager(
        (out / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=asynchronous))


# A failed save (a full disk) can raise any of these from orbax or tensorstore.
_SAVE_ERRORS = (OSError, ValueError, RuntimeError)


def saved_steps(directory) -> list[int]:
    """Steps of the complete checkpoints in `directory` (orbax writes a step into a temporary
    directory and renames it when it is whole)."""
    d = Path(directory)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def remove_partial_checkpoints(directory) -> list[Path]:
    """Delete the temporary directories of saves that did not complete (a kill, a full disk).
    Only the process holding the run's lock may call this."""
    d = Path(directory)
    partial = [p for p in d.glob("*.orbax-checkpoint-tmp*")] if d.is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def _discard_partial_saves(directory, settle: float = 0.5, limit: float = 60.0) -> None:
    """Remove what a failed save left, once its writers (orbax keeps writing an item's arrays
    after another item failed) have stopped changing it."""
    def files():
        return {(str(f), f.stat().st_size) for p in Path(directory).glob("*.orbax-checkpoint-tmp*")
                for f in p.rglob("*") if f.is_file()}

    last, deadline = None, time.monotonic() + limit
    while (now := files()) and now != last and time.monotonic() < deadline:
        last = now
        time.sleep(settle)
    remove_partial_checkpoints(directory)


def _save_failed(mngr, step: int | None, e: BaseException) -> ConfigError:
    _discard_partial_saves(mngr.directory)
    last = saved_steps(mngr.directory)
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    where = f"checkpoint {step}" if step is not None else "a checkpoint"
    return ConfigError(f"cannot save {where} in {mngr.directory}: {why}; "
                       + (f"the last saved checkpoint is {last[-1]}" if last else
                          "no checkpoint is saved")
                       + " (free some space and run the same command to resume)")


def save_checkpoint(mngr, state: TrainState, pos: DataPosition, extra: dict | None = None):
    """Start saving `state` (finite: a NaN/inf state is never saved); `wait_saved` tells
    whether it reached the disk. A failed save is a one-line ConfigError."""
    import orbax.checkpoint as ocp

    step = int(jax.device_get(state.step))
    if not bool(_all_finite(state.params)):
        raise NonFiniteError(f"the state at step {step} holds NaN/inf parameters; not saved "
                             f"(the last saved checkpoint is {mngr.latest_step()})")
    wait_saved(mngr)  # an earlier background save that failed is reported as such
    if mngr.latest_step() == step:
        return step
    meta = {"data_position": pos.to_dict(), "step": step, **(extra or {})}
    try:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave(meta)), force=True)
    except _SAVE_ERRORS as e:
        raise _save_failed(mngr, step, e) from None
    _STARTED[mngr] = step
    return step


# The step whose save each manager started last: checked on disk once it should be there (orbax
# may only log a failed background save).
_STARTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def wait_saved(mngr, step: int | None = None) -> bool:
    """Wait for the saves under way (a failed one is a ConfigError, also when orbax only logged
    it); whether checkpoint `step` (if given) is now on disk."""
    try:
        mngr.wait_until_finished()
    except _SAVE_ERRORS as e:
        _STARTED.pop(mngr, None)
        raise _save_failed(mngr, step, e) from None
    started = _STARTED.pop(mngr, None)
    if started is not None and started not in saved_steps(mngr.directory):
        raise _save_failed(mngr, started, RuntimeError("it did not reach the disk"))
    return step is None or step in saved_steps(mngr.directory)


@contextmanager
def _orbax_errors_in_one_line():
    """orbax logs a failed background save with its traceback before raising it where we wait;
    we report it as one line (`_save_failed`), so its traceback is dropped."""
    def drop(record: logging.LogRecord) -> bool:
        return not (record.exc_info and "orbax" in record.pathname)

    logger = logging.getLogger("absl")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def restore_checkpoint(mngr, tc_cfg: TranscoderConfig, train_cfg: TrainConfig, mesh,
                       step: int | None = None) -> tuple[TrainState, DataPosition, dict]:
    """The state at `step` (default: latest) laid out for `mesh`, whatever mesh saved it."""
    import orbax.checkpoint as ocp

    step = mngr.latest_step() if step is None else step
    identity = Norms.identity(tc_cfg.n_layers, tc_cfg.d_model)
    abstract = jax.eval_shape(lambda: init_state(tc_cfg, train_cfg, identity))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_shardings(tc_cfg, train_cfg, mesh))
    try:
        got = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # truncated files, a different architecture
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"checkpoint {step} in {mngr.directory} cannot be restored ({msg}); "
                          "delete it to fall back to an earlier one, or start a new run "
                          "directory") from None
    meta = dict(got.meta)
    return got.state, DataPosition(**meta["data_position"]), meta


# --- the loop --------------------------------------------------------------------------------------
@dataclass
class _Meter:
    """Running throughput for the progress bar."""

    t0: float
    tokens: int = 0

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)


def _to_global(a: jax.Array, sharding, shares: int = 1):
    """The global batch on `sharding` from this process's `a`: the whole batch (one process, or
    processes that each built it), or its rows of `shares` equal ones
    (`clt.sharding.data_share`)."""
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    if shares > 1:
        return jax.make_array_from_process_local_data(sharding, a,
                                                      (a.shape[0] * shares, *a.shape[1:]))
    host = np.asarray(a)  # every process built the same global batch
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _data_layout(mesh) -> tuple[int, int | None]:
    """(shares, share) of the activation stream: each process generates its own rows of every
    batch where the mesh's 'data' axis splits over processes, else (1, None): whole batches."""
    got = shd.data_share(mesh)
    return (1, None) if got is None or got[1] == 1 else (got[1], got[0])


def _say_layout(stream) -> None:
    """Every process's log says which contexts of each round it generates."""
    n, R = jax.process_count(), stream.round_contexts
    if n == 1:
        return
    if stream.share is None:
        note(f"activations: process {jax.process_index()} of {n} generates all {R} contexts "
             "of each round: the mesh's 'data' axis does not give each process its own rows "
             "of a batch")
        return
    lo, hi = stream.share_span(stream.share)
    note(f"activations: process {jax.process_index()} of {n} generates {hi - lo} of {R} "
         f"contexts per round (contexts {lo}-{hi - 1}: share {stream.share}, "
         f"{stream.batch_tokens // stream.shares} of every batch's {stream.batch_tokens} "
         "tokens)")


def _summary(m: dict, step: int, rate: float) -> dict:
    m = jax.device_get(m)
    return {"step": step, "loss": float(m["loss"]), "mse": float(m["mse"]),
            "sparsity": float(m["sparsity"]), "lambda": float(m["lambda"]),
            "nmse": float(np.mean(m["nmse"])), "l0": float(np.sum(m["l0"])),
            "nmse_per_layer": [round(float(v), 5) for v in m["nmse"]],
            "l0_per_layer": [round(float(v), 2) for v in m["l0"]], "tokens_per_s": rate}


def preflight(train_cfg: TrainConfig) -> None:
    """Checks of the files a run reads and writes, before any model is loaded: the text (present,
    not empty, text in its encoding), init_from, and output paths that exist as files."""
    from clt.data import check_text_source

    check_text_source(train_cfg.data, train_cfg.text_field, train_cfg.encoding,
                      train_cfg.text_errors)
    if train_cfg.init_from is not None and not (Path(train_cfg.init_from) / "config.json"
                                                ).is_file():
        raise ConfigError(f"init_from {train_cfg.init_from} is not a cltrace transcoder: "
                          "config.json is missing")
    for what, path in (("out", train_cfg.out), ("cache_activations", train_cfg.cache_activations)):
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise ConfigError(f"{what} {path} exists and is not a directory; choose another path")


def train(train_cfg: TrainConfig, *, resume: bool = True, progress: bool = True,
          on_step: Callable[[int], None] | None = None, mesh=None, model=None) -> Path:
    """Train a transcoder as `train_cfg` says; returns the exported transcoder's directory.

    Resumes from the run directory's latest checkpoint when there is one (and `resume`); with
    `resume=False` an earlier run in it is moved aside first (to `<out>.replaced-<time>`, named
    in a note). The run directory is locked while training: a second process refuses, naming
    the first. Ctrl-C or SIGTERM saves a checkpoint before stopping (at the end of the step
    under way: steps reuse the state's memory); a NaN/inf stops with NonFiniteError after
    saving the last good (finite) state. `on_step(step)` is called after every step.
    """
    preflight(train_cfg)
    out = Path(train_cfg.out)
    lock = None
    if jax.process_index() == 0:
        lock = RunLock(out)  # before the directory is made: whether this run made it
        check_output_dir(out, "run directory (out)")
        lock.acquire()
    try:
        if not resume and lock is not None:
            aside = move_aside(out)
            if aside is not None:
                note(f"not resuming: the previous run in {out} was moved to {aside}")
        with _orbax_errors_in_one_line():
            return _train(train_cfg, out, resume, progress, on_step, mesh, model)
    finally:
        if lock is not None:
            lock.release()


def _train(train_cfg: TrainConfig, out: Path, resume: bool, progress: bool, on_step, mesh,
           model) -> Path:
    from clt.data import ActivationStream, estimate_norms, open_contexts
    from clt.lm.loading import load_model
    from clt.transcoder import check_model, save

    model = model or load_model(train_cfg.model)
    if train_cfg.context_length > model.cfg.max_position:
        raise ConfigError(f"TrainConfig.context_length {train_cfg.context_length} exceeds the "
                          f"model's context of {model.cfg.max_position} tokens")
    tc_cfg = train_cfg.transcoder_config(model.cfg)
    check_model(tc_cfg, model.cfg)
    mesh = mesh or shd.make_mesh(train_cfg.mesh_data, train_cfg.mesh_feature)
    shd.check_divisible(tc_cfg, mesh, train_cfg.batch_tokens)
    if resume:
        check_resume(out, train_cfg, model.cfg)
    _check_init_from(tc_cfg, train_cfg)
    main = jax.process_index() == 0
    contexts = open_contexts(train_cfg.data, model.tokenizer, train_cfg.context_length,
                             seed=train_cfg.seed, text_field=train_cfg.text_field,
                             holdout=train_cfg.holdout, encoding=train_cfg.encoding,
                             text_errors=train_cfg.text_errors)
    shares, share = _data_layout(mesh)
    stream = ActivationStream(
        model, contexts, input_point=tc_cfg.input_point, output_point=tc_cfg.output_point,
        batch_tokens=train_cfg.batch_tokens,
        round_contexts=train_cfg.round_contexts, model_batch=train_cfg.model_batch,
        seed=train_cfg.seed,
        outlier_factor=train_cfg.outlier_factor, dtype=jnp.dtype(train_cfg.activation_dtype),
        cache_dir=train_cfg.cache_activations, layers=tc_cfg.model_layers,
        shares=shares, share=share)
    _say_layout(stream)
    if main:
        atomic_write(out / "config.json", json.dumps({"kind": "train",
                                                      "config": to_dict(train_cfg)}, indent=2))
        atomic_write(out / "transcoder_config.json", tc_cfg.to_json())
        remove_partial_checkpoints(out / "checkpoints")
    mngr = _manager(out, train_cfg.keep_checkpoints, train_cfg.async_checkpoints)
    if resume and mngr.latest_step() is not None:
        state, pos, _ = restore_checkpoint(mngr, tc_cfg, train_cfg, mesh)
        if pos.shares != shares and main:
            note(f"the checkpoint's data position (round {pos.round}, batch {pos.batch}) was "
                 f"reached with {pos.shares} data shares (processes generating activations), "
                 f"this run has {shares}: from there on its batches hold other tokens of the "
                 "same contexts")
    else:
        norms = estimate_norms(stream, train_cfg.norm_rounds)
        state = place_state(init_state(tc_cfg, train_cfg, norms,
                                       _initial_params(tc_cfg, train_cfg, norms)),
                            tc_cfg, train_cfg, mesh)
        pos = DataPosition()
    step_fn = Steps(tc_cfg, train_cfg, mesh, donate=True)
    bsh = shd.batch_sharding(mesh)
    step = int(jax.device_get(state.step))
    metrics = MetricsLog(out / "metrics.jsonl", step) if main else None
    tb = tensorboard_writer(out) if main else None
    meter, last = _Meter(time.perf_counter()), None
    bar = TrainBar(progress, train_cfg.steps, step)
    signals = Interrupts()

    def resume_hint() -> str:
        _finish_saves(mngr)
        saved = saved_steps(mngr.directory)
        return (f"; run the same command to resume from checkpoint {saved[-1]}" if saved else
                "; no checkpoint is saved yet")

    try:
        batches = stream.batches(pos, reuse=train_cfg.data_reuse,
                                 prefetch=_prefetch(train_cfg, mesh))
        while step < train_cfg.steps:
            nxt, x, y = next(batches)
            with signals.step():  # the step takes `state`'s memory: no interrupt until it is back
                state, m = step_fn(state, _to_global(x, bsh, shares), _to_global(y, bsh, shares))
                if not bool(m["finite"]):  # the step left the state untouched
                    raise _non_finite(m, step, mngr, state, pos, out)
                pos, step = nxt, step + 1
            meter.tokens += train_cfg.batch_tokens
            last = m
            if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                row = _summary(m, step, meter.rate())
                row.update(sparse_capacity=m["sparse"], dense_reruns=step_fn.dense_reruns)
                meter = _Meter(time.perf_counter())  # tokens/s over the last interval
                if metrics is not None:
                    metrics.write(row, resume_hint)
                if tb is not None:
                    for k in ("loss", "mse", "nmse", "l0", "lambda", "tokens_per_s"):
                        tb.add_scalar(k, row[k], step)
                bar.update(step, row)
            if step % train_cfg.checkpoint_every == 0:
                save_checkpoint(mngr, state, pos)
            if on_step is not None:
                on_step(step)
    except KeyboardInterrupt:
        bar.close()
        if any(a.is_deleted() for a in jax.tree.leaves(state)):  # a second signal mid-step
            saved = saved_steps(mngr.directory)
            print(f"interrupted inside step {step + 1}: nothing saved; run the same command to "
                  f"resume from checkpoint {saved[-1]}" if saved else
                  f"interrupted inside step {step + 1}: no checkpoint saved")
            raise
        why = ""
        try:
            save_checkpoint(mngr, state, pos)
            saved = wait_saved(mngr, step)
        except ConfigError as e:  # a full disk: said, and the interrupt goes on
            saved, why = False, f" ({e})"
        if saved:
            print(f"interrupted: checkpoint {step} saved in {out}; run the same command to "
                  "resume")
        else:
            print(f"interrupted: checkpoint {step} was not saved{why}{resume_hint()}")
        raise
    except BaseException:
        _finish_saves(mngr)  # whatever stopped the run, the checkpoints it started complete
        raise
    finally:
        signals.restore()
        bar.close()
        if metrics is not None:
            metrics.close()
    save_checkpoint(mngr, state, pos)
    if not wait_saved(mngr, step):
        raise _save_failed(mngr, step, RuntimeError("it did not reach the disk"))
    final = _summary(last, step, meter.rate()) if last is not None else {}
    path = out / "transcoder"
    params = export_params(tc_cfg, state)  # in every process: gathered from all of them
    if main:
        save(path, tc_cfg, params,
             dtype=None if train_cfg.export_dtype == "float32" else train_cfg.export_dtype,
             extra={"train_config": to_dict(train_cfg), "final_metrics": final})
    return path


def _finish_saves(mngr) -> None:
    """Wait for the saves under way, on the way out of a run that is already failing (its own
    error is the one reported)."""
    try:
        mngr.wait_until_finished()
    except _SAVE_ERRORS:
        pass


def _non_finite(m: dict, step: int, mngr, state: TrainState, pos: DataPosition, out: Path
                ) -> NonFiniteError:
    """The error of a refused step, after saving the (untouched, finite) state before it."""
    save_checkpoint(mngr, state, pos)
    saved = wait_saved(mngr, step)
    if not bool(m["finite_batch"]):
        where = "the batch holds NaN/inf"
    elif not bool(jnp.isfinite(m["lr"])):
        where = "the learning rate is NaN/inf"
    else:
        where = "the loss or gradients overflowed (lower lr or sparsity_coef)"
    kept = (f"the last good state is saved as checkpoint {step} in {out}" if saved else
            f"the last good state (step {step}) could not be saved")
    return NonFiniteError(f"training stopped at step {step + 1}: {where}; {kept}")


def _distinct_leaves(state: TrainState) -> TrainState:
    """The state with a copy of every leaf whose memory an earlier leaf holds too (e.g.
    `Norms.identity`'s means; device_put keeps the sharing), so that the whole state can be
    donated."""
    seen: set[int] = set()

    def one(a):
        ptr = a.addressable_shards[0].data.unsafe_buffer_pointer()
        if ptr in seen:
            return a.copy()
        seen.add(ptr)
        return a

    return jax.tree.map(one, state)


__all__ = [
    "NonFiniteError", "Steps", "TrainConfig", "TrainState", "compile_step", "export_params",
    "adam_update", "init_state", "kernels_for", "learning_rate", "loss_fn",
    "make_optimizer", "place_state", "preflight",
    "remove_partial_checkpoints", "restore_checkpoint", "save_checkpoint", "saved_steps",
    "sparsity_lambda", "state_shardings", "train", "wait_saved",
]
