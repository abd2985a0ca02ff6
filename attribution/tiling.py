"""How one source layer's active features are laid out for the tracer's decoder contraction.

`attribution.trace._rows` contracts each batch's gradients at every MLP slot with the decoder rows
of the active features. Activity is uneven over positions (a layer's busiest position can hold 10x
its mean), so instead of padding every position to the busiest one, each position gets K main
slots and the rest of its features go to overflow tiles of Ko slots, whose gradients are gathered
(`Sources`); `tile_widths` picks the (K, Ko) with the least work.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from attribution.replacement import ActiveFeatures

# Cost of gathering one overflow tile's gradients ([batch, d_model] at its position), in the
# decoder slots whose contraction costs as much (measured on a CPU: ~40 us against ~0.75 us;
# the 128-token benchmark's speed moves by under 8% for any value from 16 to 160).
GATHER_SLOTS = 54


def tile_widths(counts: np.ndarray) -> tuple[int, int]:
    """(main width, overflow tile width) for one source layer with these active counts per
    position: the pair with the least work, main rows costing their width at every position,
    overflow tiles their width plus the gather of their gradients."""
    top = -(-max(int(counts.max()), 1) // 16) * 16

    def cost(km, ko):
        return len(counts) * km + int(np.ceil(np.maximum(counts - km, 0) / ko).sum()) * (
            ko + GATHER_SLOTS)

    return min(((km, ko) for km in range(0, top + 1, 16) for ko in (16, 32, 64, 128)),
               key=lambda w: cost(*w))


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


__all__ = ["GATHER_SLOTS", "Sources", "tile_widths"]
