"""Node positions of an attribution graph, computed in Python as in the papers' figures.

"Circuit Tracing" (Ameisen et al., 2025) and Neuronpedia draw a graph on a grid: x is the token
position (the prompt's tokens along the bottom axis), y is the layer (embeddings at the bottom,
logits at the top). We do the same, with three choices of our own:

* columns are as wide as their most crowded (layer, position) cell needs, so a position with
  many active features gets room and the other 1,000 positions of a long prompt stay narrow
  (a short prompt's columns widen so that the grid is not a thin strip);
* inside a cell, features fill at most `MAX_SUB_ROWS` short rows, most influential first, and the
  cell's error node sits apart at its right edge;
* logits form the top row, right-aligned on the last position (they all predict its next token).

Coordinates are in vis-network's space: pixels, y growing downwards. The page draws the token
strings and layer names along the axes from `Axis`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attribution.graph import KINDS

SPACING = 18.0  # between feature centres in a cell row
SUB_ROW = 15.0  # between the sub-rows of a layer band
MAX_SUB_ROWS = 3
BAND = 64.0  # height of a layer band
MIN_COLUMN = 44.0
MAX_MIN_COLUMN = 360.0
ASPECT = 1.4  # short prompts: columns widen until the grid is about this much wider than tall
ERROR_GAP = 16.0  # room for a cell's error node, apart from its features
LOGIT_SPACING = 84.0

FEATURE, ERROR, TOKEN, LOGIT = range(4)
assert KINDS == ("feature", "error", "token", "logit")  # the kind codes above follow this order


@dataclass(frozen=True)
class Axis:
    """Where the page draws its axes: one column per token position, one band per row."""

    column_x: np.ndarray  # [pos] centre of each position's column
    column_width: np.ndarray  # [pos]
    row_y: np.ndarray  # [n_layers + 2] y of: embeddings, layer 0 .. layer L-1, logits

    def to_json(self) -> dict:
        return {"x": [round(float(v), 1) for v in self.column_x],
                "w": [round(float(v), 1) for v in self.column_width],
                "y": [round(float(v), 1) for v in self.row_y]}


def row_of(kind: np.ndarray, layer: np.ndarray, n_layers: int) -> np.ndarray:
    """Grid row of each node: 0 for embeddings, layer + 1 for features and errors, the top row
    (n_layers + 1) for logits."""
    return np.where(kind == TOKEN, 0, np.where(kind == LOGIT, n_layers + 1, layer + 1))


def layout(kind: np.ndarray, layer: np.ndarray, pos: np.ndarray, influence: np.ndarray,
           n_pos: int, n_layers: int) -> tuple[np.ndarray, np.ndarray, Axis]:
    """(x, y, axis) of the given nodes (kind codes FEATURE..LOGIT, their layer and position).

    Ties in influence keep the input order, so the same graph always gets the same picture."""
    kind, layer, pos = (np.asarray(a, np.int64) for a in (kind, layer, pos))
    n = len(kind)
    row = row_of(kind, layer, n_layers)
    is_feat = kind == FEATURE

    # Features per (row, pos) cell and the rank of each feature inside its cell, by influence.
    order = np.lexsort((-np.asarray(influence, np.float64), pos, row))
    cell = row * n_pos + pos
    feat_order = order[is_feat[order]]
    counts = np.bincount(cell[feat_order], minlength=(n_layers + 2) * n_pos)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.zeros(n, np.int64)
    rank[feat_order] = np.arange(len(feat_order)) - starts[cell[feat_order]]

    crowd = counts.reshape(n_layers + 2, n_pos).max(axis=0)  # [pos] most crowded cell
    per_row = np.maximum(1, np.ceil(crowd / MAX_SUB_ROWS)).astype(np.int64)
    has_err = np.zeros(n_pos, bool)
    has_err[pos[kind == ERROR]] = True
    # A 6-token prompt through 30 layers would be a tall thin strip: widen its columns.
    min_column = np.clip(ASPECT * (n_layers + 1) * BAND / n_pos, MIN_COLUMN, MAX_MIN_COLUMN)
    width = np.maximum(min_column, per_row * SPACING + has_err * ERROR_GAP + 10.0)
    left = np.concatenate([[0.0], np.cumsum(width)[:-1]])
    centre = left + width / 2

    row_y = (n_layers + 1 - np.arange(n_layers + 2)) * BAND
    x = np.zeros(n)
    y = row_y[row].astype(np.float64)

    # Features: a block of sub-rows centred in the part of the column left of the error slot.
    f = np.nonzero(is_feat)[0]
    if len(f):
        pr = per_row[pos[f]]
        n_in_cell = counts[cell[f]]
        sub, col = rank[f] // pr, rank[f] % pr
        in_row = np.minimum(pr, n_in_cell - sub * pr)  # nodes in this feature's sub-row
        n_sub = np.ceil(n_in_cell / pr)
        body = centre[pos[f]] - has_err[pos[f]] * ERROR_GAP / 2
        x[f] = body + (col - (in_row - 1) / 2) * SPACING
        y[f] += (sub - (n_sub - 1) / 2) * SUB_ROW
    e = kind == ERROR
    x[e] = left[pos[e]] + width[pos[e]] - ERROR_GAP / 2 - 2.0
    t = kind == TOKEN
    x[t] = centre[pos[t]]
    lg = np.nonzero(kind == LOGIT)[0]
    # The most probable logit right above the last position, the others leftwards.
    x[lg] = centre[n_pos - 1] - np.arange(len(lg)) * LOGIT_SPACING
    return x, y, Axis(centre, width, row_y)


__all__ = ["ERROR", "FEATURE", "LOGIT", "TOKEN", "Axis", "layout", "row_of"]
