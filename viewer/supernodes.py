"""Suggested supernodes: features the page offers to group, which a reader accepts, renames or
dissolves.

"Circuit Tracing" (Ameisen et al., 2025, §"Supernodes") groups features by hand when they play
one role: same token, neighbouring layers, the same effect downstream (e.g. several "say
Austin" features). We suggest such groups from the graph itself: two features may share a group
when they sit at the same position and

* are at most `MAX_LAYER_GAP` layers apart and their outgoing edges point the same way (cosine
  similarity at least `MIN_COSINE` of their normalised out-edge vectors within the held graph:
  column s of A[t, s] / sum_s |A[t, s]|, signed, over the held targets t), or
* promote the same top output token (their feature cards' first positive output token), at any
  layer distance, and their out-edges agree somewhat (cosine at least `MIN_COSINE_SAME_TOKEN`:
  a shared top token alone is often a frequent token that says little).

Groups grow greedily from the most similar pair with complete linkage: every two members of a
group must qualify, so a chain of pairwise-similar features does not snowball into one blob.
The suggestions are data for the reader, not a claim: accepting one in the page makes it an
ordinary supernode.
"""

from __future__ import annotations

import json

import numpy as np

from attribution.influence import edge_scores

MAX_LAYER_GAP = 3
MIN_COSINE = 0.5
MIN_COSINE_SAME_TOKEN = 0.2
MAX_SUGGESTIONS = 12


def out_vectors(columns: np.ndarray, row_abs_sums: np.ndarray) -> np.ndarray:
    """[member, target] signed normalised out-edges from `columns` = A[targets, members] and the
    targets' full sums of |incoming edges| (influence's normalisation, `edge_scores` with unit
    target weight, with each edge's sign kept)."""
    cols = np.asarray(columns, np.float64)
    norm = edge_scores(cols, np.ones(len(cols)), np.asarray(row_abs_sums, np.float64))
    return (np.sign(cols) * norm).T


def cosine(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows (0 for an all-zero row)."""
    v = np.asarray(vectors, np.float64)
    norms = np.linalg.norm(v, axis=1)
    unit = v / np.where(norms > 0, norms, 1.0)[:, None]
    return unit @ unit.T


def qualifying_pairs(layer, pos, cos, top_token) -> np.ndarray:
    """[i, j] True where features i and j may share a group (see the module docstring)."""
    layer, pos, top_token = (np.asarray(a) for a in (layer, pos, top_token))
    same_pos = pos[:, None] == pos[None, :]
    near = np.abs(layer[:, None] - layer[None, :]) <= MAX_LAYER_GAP
    same_tok = (top_token[:, None] == top_token[None, :]) & (top_token[:, None] >= 0)
    return same_pos & ((near & (cos >= MIN_COSINE)) | (same_tok & (cos >= MIN_COSINE_SAME_TOKEN)))


def group(ok: np.ndarray, cos: np.ndarray) -> list[list[int]]:
    """Complete-linkage groups (size >= 2) of the items, merging the most similar pairs first."""
    n = len(ok)
    members = {i: [i] for i in range(n)}
    owner = np.arange(n)
    i_idx, j_idx = np.nonzero(np.triu(ok, 1))
    for k in np.argsort(-cos[i_idx, j_idx], kind="stable"):
        a, b = owner[i_idx[k]], owner[j_idx[k]]
        if a == b or not ok[np.ix_(members[a], members[b])].all():
            continue
        members[a] += members.pop(b)
        owner[members[a]] = a
    return [sorted(m) for m in members.values() if len(m) >= 2]


def suggest(layer, pos, vectors, influence, top_token=None, token_text=None, pos_text=None,
            limit: int = MAX_SUGGESTIONS) -> list[dict]:
    """Suggested groups of the given features (their layer, position, out-edge vectors and
    influence; `top_token` their cards' top output token id, -1 or None when unknown;
    `token_text`: output token id -> string and `pos_text`: position -> prompt token string,
    for names), most influential groups first:
    [{"name", "members" (indices into the given features), "reason", "cosine"}]."""
    n = len(layer)
    if n < 2 or limit <= 0:
        return []
    layer, pos, infl = np.asarray(layer), np.asarray(pos), np.asarray(influence, np.float64)
    top = np.full(n, -1) if top_token is None else np.asarray(top_token)
    cos = cosine(vectors)
    ok = qualifying_pairs(layer, pos, cos, top)
    groups = sorted(group(ok, cos), key=lambda m: -infl[m].sum())[:limit]
    out = []
    for m in groups:
        pair = cos[np.ix_(m, m)][np.triu_indices(len(m), 1)]
        lo, hi, p = int(layer[m].min()), int(layer[m].max()), int(pos[m[0]])
        shared = int(top[m[0]]) if (top[m] == top[m[0]]).all() and top[m[0]] >= 0 else None
        span = f"{lo}" if lo == hi else f"{lo}–{hi}"
        at = f"@{p}" + (f" {json.dumps(pos_text(p), ensure_ascii=False)}" if pos_text else "")
        if shared is not None and token_text is not None:
            word = json.dumps(token_text(shared), ensure_ascii=False)
            name, reason = f"say {word} {at}", f"same position; all promote {word} most"
        else:
            name, reason = f"L{span} {at}", "same position, nearby layers, similar out-edges"
        seen = sum(o["name"].split(" (")[0] == name for o in out)
        name = f"{name} ({seen + 1})" if seen else name  # one name per suggestion
        out.append({"name": name, "members": [int(i) for i in m], "reason": reason,
                    "cosine": round(float(pair.mean()), 3)})
    return out


__all__ = ["MAX_LAYER_GAP", "MAX_SUGGESTIONS", "MIN_COSINE", "MIN_COSINE_SAME_TOKEN", "cosine", "group", "out_vectors",
           "qualifying_pairs", "suggest"]
