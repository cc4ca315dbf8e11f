"""Faiss k-means (spherical by default), optional hierarchical k-means, and balanced top-down sampling.

Subsampling is explicit: k-means trains on at most `num_clusters * max_points_per_centroid` rows drawn at
random (seeded); the number is reported, never left to a Faiss warning. All rows are then assigned to their
nearest centroid block by block. Hierarchical k-means (Vo et al. 2024) clusters the centroids of each level
again; balanced sampling walks the tree top-down and splits the budget as evenly as cluster sizes allow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .common import require_faiss
from .config import ClusterConfig
from .embed import EmbeddingStore
from .index import use_gpu


@dataclass
class KMeansResult:
    centroids: np.ndarray  # finest level [k, d]
    labels: np.ndarray  # finest-level cluster of every row
    parents: list[np.ndarray] = field(default_factory=list)  # parents[l][c]: level l+1 cluster of level-l c
    info: dict = field(default_factory=dict)


def kmeans(x: np.ndarray, k: int, cfg: ClusterConfig, seed: int) -> np.ndarray:
    faiss = require_faiss()

    km = faiss.Kmeans(x.shape[1], k, niter=cfg.niter, nredo=cfg.nredo, spherical=cfg.spherical, seed=seed,
                      max_points_per_centroid=cfg.max_points_per_centroid, min_points_per_centroid=1,
                      gpu=use_gpu(cfg.gpu), verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids


def assign(store_or_array: EmbeddingStore | np.ndarray, centroids: np.ndarray, block: int = 65_536,
           ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (inner product) of every row, with its similarity."""
    faiss = require_faiss()

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    store = store_or_array if isinstance(store_or_array, EmbeddingStore) else EmbeddingStore.from_array(store_or_array)
    labels = np.empty(store.n, dtype=np.int64)
    sims = np.empty(store.n, dtype=np.float32)
    for start, x in store.blocks(block):
        s, i = index.search(x, 1)
        labels[start:start + len(x)] = i[:, 0]
        sims[start:start + len(x)] = s[:, 0]
    return labels, sims


def level_sizes(cfg: ClusterConfig, n: int) -> list[int]:
    sizes = []
    k = min(cfg.num_clusters, n)
    for level in range(max(1, cfg.levels)):
        size = max(1, int(round(k / cfg.branching**level)))
        if sizes and size >= sizes[-1]:
            break
        sizes.append(size)
    return sizes


def cluster_store(store: EmbeddingStore, cfg: ClusterConfig) -> KMeansResult:
    n = store.n
    sizes = level_sizes(cfg, n)
    k = sizes[0]
    train_cap = k * cfg.max_points_per_centroid
    rng = np.random.default_rng(cfg.seed)
    if n > train_cap:
        sample = np.sort(rng.choice(n, size=train_cap, replace=False))
    else:
        sample = np.arange(n)
    centroids = kmeans(store.take(sample), k, cfg, cfg.seed)
    labels, _ = assign(store, centroids)
    parents, current = [], centroids
    for level, size in enumerate(sizes[1:], start=1):
        upper = kmeans(current, size, cfg, cfg.seed + level)
        parent, _ = assign(current, upper)
        parents.append(parent)
        current = upper
    info = {
        "num_clusters_requested": cfg.num_clusters,
        "level_sizes": sizes,
        "rows": n,
        "train_rows": int(len(sample)),
        "subsampled": bool(n > train_cap),
        "max_points_per_centroid": cfg.max_points_per_centroid,
        "spherical": cfg.spherical,
        "niter": cfg.niter,
        "gpu": use_gpu(cfg.gpu),
    }
    return KMeansResult(centroids=centroids, labels=labels, parents=parents, info=info)


def _even_split(capacity: np.ndarray, budget: int) -> np.ndarray:
    """Split `budget` over nodes as evenly as their capacities allow (water-filling), summing to
    min(budget, capacity.sum())."""
    capacity = np.asarray(capacity, dtype=np.int64)
    out = np.zeros(len(capacity), dtype=np.int64)
    budget = int(min(budget, capacity.sum()))
    order = np.argsort(capacity, kind="stable")
    remaining_nodes = len(capacity)
    for pos, node in enumerate(order):
        share = budget // max(remaining_nodes, 1)
        extra = 1 if (budget % max(remaining_nodes, 1)) > (len(order) - pos - 1) else 0
        take = min(int(capacity[node]), share + extra)
        out[node] = take
        budget -= take
        remaining_nodes -= 1
    return out


def _groups(labels: np.ndarray, k: int) -> list[np.ndarray]:
    """Members of each label 0..k-1 (one argsort, not k scans)."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(k)]


def balanced_sample(labels: np.ndarray, parents: list[np.ndarray], target: int, seed: int = 0) -> np.ndarray:
    """Top-down balanced sampling of `target` rows from a cluster tree; returns sorted row indices.

    The budget of a node is split as evenly as its children's sizes allow (water-filling); at the leaves rows
    are drawn uniformly at random (seeded).
    """
    rng = np.random.default_rng(seed)
    if len(labels) == 0 or target <= 0:
        return np.zeros(0, dtype=np.int64)
    k0 = int(labels.max()) + 1
    leaf_rows = _groups(labels, k0)
    sizes = [np.array([len(r) for r in leaf_rows], dtype=np.int64)]
    children = []  # children[l][c]: level-l clusters under level-(l+1) cluster c
    for parent in parents:
        k_up = int(parent.max()) + 1
        sizes.append(np.bincount(parent, weights=sizes[-1], minlength=k_up).astype(np.int64))
        children.append(_groups(parent, k_up))

    def take(level: int, nodes: np.ndarray, budget: int) -> list[np.ndarray]:
        alloc = _even_split(sizes[level][nodes], budget)
        picked = []
        for node, b in zip(nodes, alloc):
            if b == 0:
                continue
            if level == 0:
                picked.append(rng.choice(leaf_rows[node], size=int(b), replace=False))
            else:
                picked.extend(take(level - 1, children[level - 1][node], int(b)))
        return picked

    top = len(sizes) - 1
    picked = take(top, np.arange(len(sizes[top])), target)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
