"""How one source layer's active features are laid out for the tracer's decoder contraction.

`attribution.trace._rows` contracts each batch's gradients at every MLP slot with the decoder rows
of the active features. Activity is uneven over positions (a layer's busiest position can hold 10x
its mean), so instead of padding every position to the busiest one, each position gets K main
slots and the rest of its features go to overflow tiles of Ko slots, whose gradients are gathered
(`Sources`); `tile_widths` picks the (K, Ko) with the least work. That layout is gathered from
the decoder weights by every batch. `SlotTiles` lays the same rows out once per trace, MLP slot
by slot with all the layers writing the slot side by side, so a batch makes one wide product per
slot (used on one device when it fits `TraceConfig.decoder_rows_gb`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from attribution.replacement import ActiveFeatures

# Cost of gathering one overflow tile's gradients ([batch, d_model] at its position), in the
# decoder slots whose contraction costs as much (measured on a CPU: ~40 us against ~0.75 us;
# the 128-token benchmark's speed moves by under 8% for any value from 16 to 160).
GATHER_SLOTS = 54
# Bytes of unit vectors `SlotTiles.cumulative` keeps for every layer's value matrices (above,
# it makes them again for each layer, one chunk at a time).
KEEP_UNITS = 256 * 2**20
# Rows of unit vectors per value_fn call (a fixed shape: one compilation for every prompt).
VALUE_CHUNK = 8192
# Overflow tile widths of `SlotTiles`: wide, so one tile holds a busy position's overflow.
SLOT_TILE_WIDTHS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048)


def tile_widths(counts: np.ndarray, widths=(16, 32, 64, 128)) -> tuple[int, int]:
    """(main width, overflow tile width) for one source layer with these active counts per
    position: the pair with the least work, main rows costing their width at every position,
    overflow tiles (of one of `widths`) their width plus the gather of their gradients."""
    top = -(-max(int(counts.max()), 1) // 16) * 16
    km = np.arange(0, top + 1, 16)[:, None, None]
    ko = np.asarray(widths)[None, :, None]
    over = np.maximum(counts[None, None, :] - km, 0)
    cost = len(counts) * km[..., 0] + np.ceil(over / ko).sum(-1) * (ko[..., 0] + GATHER_SLOTS)
    i, j = np.unravel_index(np.argmin(cost), cost.shape)  # the first of equal costs
    return int(km[i, 0, 0]), int(widths[j])


def aligned_zeros(shape, dtype, align: int = 64) -> np.ndarray:
    """Zeros whose buffer starts on a 64-byte boundary: `jax.device_put` on a CPU then uses the
    buffer as it is, without a copy."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(n + align, np.uint8)
    buf.fill(0)  # in order: pages are faulted in sequentially (scattered first writes are slow)
    start = (-buf.ctypes.data) % align
    return buf[start:start + n].view(dtype).reshape(shape)


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(first, stop) index pairs of the runs of consecutive integers in `values`."""
    cut = np.concatenate([[0], np.flatnonzero(np.diff(values) != 1) + 1, [len(values)]])
    return list(itertools.pairwise(cut.tolist()))


def _writes(flat: np.ndarray, reach: int, active: ActiveFeatures, f: np.ndarray, offset: int,
            dtype=None) -> np.ndarray:
    """What features f of one source layer write into the slot `offset` layers above theirs:
    their decoder rows (flat: the layer's W_dec as [feature x reach, D]) times their
    activations, in `dtype` (default the weights')."""
    rows = flat[active.index[f] * reach + offset]
    if dtype is not None:
        rows = rows.astype(dtype, copy=False)
    rows *= active.value[f][:, None].astype(rows.dtype)
    return rows


@dataclass(frozen=True)
class Sources:
    """One source layer's active features laid out for the decoder contraction (host numpy).

    Position q's first K features fill row q of `index`/`value` ([pos, K]); the rest fill
    overflow tiles of Ko slots (`over_*`, [tiles, Ko], in position order, `over_pos` their
    positions). K and Ko come from `tile_widths`. Padding slots hold activation 0. Activity is
    uneven over positions (a layer's busiest position can hold 10x its mean), so this wastes far
    less work than padding every position to the busiest one, and the main rows need no gather
    of the gradients."""

    layer: int
    pos: np.ndarray  # [n] each feature's position, graph order (sorted)
    main: np.ndarray  # [n] bool: in the main rows (else in an overflow tile)
    cell: np.ndarray  # [n] main: position * K + slot; overflow: tile * Ko + slot in the tile
    index: np.ndarray  # [pos, K] int32
    value: np.ndarray  # [pos, K]
    over_index: np.ndarray  # [tiles, Ko] int32
    over_value: np.ndarray  # [tiles, Ko]
    over_pos: np.ndarray  # [tiles] int32

    @classmethod
    def build(cls, active: ActiveFeatures, layer: int, n_pos: int) -> Sources:
        sel = np.nonzero(active.layer == layer)[0]
        pos = active.pos[sel]
        counts = np.bincount(pos, minlength=n_pos)
        K, Ko = tile_widths(counts)
        slot = np.arange(len(sel)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[pos]
        tiles = -(-np.maximum(counts - K, 0) // Ko)
        first_tile = np.concatenate([[0], np.cumsum(tiles)[:-1]])
        main = slot < K
        over = np.maximum(slot - K, 0)
        cell = np.where(main, pos * K + slot, (first_tile[pos] + over // Ko) * Ko + over % Ko)
        shape_main, shape_over = (n_pos, K), (int(tiles.sum()), Ko)
        index, value = np.zeros(shape_main, np.int32), np.zeros(shape_main, active.value.dtype)
        o_index, o_value = np.zeros(shape_over, np.int32), np.zeros(shape_over, value.dtype)
        for dst_i, dst_v, m in ((index, value, main), (o_index, o_value, ~main)):
            dst_i.flat[cell[m]] = active.index[sel][m]
            dst_v.flat[cell[m]] = active.value[sel][m]
        return cls(layer, pos, main, cell, index, value, o_index, o_value,
                   np.repeat(np.arange(n_pos), tiles).astype(np.int32))

    def device(self) -> tuple:
        return tuple(jnp.asarray(a) for a in (self.index, self.value, self.over_index,
                                               self.over_value, self.over_pos))

    def columns(self, P: int) -> tuple[int, np.ndarray]:
        """For the prefix of P positions: (its overflow tiles, the column of each of its
        features in the contraction's output [main rows [P, K] then overflow tiles])."""
        n = int(np.searchsorted(self.pos, P))
        n_over = int(np.searchsorted(self.over_pos, P))
        start = P * self.index.shape[1]  # the overflow tiles' columns follow the main rows'
        return n_over, np.where(self.main[:n], self.cell[:n], start + self.cell[:n]).astype(
            np.int32)


class Slot(NamedTuple):
    """One MLP slot of `SlotTiles`: feature ids in graph order, -1 for padding."""

    t: int  # the slot (the layer whose MLP output the features write)
    K: int  # main rows per position
    Ko: int  # rows per overflow tile
    main: np.ndarray  # [pos, K] the features of each position's main rows
    main_start: np.ndarray  # [pos] int32 the accumulator row of each position's first main row
    over: np.ndarray  # [tiles, Ko] the features of each overflow tile
    over_pos: np.ndarray  # [tiles] int32 its position
    over_start: np.ndarray  # [tiles] int32 the accumulator row of its first row

    def cells(self, P: int) -> int:
        """Cells (main rows and overflow tiles) at the first P positions."""
        return P * self.K + int(np.searchsorted(self.over_pos, P)) * self.Ko


@dataclass(frozen=True)
class SlotTiles:
    """Every active feature's decoder rows laid out MLP slot by slot, for a contraction whose
    products are wide (host numpy).

    Rows of the accumulator ("acc" order) are the features sorted by (position, layer, graph
    order). Since the layers writing a slot are contiguous, slot t's features at position q are
    one contiguous range of acc rows; each position gets K main rows starting at its range's
    first row (rows past the range hold zero decoder rows, so their products add zeros) and the
    rest of the range goes to overflow tiles of Ko rows (`Slot`)."""

    n_rows: int  # accumulator rows: the features plus the room the last windows spill into
    row_of: np.ndarray  # [n] each feature's accumulator row
    slots: tuple[Slot, ...]

    @classmethod
    def build(cls, active: ActiveFeatures, n_layers: int, writers, n_pos: int) -> SlotTiles:
        """`writers(t)`: the range of source layers whose features write MLP slot t."""
        n = len(active)
        order = np.lexsort((np.arange(n), active.layer, active.pos))
        row_of = np.empty(n, np.int64)
        row_of[order] = np.arange(n)
        key = active.pos[order].astype(np.int64) * n_layers + active.layer[order]
        q = np.arange(n_pos, dtype=np.int64) * n_layers
        slots, spill = [], 0
        for t in range(n_layers):
            src = writers(t)
            a = np.searchsorted(key, q + src.start, "left")
            b = np.searchsorted(key, q + src.stop - 1, "right")
            counts = b - a
            if not counts.any():
                continue
            K, Ko = tile_widths(counts, SLOT_TILE_WIDTHS)
            main = np.full((n_pos, K), -1, np.int64)
            over_feat, over_pos, over_start = [], [], []
            for p in range(n_pos):
                m = min(K, counts[p])
                main[p, :m] = order[a[p]:a[p] + m]
                for start in range(a[p] + K, b[p], Ko):
                    tile = np.full(Ko, -1, np.int64)
                    stop = min(start + Ko, b[p])
                    tile[:stop - start] = order[start:stop]
                    over_feat.append(tile), over_pos.append(p), over_start.append(start)
            spill = max(spill, K, Ko)
            slots.append(Slot(t, K, Ko, main, a.astype(np.int32),
                              np.asarray(over_feat, np.int64).reshape(-1, Ko),
                              np.asarray(over_pos, np.int32), np.asarray(over_start, np.int32)))
        return cls(n + spill, row_of.astype(np.int32), tuple(slots))

    def decoders(self, W_dec, active: ActiveFeatures, dtype) -> list:
        """Per slot, (main [pos, K, D], overflow [tiles, Ko, D]): each feature's decoder row into
        the slot times its activation (zero rows for padding), as numpy arrays."""
        flat = [np.asarray(W).reshape(-1, W.shape[-1]) for W in W_dec]  # views: [feature x reach]
        out = []
        for t, _, _, main, _, over, _, _ in self.slots:
            feats = np.concatenate([main.ravel(), over.ravel()])
            cells = np.flatnonzero(feats >= 0)
            cells = cells[np.argsort(active.layer[feats[cells]], kind="stable")]
            f = feats[cells]
            layer = active.layer[f]
            M = aligned_zeros((len(feats), flat[0].shape[1]), dtype)
            for s in np.unique(layer):
                lo, hi = np.searchsorted(layer, [s, s + 1])
                # In chunks: temporaries this small reuse the heap's pages (fresh large arrays are
                # faulted in page by page, several times slower than the gather itself).
                for c in range(lo, hi, 4096):
                    g = f[c:min(c + 4096, hi)]
                    M[cells[c:c + len(g)]] = _writes(flat[s], W_dec[s].shape[1], active, g,
                                                     int(t - s))
            D = M.shape[1]
            out.append((M[:main.size].reshape(*main.shape, D), M[main.size:].reshape(*over.shape, D)))
        return out

    def nbytes(self, d_model: int, dtype) -> int:
        """Bytes of `decoders`' arrays."""
        return self.rows() * d_model * np.dtype(dtype).itemsize

    def rows(self, below: int | None = None) -> int:
        """Cells (main and overflow) of every slot, or of the slots t < below."""
        return sum(sl.main.size + sl.over.size for sl in self.slots
                   if below is None or sl.t < below)

    def value_cells(self, n_layers: int, group: int) -> int:
        """kv-wide cells of `cumulative`'s value rows: each value group's last slot's cells, times
        the group's width in slots."""
        rows = {sl.t: sl.main.size + sl.over.size for sl in self.slots}
        return sum(rows.get(last, 0) * group for _, last in value_groups(n_layers, group))

    @staticmethod
    def _unit_chunks(n_pos: int, D: int, dtype, chunk: int):
        """The unit vectors at each position, `chunk` rows at a time (the last padded with zero
        rows at position 0), one by one: (x [chunk, D], positions [chunk], rows used). 64-byte
        aligned: on a CPU, JAX reads them in place."""
        for c in range(0, n_pos * D, chunk):
            r = np.arange(c, min(c + chunk, n_pos * D))  # row r: position r // D, unit r % D
            x, p = aligned_zeros((chunk, D), dtype), np.zeros(chunk, np.int32)
            x[r - c, r % D], p[:len(r)] = 1, r // D
            yield x, p, len(r)

    @staticmethod
    def _value_matrices(value_fn, layer: int, n_pos: int, D: int, dtype, units):
        """value_fn(layer, ., q) at each position q as a matrix [n_pos, D, V] in at least float32:
        its value on the unit vectors (it is linear), one call per chunk of `units`
        (`_unit_chunks`)."""
        out = [np.asarray(value_fn(layer, x, p))[:n] for x, p, n in units]
        return np.concatenate(out).reshape(n_pos, D, -1).astype(
            np.promote_types(dtype, np.float32))

    def cumulative(self, W_dec, active: ActiveFeatures, dtype, value_fn, n_layers: int,
                   reads: np.ndarray, group: int = 1, chunk: int | None = None):
        """For tiles built with every lower layer as a writer of each slot (`build` with writers
        range(0, t + 1)): (per slot, its rows; every feature's direct edges).

        Per slot t: (cumulative main [pos, K, D], overflow [tiles, Ko, D], values main [pos, K,
        group x V], overflow [tiles, Ko, group x V]) as numpy arrays, None where absent. A
        feature's cumulative row at slot t is the sum of its decoder rows into slots t' <= t
        (zero past its reach) times its activation; only the last slot keeps them (what a
        target past the last layer, a logit, reads). Its value row at t is value_fn(t + 1,
        cumulative row, position). The value slots 0 .. n_layers - 2 go in groups of `group`
        consecutive slots (`value_groups`); a group's value rows sit on its last slot's cells
        (the features of every layer up to it), side by side in slot order, zero for a slot below
        a feature's layer and for the padding columns of a short last group; the other slots
        have none. value_fn is linear in its rows: it is called on unit vectors, `chunk` rows at a
        time (the last chunk padded, so a jitted one compiles once), for its matrix at each
        position, which the rows are then multiplied by.

        Direct edges: reads [n, D] holds each active feature's encoder row taken back to the
        residual stream below its layer along the residual path (`rep.read_rows`). A feature i
        at layer l and position p gets the products of its read with the cumulative rows at slot
        l - 1 of the features at p below its layer: those are accumulator rows start[i] ..
        start[i] + length[i] (position-major, layer order), the products stored from
        offset[i] in `flat`. Returns (flat, offset int64, length int32, start int32), flat in the
        sums' dtype (at least float32)."""
        flat = [np.asarray(W).reshape(-1, W.shape[-1]) for W in W_dec]  # views: [feature x reach]
        D, n = flat[0].shape[1], len(active)
        chunk = VALUE_CHUNK if chunk is None else chunk
        # Every feature's cumulative write so far, in accumulator order: position by position,
        # layer order within one. A slot's cells at a position, an overflow tile's, and the
        # direct edges' sources of a feature are then runs of rows, read in place; the rows
        # past the last feature (the windows spill into them) stay zero.
        sums = np.promote_types(dtype, np.float32)  # sums in >= float32
        C = np.zeros((self.n_rows, D), sums)
        layer_of = np.argsort(active.layer, kind="stable")
        bounds = np.searchsorted(active.layer[layer_of], np.arange(n_layers + 1))
        by_layer = [layer_of[bounds[s]:bounds[s + 1]] for s in range(n_layers)]
        by_layer = [f[np.argsort(self.row_of[f])] for f in by_layer]  # in accumulator order
        by_slot = {sl.t: sl for sl in self.slots}
        # The direct edges' layout: sources of a feature at (l, p) are the features at p below l,
        # a run of accumulator rows from p's first.
        by_acc = np.empty(n, np.int64)
        by_acc[self.row_of] = np.arange(n)  # accumulator row -> feature
        n_pos = int(active.pos.max()) + 1 if n else 0
        key = active.pos[by_acc].astype(np.int64) * n_layers + active.layer[by_acc]
        below_l = np.searchsorted(key, active.pos.astype(np.int64) * n_layers + active.layer)
        start = np.searchsorted(key, active.pos.astype(np.int64) * n_layers)
        length = (below_l - start).astype(np.int32)
        offset = np.concatenate([[0], np.cumsum(length, dtype=np.int64)])
        direct = np.zeros(int(offset[-1]), sums)
        reads = np.asarray(reads, sums)

        # Each layer's features in chunks, with the runs of consecutive rows of C they fill
        # (one per position): (features, [(its first row of C, start, stop in the chunk)]).
        chunks = []
        for f in by_layer:
            pieces = []
            for c in range(0, len(f), 4096):
                g = f[c:c + 4096]
                pieces.append((g, [(int(self.row_of[g[a]]), a, b)
                                   for a, b in _runs(self.row_of[g])]))
            chunks.append(pieces)
        # The first row of C of each position (its features of layer 0 up, `key`'s order).
        pos_first = np.searchsorted(key, np.arange(n_pos, dtype=np.int64) * n_layers)

        def cell_map(sl):  # row of C -> its flat cell in the slot (main, then overflow); -1
            m = np.full(self.n_rows, -1, np.int64)
            used = (sl.main >= 0).sum(1)  # a block's features fill its first cells
            for q, (a, u) in enumerate(zip(sl.main_start, used)):
                m[a:a + u] = q * sl.K + np.arange(u)
            for i, (a, u) in enumerate(zip(sl.over_start, (sl.over >= 0).sum(1))):
                m[a:a + u] = sl.main.size + i * sl.Ko + np.arange(u)
            return m

        def split(A, sl):
            return (A[:sl.main.size].reshape(*sl.main.shape, A.shape[1]),
                    A[sl.main.size:].reshape(*sl.over.shape, A.shape[1]))

        values = {}  # a group's last slot -> (its value rows, filled slot by slot; cell map)
        kept = None  # the unit vectors value_fn is called on, kept for every layer when small
        out = []
        for t in range(n_layers):
            for s in range(t + 1):  # the writes into slot t
                reach = W_dec[s].shape[1]
                if t - s >= reach:
                    continue
                for f, pieces in chunks[s]:
                    w = _writes(flat[s], reach, active, f, t - s, sums)
                    for r, a, b in pieces:
                        C[r:r + b - a] += w[a:b]
            if t + 1 < n_layers:  # the direct edges of layer t + 1's features, position by position
                tg = by_layer[t + 1]
                for p in range(n_pos):
                    tp = tg[active.pos[tg] == p]
                    if not len(tp) or not length[tp[0]]:
                        continue
                    a = start[tp[0]]
                    prod = reads[tp] @ C[a:a + length[tp[0]]].T  # every run of one position
                    direct[offset[tp][:, None] + np.arange(prod.shape[1])] = prod
                # slot t's value rows, into its group's
                first, last = value_groups(n_layers, group)[t // group]
                home = by_slot.get(last)
                if home is not None and t in by_slot:  # (no writer yet: zero value rows)
                    P = home.main.shape[0]
                    units = kept if kept is not None else self._unit_chunks(P, D, dtype, chunk)
                    if kept is None and (-(-P * D // chunk) * chunk * D * np.dtype(dtype).itemsize
                                         <= KEEP_UNITS):  # else made again, chunk by chunk
                        kept = units = list(units)
                    J = self._value_matrices(value_fn, t + 1, P, D, dtype, units)
                    if last not in values:
                        values[last] = (aligned_zeros((home.main.size + home.over.size,
                                                       group * J.shape[2]), dtype),
                                        cell_map(home))
                    V, cells = values[last]
                    V = V[:, (t - first) * J.shape[2]:(t - first + 1) * J.shape[2]]
                    # Per position, its features of layers up to t (the first rows of its run;
                    # the home's cells of the layers above stay zero) times J there.
                    upto = np.searchsorted(key, np.arange(P, dtype=np.int64) * n_layers + t + 1)
                    for q in range(P):
                        a, b = (pos_first[q], upto[q]) if q < n_pos else (0, 0)
                        if b > a:  # (cells in runs: main rows, then overflow tiles)
                            Y = C[a:b].astype(J.dtype, copy=False) @ J[q]
                            at = cells[a:b]
                            for i, j in _runs(at):
                                V[at[i]:at[i] + j - i] = Y[i:j]
            sl = by_slot.get(t)
            if sl is None:
                continue
            V = values.pop(t, (None,))[0]
            Vs = (None, None) if V is None else split(V, sl)
            if t < n_layers - 1:
                out.append((None, None, *Vs))
                continue
            M = aligned_zeros((sl.main.size + sl.over.size, D), dtype)
            M[cell_map(sl)[:n]] = C[:n]  # every feature is in the last slot's cells
            out.append((*split(M, sl), *Vs))
        return out, (direct, offset[:-1], length, start.astype(np.int32))


def position_blocks(n_pos: int, size: int) -> tuple[tuple[int, int], ...]:
    """The prompt's positions in blocks of `size` (the last one shorter): (first, stop) of each.
    A batch on the prefix of P positions (P a block's stop) reads the blocks below P."""
    return tuple((a, min(a + size, n_pos)) for a in range(0, n_pos, size))


def split_blocks(sl: Slot, main, over, blocks) -> tuple:
    """One slot's rows (`SlotTiles.decoders` or `cumulative`: main [pos, K, W], overflow
    [tiles, Ko, W]) cut into position blocks (`position_blocks`): per block, (its main rows, its
    overflow tiles, the main rows' first accumulator rows (`Slot.main_start`), the tiles'
    positions counted from the block's first, the tiles' first accumulator rows). Overflow
    tiles are in position order, so each block's are one run of them. Views of the arrays
    given."""
    out = []
    for a, b in blocks:
        i, j = np.searchsorted(sl.over_pos, [a, b])
        out.append((main[a:b], over[i:j], sl.main_start[a:b], sl.over_pos[i:j] - a,
                    sl.over_start[i:j]))
    return tuple(out)


def value_groups(n_layers: int, group: int) -> list[tuple[int, int]]:
    """The value slots 0 .. n_layers - 2 (each but the last MLP slot: `_edges_by_values`) in
    groups of `group` consecutive slots: (first, last) of each."""
    return [(a, min(a + group, n_layers - 1) - 1) for a in range(0, n_layers - 1, group)]


__all__ = ["GATHER_SLOTS", "KEEP_UNITS", "SLOT_TILE_WIDTHS", "VALUE_CHUNK", "Slot", "SlotTiles",
           "Sources", "aligned_zeros", "position_blocks", "split_blocks", "tile_widths",
           "value_groups"]
