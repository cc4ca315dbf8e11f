"""Duplicate graphs: edges -> connected components (union-find) -> one kept row per component.

All functions work on plain numpy arrays over a row index space 0..n-1, so the logic is testable exactly on
given hashes/embeddings. Edge sources:
- exact: rows sharing a sha256;
- perceptual: 64-bit pHashes within a Hamming distance (also against the mirrored hash, so flips match);
- copy detection: Faiss kNN (k nearest) with cosine similarity > threshold (see index.py).

Keep rule (documented in the dataset card): in each component keep the row with the largest width*height,
ties broken by the lowest `id` in string order; the others are recorded as `duplicate_of` that row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import require_faiss


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label of every node = smallest node index in its component.

    Vectorised union-find: every edge hooks the larger root under the smaller one (`np.minimum.at`), then
    pointer jumping compresses paths until every node points at its root; repeat until no edge joins two
    different roots. Roots only ever point to smaller indices, so this terminates with the minimum as label.
    """
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while a.size:
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        joins = lo != hi
        if not joins.any():
            break
        np.minimum.at(parent, hi[joins], lo[joins])
        while True:  # path compression by pointer jumping
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        # edges inside one component never matter again
        a, b = a[joins], b[joins]
    return parent


def id_ranks(ids: list[str] | np.ndarray) -> np.ndarray:
    """Rank of each id in string order (0 = lowest)."""
    arr = np.asarray(ids, dtype=object)
    order = np.argsort(arr.astype(str), kind="stable")
    ranks = np.empty(len(arr), dtype=np.int64)
    ranks[order] = np.arange(len(arr))
    return ranks


def representatives(labels: np.ndarray, area: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Index of the kept row of each row's component: largest area, then lowest id rank."""
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    priority = np.lexsort((rank, -np.asarray(area, dtype=np.int64)))  # best first
    uniq, first = np.unique(labels[priority], return_index=True)
    best_of_label = np.empty(n, dtype=np.int64)
    best_of_label[uniq] = priority[first]
    return best_of_label[labels]


@dataclass
class DedupResult:
    """rep[i] = kept row of i's component (i itself when kept); score[i] = best edge similarity of i."""

    rep: np.ndarray
    score: np.ndarray

    @property
    def removed(self) -> np.ndarray:
        return np.nonzero(self.rep != np.arange(len(self.rep)))[0]


def dedup_from_edges(n: int, a: np.ndarray, b: np.ndarray, area: np.ndarray, rank: np.ndarray,
                     sim: np.ndarray | None = None) -> DedupResult:
    labels = connected_components(n, a, b)
    rep = representatives(labels, area, rank)
    score = np.full(n, np.nan, dtype=np.float64)
    if sim is not None and len(a):
        np.fmax.at(score, a, sim)
        np.fmax.at(score, b, sim)
    return DedupResult(rep=rep, score=score)


# ---------- exact ----------


def exact_edges(hashes: list[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining each row to the first row with the same hash (a star per group is enough for components)."""
    arr = np.asarray(hashes).astype(str)
    _, first, inverse = np.unique(arr, return_index=True, return_inverse=True)
    head = first[inverse.reshape(-1)]
    others = np.nonzero(head != np.arange(len(arr)))[0]
    return head[others].astype(np.int64), others.astype(np.int64)


# ---------- perceptual (Hamming) ----------


def hex_to_uint64(values: list[str] | np.ndarray) -> np.ndarray:
    return np.array([int(v, 16) for v in values], dtype=np.uint64)


def hamming_pairs(base: np.ndarray, max_distance: int, queries: np.ndarray | None = None,
                  query_batch: int = 65_536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query i, base j, distance) with Hamming(query_i, base_j) <= max_distance on 64-bit hashes.

    Faiss multi-index hashing (`IndexBinaryMultiHash`, 3 tables of 21 bits, flipping up to max_distance // 3
    bits per key): by pigeonhole two hashes within the distance differ in at most max_distance // 3 bits of
    at least one table key, so the search is exact, not approximate. `queries=None` searches base against
    itself and returns each pair once (i < j).
    """
    faiss = require_faiss()

    base = np.ascontiguousarray(np.asarray(base, dtype=np.uint64))
    empty = np.zeros(0, dtype=np.int64)
    if len(base) == 0:
        return empty, empty, empty
    index = faiss.IndexBinaryMultiHash(64, 3, 21)
    index.nflip = max_distance // 3
    index.add(base.view(np.uint8).reshape(-1, 8))
    q = base if queries is None else np.ascontiguousarray(np.asarray(queries, dtype=np.uint64))
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(q), query_batch):
        codes = q[start:start + query_batch].view(np.uint8).reshape(-1, 8)
        lims, dist, idx = index.range_search(codes, max_distance + 1)  # strict: distance < radius
        qi = np.repeat(np.arange(len(codes), dtype=np.int64), np.diff(lims).astype(np.int64)) + start
        idx = idx.astype(np.int64)
        keep = qi < idx if queries is None else np.ones(len(idx), dtype=bool)
        found_i.append(qi[keep])
        found_j.append(idx[keep])
        found_d.append(dist[keep].astype(np.int64))
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


def phash_edges(phash: np.ndarray, phash_flip: np.ndarray, max_distance: int,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Perceptual-duplicate edges: hash vs hash, and mirrored hash vs hash (catches horizontal flips).

    Rows with an identical hash are first collapsed to one (star edges to the group's first row), so a
    million blank images sharing one hash cost a million edges, not 10^12 pairs.
    """
    phash = np.asarray(phash, dtype=np.uint64)
    n = len(phash)
    uniq, head_idx, inverse = np.unique(phash, return_index=True, return_inverse=True)
    head = head_idx[inverse.reshape(-1)]
    star = np.nonzero(head != np.arange(n))[0]
    ua, ub, ud = hamming_pairs(uniq, max_distance)
    fa, fb, fd = hamming_pairs(uniq, max_distance, queries=np.asarray(phash_flip, dtype=np.uint64))
    fb = head_idx[fb]
    off = fa != fb  # an image against its own mirror is not a pair
    a = np.concatenate([head[star], head_idx[ua], fa[off]]).astype(np.int64)
    b = np.concatenate([star, head_idx[ub], fb[off]]).astype(np.int64)
    d = np.concatenate([np.zeros(len(star), dtype=np.int64), ud, fd[off]])
    return a, b, d


# ---------- kNN edges ----------


def knn_edges(indices: np.ndarray, sims: np.ndarray, threshold: float, query_offset: int = 0,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges (query row, neighbour row, cosine) with cosine > threshold from a self-kNN result block.

    `indices`/`sims` are Faiss outputs for queries query_offset .. query_offset+len-1 against the same rows;
    self matches and padding (-1) are dropped.
    """
    rows = np.arange(len(indices), dtype=np.int64)[:, None] + query_offset
    mask = (sims > threshold) & (indices >= 0) & (indices != rows)
    qi = np.broadcast_to(rows, indices.shape)[mask]
    return qi.astype(np.int64), indices[mask].astype(np.int64), sims[mask].astype(np.float64)


def contaminated_components(rep: np.ndarray, hit_rows: np.ndarray) -> np.ndarray:
    """Kept rows (representatives) whose component contains any row that touched an eval image."""
    return np.unique(rep[np.asarray(hit_rows, dtype=np.int64)]) if len(hit_rows) else np.zeros(0, np.int64)
