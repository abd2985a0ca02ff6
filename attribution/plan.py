"""How much memory, disk and time a trace will take, predicted after the forward pass and before
any row (`cltrace trace --plan`).

After the forward pass the tracer knows every active feature, so it knows each mode's rows, its
batches (each on its position prefix, its sweep stopping above its highest target layer: see
`attribution.trace._rows`), and the size of every array it will hold. The planner then measures
this device once:
- one batch of rows at the longest prefix and the deepest sweep (the logit batch: the first
  call's extra time is compilation; then it is made at least four times, until the last two
  calls are within 10% of the best, that best being the batch's run time), and one on the same
  prefix at layer 0 (the shallowest sweep), timed the same way;
- one host pass over a block of float32 (abs, row sums, a matrix-vector product: what pruning,
  influence and scores are made of), as seconds per element;
- one write of 64 MB of memory new to the process, as seconds per byte.

Predicted time = compilation x distinct prefixes + every batch's run time, on the line through
the two measured batches' arithmetic and seconds (`_RowMaker.flops`: prefix length, sweep depth,
the active slots its decoder contraction reads; a fixed part per batch plus one per FLOP) + the
first write of the arrays the mode holds (fresh memory, at the measured seconds per byte) + the
host passes of influence, pruning and scores over the graph held (`HOST_PASSES`: influence takes one pass, in layer order; pruning's edge scores two;
row sums and the pruned graph the rest). A capped trace's greedy visit adds one pass over its
rows so far at every influence update; its batches are replayed on the visit's first ranking
(the features' influence through the measured targets' rows), each group of `update_interval`
batches sorted by layer and position as the visit sorts them. Predicted peak memory = the
process's resident memory after the measured batch (model, transcoder, replacement model, one
batch's buffers, compiled programs; less the model weights a single trace frees) + the arrays
the mode holds, or the peak before the first row (loading, the forward pass) if higher. The
arrays: the dense adjacency and pruning's kept-edge mask (`DENSE_BYTES` bytes per entry, an
upper bound: the mask is held among the kept nodes only; pruning reads the adjacency chunk by
chunk), a streamed trace's stored graph and its row batches, a capped trace's row buffer. Disk: the
`--save-full` graph (every nonzero edge as float16 + int32 column; about half of a row's sources
are upstream of it); the default slim file holds the pruned graph only and is smaller.

`scripts/bench_plan.py` checks predictions against measured runs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from attribution.graph import node_levels
from attribution.hostmem import trim_heap
from attribution.influence import influence
from attribution.stream import DENSE_BYTES, dense_batches, stream_batches, visit_batches

EDGE_FILE_BYTES = 6  # float16 value + int32 column per stored edge
HOST_PASSES = 8  # host passes over the held graph: influence, pruning and scores (docstring)
NONZERO_SHARE = 0.5  # of a row's sources, roughly those upstream of it


@dataclass(frozen=True)
class ModePlan:
    """One way to trace the prompt: what it makes and holds, and what it costs."""

    mode: str  # "dense", "stream", "capped"
    features_kept: int  # feature nodes of the stored graph
    rows: int  # rows made (targets of backward sweeps)
    batches: int
    compilations: int  # distinct position prefixes
    peak_gb: float
    disk_mb: float
    seconds: float
    seconds_rows: float
    seconds_host: float
    refused: str = ""  # why the tracer would refuse it (over max_adjacency_gb), else ""
    chosen: bool = False  # what the given config runs


@dataclass(frozen=True)
class Measured:
    """This device, measured by the planner."""

    base_gb: float  # resident memory after one full batch
    batch_seconds: float  # one full-prefix, full-depth batch, compiled
    compile_seconds: float  # its compilation (first call minus second)
    host_seconds_per_element: float  # one host pass over a float32 element

    full_flops: float = 0.0  # the measured batch's arithmetic (`_RowMaker.flops`)
    # The process's peak resident memory before the first row (loading and the forward pass):
    # a small trace's peak, once a single trace frees the weights no row reads.
    setup_peak_gb: float = 0.0
    # The measured batch's rows (the first targets' rows, host): the greedy visit's first ranking.
    logit_rows: np.ndarray | None = field(default=None, repr=False, compare=False)
    # A second batch on the same prefix at layer 0 (the shallowest sweep): with the full one it
    # splits a batch's time into a fixed part and a part proportional to its arithmetic.
    low_seconds: float = 0.0
    low_flops: float = 0.0
    # Writing fresh memory, per byte (`_fresh_seconds_per_byte`): the arrays a mode holds are
    # written once, page by page, as they fill.
    fresh_seconds_per_byte: float = 0.0

    def batch(self, make, P: int, layer: int) -> float:
        """A batch's seconds: a line through the two measured batches' (arithmetic, seconds)
        (its fixed part clamped to [0, the full batch's time]), or the full batch's scaled by
        arithmetic alone when only it was measured. The line: scaling by arithmetic alone
        under-predicted the dense 6-token trace by 24% (scripts/bench_plan.py), whose many
        shallow batches each cost more than their arithmetic says."""
        if not self.full_flops:
            return self.batch_seconds
        flops = make.flops(P, layer)
        if self.low_flops and self.full_flops > self.low_flops:
            rate = max(self.batch_seconds - self.low_seconds, 0.0) / (
                self.full_flops - self.low_flops)
            fixed = min(max(self.batch_seconds - rate * self.full_flops, 0.0),
                        self.batch_seconds)
            return fixed + rate * flops
        return self.batch_seconds * flops / self.full_flops


def _rss_gb() -> float:
    trim_heap()  # live memory, not freed heap pages (one plan read 0.5 GB more without)
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:  # Linux without psutil
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _peak_gb() -> float:
    """This process's peak resident memory so far."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


# Timed calls of a measured batch: at least MIN_CALLS, then until the last two are within SETTLED
# of the best so far (at most MAX_CALLS); the best of them. On this project's VM the first calls
# after compiling read up to 3x slow (fresh buffers faulted in): the demo's full batch 0.65,
# 0.30, 0.29 s; its layer-0 batch 0.12, 0.07, 0.03, 0.03 s. Timing two calls over-predicted the
# demo's dense trace by 117%; stopping at the first two calls that agreed took 0.499, 0.497 s
# for a batch whose next calls ran in 0.34-0.36 s (a streamed plan 28% over).
SETTLED = 0.10
MIN_CALLS = 4
MAX_CALLS = 8


def _settled_seconds(run) -> float:
    times: list[float] = []
    while len(times) < MAX_CALLS:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        best = min(times)
        if len(times) >= MIN_CALLS and max(times[-2:]) <= (1 + SETTLED) * best:
            break
    return min(times)


FRESH_BYTES = 64 * 2**20  # over glibc's mmap threshold (32 MB at most): fresh pages


def _fresh_seconds_per_byte() -> float:
    """Seconds per byte to write memory the process has not touched yet (the kernel maps it as
    it is written). On a VM this varies more than anything else measured here: this project's
    2-core VM took 6-7 s per GB for memory new to the process (0.15 s per GB for a block it had
    just freed), so a dense 24-token graph's 9 GB adjacency and mask cost ~50 s of a 163 s trace,
    which the planner under-predicted by 30% until it counted this. Once, not the best of a
    few: repeating reuses the pages just freed."""
    t0 = time.perf_counter()
    a = np.empty(FRESH_BYTES, np.uint8)
    a.fill(1)
    seconds = time.perf_counter() - t0
    del a
    return seconds / FRESH_BYTES


def measure(st, n_layers: int) -> Measured:
    """Time one logit batch (its first call compiles it, then `_settled_seconds`), the same
    batch at layer 0, and a host pass; the RSS after, and the peak before the batch."""
    setup_peak = _peak_gb()
    fresh = _fresh_seconds_per_byte()
    make = st.make
    L, T = n_layers, st.n_pos
    vec = st.logit_dirs[:make.batch]
    layer = np.full(len(vec), L, np.int32)
    pos = np.full(len(vec), T - 1, np.int32)
    t0 = time.perf_counter()
    rows = make(layer, pos, vec)
    first = time.perf_counter() - t0
    full = _settled_seconds(lambda: make(layer, pos, vec))
    # The same prefix (compiled already) at layer 0: the shallowest sweep.
    low = _settled_seconds(lambda: make(np.zeros_like(layer), pos, vec))
    a = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32)
    w = np.ones(1024, np.float32)
    h = np.empty_like(a)  # written once before timing: a fresh array's page faults are not a pass
    best = float("inf")
    for _ in range(4):  # the best of a few (another process's burst is not this device)
        t0 = time.perf_counter()
        np.abs(a, out=h)
        s = h.sum(axis=1)
        (w / np.maximum(s, 1e-10)) @ h
        best = min(best, time.perf_counter() - t0)
    return Measured(_rss_gb(), full, max(first - full, 0.0), best / a.size,
                    make.flops(make.prefix_length(pos), L), setup_peak_gb=setup_peak,
                    logit_rows=np.asarray(rows), low_seconds=low,
                    low_flops=make.flops(make.prefix_length(pos), 0),
                    fresh_seconds_per_byte=fresh)


def _visit_batches(st, m: Measured, n_layers: int, cap: int, group: int) -> list | None:
    """The greedy visit's batches replayed on a proxy ranking: the influence of the features
    from the measured targets' rows, which is the visit's own first ranking (later ones also
    count the rows made since). As the visit does, each `group` (update_interval x batch) of
    the ranking is sorted by layer and position, then cut into batches. None without rows."""
    if m.logit_rows is None or not st.n_all:
        return None
    k, n_src = len(m.logit_rows), st.n_src
    levels = node_levels(st.active.layer, st.err_layer, st.n_pos, st.n_logit, n_layers)
    weights = np.zeros(n_src + st.n_logit)
    weights[n_src:] = st.logit_probs if st.weights is None else st.weights
    infl = influence(m.logit_rows, weights, n_src + np.arange(k), levels=levels)
    rank = np.argsort(-infl[:st.n_all], kind="stable")[:cap]
    return [c for g in range(0, len(rank), group)
            for c in visit_batches(st.active, rank[g:g + group], st.batch)]


def _batch_costs(st, m: Measured, L: int, batches) -> tuple[float, set]:
    seconds, prefixes = 0.0, set()
    for b in batches:
        P = st.make.prefix_length(st.active.pos[b])
        prefixes.add(P)
        seconds += m.batch(st.make, P, int(st.active.layer[b].max()))
    return seconds, prefixes


def plan_modes(st, config, n_layers: int, m: Measured | None = None,
               released_gb: float = 0.0) -> list[ModePlan]:
    """Dense, streamed and capped plans for the prompt of `st` (a `TraceSetup`) under `config`
    (its max_feature_nodes for the capped plan, else 1/8 of the active features).
    `released_gb`: model weights the trace frees after its forward pass (a single trace frees
    those no row reads: `attribution.replacement.release_unswept`), out of the measured base."""
    from attribution.stream import use_stream

    m = m or measure(st, n_layers)
    m = dataclasses.replace(m, base_gb=m.base_gb - released_gb)
    L, T, B = n_layers, st.n_pos, st.batch
    n_all, n_err, n_logit, n_src = st.n_all, st.n_err, st.n_logit, st.n_src
    logit_batches = -(-n_logit // B)
    logit_seconds = logit_batches * m.batch_seconds
    host = m.host_seconds_per_element
    passes = HOST_PASSES
    out = []

    def refused(cfg) -> str:
        try:
            use_stream(cfg, n_all, cfg.max_feature_nodes if cfg.max_feature_nodes is not None
                       else n_all, n_src, n_err, T, n_logit)
        except ValueError as e:
            return str(e)
        return ""

    def add(mode, kept, rows, batches, prefixes, rows_s, held_gb, host_s, disk_nnz, cfg):
        compile_s = m.compile_seconds * len(prefixes | {T})
        # The held arrays are fresh memory, written as the rows fill them.
        rows_s = compile_s + rows_s + logit_seconds + held_gb * 2**30 * m.fresh_seconds_per_byte
        out.append(ModePlan(
            mode, kept, rows, batches, len(prefixes | {T}),
            round(max(m.setup_peak_gb, m.base_gb + held_gb), 3),
            round(disk_nnz * EDGE_FILE_BYTES / 2**20, 2),
            round(rows_s + host_s, 2), round(rows_s, 2), round(host_s, 2), refused(cfg)))

    # Dense: every feature's row, by position prefix, then layer.
    feat = dense_batches(st.active, B, st.make.prefix_length)
    rows_s, prefixes = _batch_costs(st, m, L, feat)
    N = n_all + n_err + T + n_logit
    add("dense", n_all, n_all + n_logit, len(feat) + logit_batches, prefixes, rows_s,
        N * N * DENSE_BYTES / 2**30, host * N * N * passes,
        (n_all + n_logit) * n_src * NONZERO_SHARE,
        dataclasses.replace(config, adjacency="dense", max_feature_nodes=None))

    # Streamed: every row once, top layer first, folded; then the kept features' rows again.
    keep = min(config.stream_features, n_all)
    sb = stream_batches(st.active, L, B)
    rows_s, prefixes = _batch_costs(st, m, L, sb)
    again = rows_s * keep / max(n_all, 1)
    S = keep + n_err + T + n_logit
    fold_s = host * (n_all + n_logit) * n_src * 2  # |rows| and their spread, batch by batch
    add("stream", keep, n_all + n_logit + keep, len(sb) + logit_batches + -(-keep // B),
        prefixes, rows_s + again, (S * S * DENSE_BYTES + 3 * B * n_src * 4) / 2**30,
        host * S * S * passes + fold_s, (keep + n_logit) * (S - n_logit) * NONZERO_SHARE,
        dataclasses.replace(config, adjacency="stream", max_feature_nodes=None))

    # Capped: the greedy visit's `cap` rows (rank by influence every update_interval batches).
    cap = (min(config.max_feature_nodes, n_all) if config.max_feature_nodes is not None
           else max(1, n_all // 8))
    n_b = -(-cap // B)
    visit = _visit_batches(st, m, L, cap, config.update_interval * B)
    if visit is not None:
        visit_rows_s, visit_prefixes = _batch_costs(st, m, L, visit)
        n_b = len(visit)
    else:  # no measured rows: every batch on the whole prompt, at the mean layer
        mean_layer = float(st.active.layer.mean()) if n_all else 0.0
        visit_rows_s = n_b * m.batch(st.make, st.make.prefix_length(np.array([T - 1])),
                                     round(mean_layer))
        visit_prefixes = set()
    updates = -(-n_b // config.update_interval)
    visit_s = sum(host * (n_logit + min(cap, (u + 1) * config.update_interval * B)) * n_src
                  for u in range(updates))
    Nc = cap + n_err + T + n_logit
    buf = (n_logit + cap) * n_src * 4
    add("capped", cap, cap + n_logit, n_b + logit_batches, visit_prefixes, visit_rows_s,
        (2 * buf + Nc * Nc * DENSE_BYTES) / 2**30, visit_s + host * Nc * Nc * passes,
        (cap + n_logit) * (Nc - n_logit) * NONZERO_SHARE,
        dataclasses.replace(config, max_feature_nodes=cap))

    chosen = ("capped" if config.max_feature_nodes is not None and config.max_feature_nodes
              < n_all else "stream" if st.streamed else "dense")
    return [dataclasses.replace(p, chosen=p.mode == chosen) for p in out]


__all__ = ["DENSE_BYTES", "HOST_PASSES", "Measured", "ModePlan", "measure", "plan_modes"]
