"""k-means (spherical by default, Faiss' algorithm with exact sums), optional hierarchical k-means, and balanced
top-down sampling.

Under `accelerate launch` the training rows and the rows to assign are split over the processes and the
centroid sums all-reduced (curation.distributed); the result equals the one-process result bit for bit.
Subsampling is explicit: k-means trains on at most `num_clusters * max_points_per_centroid` rows drawn at
random (seeded); the number is reported, never left to a Faiss warning. All rows are then assigned to their
nearest centroid block by block. Hierarchical k-means (Vo et al. 2024) clusters the centroids of each level
again; balanced sampling walks the tree top-down and splits the budget as evenly as cluster sizes allow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .common import require_faiss
from .config import ClusterConfig
from .distributed import (
    FIXED_BITS,
    Comm,
    all_reduce_max,
    all_reduce_sum,
    fixed_point,
    rows_at,
    shard_bounds,
    to_rank_gpu,
)
from .embed import EmbeddingStore
from .index import use_gpu

ASSIGN_BLOCK = 65_536  # rows per assignment search; shards start on multiples of it (same BLAS calls as 1 process)
# Part of the cluster step's cache key: Lloyd with exact sums (below) replaced faiss.Kmeans (float32 sums).
KMEANS_ALGORITHM = "lloyd-fixed-point-1"
_SUM_ROWS = 8192


@dataclass
class KMeansResult:
    centroids: np.ndarray  # finest level [k, d]
    labels: np.ndarray  # finest-level cluster of every row
    parents: list[np.ndarray] = field(default_factory=list)  # parents[l][c]: level l+1 cluster of level-l c
    info: dict = field(default_factory=dict)


def kmeans(x: np.ndarray, k: int, cfg: ClusterConfig, seed: int, comm: Comm | None = None,
           block: int = ASSIGN_BLOCK) -> np.ndarray:
    """Lloyd's k-means as Faiss' `Clustering` runs it, on the rows `x` of this process (all rows in one process;
    under torch.distributed rank r holds the r-th contiguous part, see `distributed.shard_bounds`).

    Same steps as Faiss: initial centroids = the first k rows of `faiss.rand_perm(n, seed + 1 + redo * 15486557)`,
    `niter` iterations of (assign with a flat index, inner product when spherical else L2; centroid = mean of its
    rows; empty clusters split off a populated one with Faiss' seeded rule; renormalise when spherical), best
    objective of `nredo` restarts. The difference is the sums: 64-bit fixed point (`distributed.fixed_point`)
    instead of float32 accumulation, so they are exact and one process and N processes get the same centroids.
    """
    faiss = require_faiss()

    x = np.ascontiguousarray(x, dtype=np.float32)
    d = x.shape[1]
    sizes = all_reduce_sum(np.eye(comm.world if comm else 1, dtype=np.int64)[comm.rank if comm else 0] * len(x),
                           comm)
    n, offset = int(sizes.sum()), int(sizes[:comm.rank if comm else 0].sum())
    if n < k:
        raise ValueError(f"k-means needs at least k={k} rows, got {n}")
    # Fixed-point scale: vector entries below 2^e in magnitude, objective terms below 4 * 2^2e.
    norm = float(np.linalg.norm(x, axis=1).max()) if len(x) else 0.0
    e = max(0, math.ceil(math.log2(max(all_reduce_max(norm, comm), 1.0))))
    vec_bits, obj_bits = FIXED_BITS - e, FIXED_BITS - 2 - 2 * e
    index = faiss.IndexFlatIP(d) if cfg.spherical else faiss.IndexFlatL2(d)
    if use_gpu(cfg.gpu):
        index = to_rank_gpu(index, comm) if comm is not None else faiss.index_cpu_to_all_gpus(index)
    best_obj, best = None, None
    for redo in range(cfg.nredo):
        perm = np.empty(n, dtype=np.int32)  # Faiss' own permutation (its mt19937), as Clustering::train draws it
        faiss.rand_perm(faiss.swig_ptr(perm), n, seed + 1 + redo * 15486557)
        centroids = _post_process(rows_at(x, offset, perm[:k].astype(np.int64), comm), cfg.spherical)
        obj = 0
        for _ in range(cfg.niter):
            index.reset()
            index.add(centroids)
            sums = np.zeros((k, d), dtype=np.int64)
            counts = np.zeros(k, dtype=np.int64)
            obj_sum = np.zeros(1, dtype=np.int64)
            for s in range(0, len(x), block):  # the same blocks as one process: shards start on block bounds
                dist, lab = index.search(x[s:s + block], 1)
                counts += np.bincount(lab[:, 0], minlength=k)
                obj_sum += fixed_point(dist[:, 0], obj_bits).sum()
                for c in range(0, len(lab), _SUM_ROWS):  # int64 copies of a few thousand rows at a time
                    part = lab[c:c + _SUM_ROWS, 0]
                    order = np.argsort(part, kind="stable")
                    used, first = np.unique(part[order], return_index=True)
                    rows = x[s + c:s + c + len(part)][order]
                    sums[used] += np.add.reduceat(fixed_point(rows, vec_bits), first, axis=0)
            sums, counts = all_reduce_sum(sums, comm), all_reduce_sum(counts, comm)
            obj = int(all_reduce_sum(obj_sum, comm)[0])
            filled = counts > 0
            centroids = np.zeros((k, d), dtype=np.float32)
            centroids[filled] = (sums[filled] / float(2**vec_bits) / counts[filled, None]).astype(np.float32)
            _split_clusters(centroids, counts.astype(np.float64), n)
            centroids = _post_process(centroids, cfg.spherical)
        if best_obj is None or (obj > best_obj if cfg.spherical else obj < best_obj):  # IP: larger is better
            best_obj, best = obj, centroids
    return best


def _post_process(centroids: np.ndarray, spherical: bool) -> np.ndarray:
    if spherical:
        norms = np.sqrt(np.sum(centroids.astype(np.float64) ** 2, axis=1, keepdims=True))
        centroids = (centroids / np.maximum(norms, 1e-30)).astype(np.float32)
    return np.ascontiguousarray(centroids)


def _split_clusters(centroids: np.ndarray, counts: np.ndarray, n: int) -> None:
    """Faiss' rule for empty clusters, in place: walk the clusters from 0, taking cluster j with probability
    (size_j - 1) / (n - k) (Faiss' RandomGenerator(1234), re-seeded every iteration); copy its centroid, nudge
    the two apart by 1/1024 in alternating directions and split its count. Deterministic on every rank."""
    faiss = require_faiss()

    k = len(centroids)
    empty = np.nonzero(counts == 0)[0]
    if not len(empty):
        return
    rng = faiss.RandomGenerator(1234)
    up = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1 + 1 / 1024, 1 - 1 / 1024)
    for ci in empty:
        cj = 0
        while True:
            if rng.rand_float() < np.float32((counts[cj] - 1.0) / np.float32(n - k)):  # float p, as Faiss
                break
            cj = (cj + 1) % k
        src = centroids[cj].astype(np.float64)
        centroids[ci] = (src * up).astype(np.float32)
        centroids[cj] = (src * (2 - up)).astype(np.float32)
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]


def assign(store_or_array: EmbeddingStore | np.ndarray, centroids: np.ndarray, block: int = ASSIGN_BLOCK,
           comm: Comm | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Nearest centroid (inner product) of every row, with its similarity.

    Under torch.distributed (`comm`) each rank assigns its contiguous part of the rows in the same blocks as one
    process would, and the main process gets the labels of all rows (the others get None)."""
    faiss = require_faiss()

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    store = store_or_array if isinstance(store_or_array, EmbeddingStore) else EmbeddingStore.from_array(store_or_array)
    if comm is None:
        labels = np.empty(store.n, dtype=np.int64)
        sims = np.empty(store.n, dtype=np.float32)
        for start, x in store.blocks(block):
            s, i = index.search(x, 1)
            labels[start:start + len(x)] = i[:, 0]
            sims[start:start + len(x)] = s[:, 0]
        return labels, sims
    bounds = shard_bounds(store.n, comm.world, block)
    lo, hi = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
    mine = store.subset(np.arange(lo, hi))
    labels, sims = np.empty(hi - lo, dtype=np.int64), np.empty(hi - lo, dtype=np.float32)
    for start, x in mine.blocks(block):
        s, i = index.search(x, 1)
        labels[start:start + len(x)] = i[:, 0]
        sims[start:start + len(x)] = s[:, 0]
    all_labels, all_sims = comm.gather_rows(labels), comm.gather_rows(sims)
    return None if all_labels is None or all_sims is None else (all_labels, all_sims)


def level_sizes(cfg: ClusterConfig, n: int) -> list[int]:
    sizes = []
    k = min(cfg.num_clusters, n)
    for level in range(max(1, cfg.levels)):
        size = max(1, int(round(k / cfg.branching**level)))
        if sizes and size >= sizes[-1]:
            break
        sizes.append(size)
    return sizes


def cluster_store(store: EmbeddingStore, cfg: ClusterConfig, comm: Comm | None = None,
                  block: int = ASSIGN_BLOCK) -> KMeansResult | None:
    """k-means of the rows of `store` (seeded training subsample, then every row assigned), hierarchical levels
    on the centroids. Under torch.distributed every rank must call it: each holds a contiguous part of the
    training rows and of the rows to assign; the main process gets the result, the others None."""
    n = store.n
    sizes = level_sizes(cfg, n)
    k = sizes[0]
    train_cap = k * cfg.max_points_per_centroid
    rng = np.random.default_rng(cfg.seed)
    if n > train_cap:
        sample = np.sort(rng.choice(n, size=train_cap, replace=False))
    else:
        sample = np.arange(n)
    if comm is not None:
        bounds = shard_bounds(len(sample), comm.world, block)
        sample_mine = sample[bounds[comm.rank]:bounds[comm.rank + 1]]
    else:
        sample_mine = sample
    centroids = kmeans(store.take(sample_mine), k, cfg, cfg.seed, comm, block)
    assigned = assign(store, centroids, block, comm)
    if assigned is None:  # not the main process
        return None
    labels, _ = assigned
    parents, current = [], centroids
    for level, size in enumerate(sizes[1:], start=1):  # small (centroids only): on the main process
        upper = kmeans(current, size, cfg, cfg.seed + level, block=block)
        parent, _ = assign(current, upper, block)
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
        "algorithm": KMEANS_ALGORITHM,
        "processes": comm.world if comm is not None else 1,
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
