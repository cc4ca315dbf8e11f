"""Selection: which deduplicated, decontaminated rows make the curated set.

- `sample` (LVD-142M sample-based retrieval): the k nearest candidates of every seed image.
- `cluster` (cluster-based retrieval): up to `per_cluster` random candidates from each cluster holding more
  than `min_seed_hits` seed images, at most `cap_per_source` per seed source (clusters with more seed hits
  first).
- `balanced` (no seed set): hierarchical balanced sampling of `target_size` rows.
- `none`: every candidate.
A row picked for several seeds keeps the most similar one in `retrieved_by` / `similarity`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cluster import KMeansResult, assign, balanced_sample
from .config import IndexConfig, SelectConfig
from .embed import EmbeddingStore
from .index import build_index, rerank_store, search_blocks


@dataclass
class Selection:
    rows: np.ndarray  # selected candidate positions, sorted
    retrieved_by: list[str | None]  # seed id per selected row
    similarity: np.ndarray  # cosine to that seed (nan when none)
    info: dict


def _best_per_row(cand: np.ndarray, seed: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep, for every candidate, the (seed, sim) pair with the highest similarity."""
    order = np.lexsort((-sim, cand))
    cand, seed, sim = cand[order], seed[order], sim[order]
    first = np.ones(len(cand), dtype=bool)
    first[1:] = cand[1:] != cand[:-1]
    return cand[first], seed[first], sim[first]


def _cap(cand: np.ndarray, seed: np.ndarray, sim: np.ndarray, cap: int):
    if len(cand) <= cap:
        return cand, seed, sim
    top = np.argsort(-sim, kind="stable")[:cap]
    return cand[top], seed[top], sim[top]


def select_sample(cands: EmbeddingStore, seeds: EmbeddingStore, seed_sources: np.ndarray, cfg: SelectConfig,
                  index_cfg: IndexConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    index, info = build_index(cands, index_cfg)
    found_c, found_s, found_sim = [], [], []
    for start, sims, ids in search_blocks(index, seeds, cfg.k, index_cfg.query_batch, rerank_store(info, cands),
                                          index_cfg.refine_k_factor):
        valid = ids >= 0
        q = np.broadcast_to(np.arange(len(ids))[:, None] + start, ids.shape)
        found_c.append(ids[valid])
        found_s.append(q[valid])
        found_sim.append(sims[valid])
    cand = np.concatenate(found_c).astype(np.int64)
    seed = np.concatenate(found_s).astype(np.int64)
    sim = np.concatenate(found_sim).astype(np.float64)
    parts = []
    for src in np.unique(seed_sources):
        m = seed_sources[seed] == src
        parts.append(_cap(*_best_per_row(cand[m], seed[m], sim[m]), cfg.cap_per_source))
    cand = np.concatenate([p[0] for p in parts]) if parts else cand[:0]
    seed = np.concatenate([p[1] for p in parts]) if parts else seed[:0]
    sim = np.concatenate([p[2] for p in parts]) if parts else sim[:0]
    return (*_best_per_row(cand, seed, sim), {"index": info.as_dict()})


def select_cluster(cands: EmbeddingStore, seeds: EmbeddingStore, seed_sources: np.ndarray, km: KMeansResult,
                   cfg: SelectConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    rng = np.random.default_rng(cfg.seed)
    seed_labels, _ = assign(seeds, km.centroids)
    by_cluster: dict[int, np.ndarray] = {}
    order = np.argsort(km.labels, kind="stable")
    bounds = np.searchsorted(km.labels[order], np.arange(len(km.centroids) + 1))
    for c in range(len(km.centroids)):
        by_cluster[c] = order[bounds[c]:bounds[c + 1]]
    found_c, found_s, found_sim = [], [], []
    qualified = 0
    for src in np.unique(seed_sources):
        src_seeds = np.nonzero(seed_sources == src)[0]
        hits = np.bincount(seed_labels[src_seeds], minlength=len(km.centroids))
        clusters = np.nonzero(hits > cfg.min_seed_hits)[0]
        clusters = clusters[np.argsort(-hits[clusters], kind="stable")]
        qualified += len(clusters)
        budget = cfg.cap_per_source
        for c in clusters:
            members = by_cluster[int(c)]
            take = min(len(members), cfg.per_cluster, budget)
            if take <= 0:
                break
            picked = np.sort(rng.choice(members, size=take, replace=False))
            in_c = src_seeds[seed_labels[src_seeds] == c]
            sims = cands.take(picked) @ seeds.take(in_c).T
            best = sims.argmax(axis=1)
            found_c.append(picked)
            found_s.append(in_c[best])
            found_sim.append(sims[np.arange(len(picked)), best].astype(np.float64))
            budget -= take
    if not found_c:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0), {"qualified_clusters": 0}
    cand, seed, sim = (np.concatenate(x) for x in (found_c, found_s, found_sim))
    return (*_best_per_row(cand, seed, sim), {"qualified_clusters": int(qualified)})


def select_rows(mode: str, cands: EmbeddingStore | None, seeds: EmbeddingStore | None, seed_ids: list[str],
                seed_sources: np.ndarray, km: KMeansResult | None, cfg: SelectConfig, index_cfg: IndexConfig,
                n: int) -> Selection:
    if mode == "none" or n == 0:
        return Selection(np.arange(n), [None] * n, np.full(n, np.nan), {"mode": mode})
    if mode == "balanced":
        assert km is not None
        target = cfg.target_size if cfg.target_size is not None else max(1, n // 2)
        rows = balanced_sample(km.labels, km.parents, target, cfg.seed)
        return Selection(rows, [None] * len(rows), np.full(len(rows), np.nan), {"mode": mode, "target": target})
    assert cands is not None and seeds is not None
    if mode == "sample":
        cand, seed, sim, info = select_sample(cands, seeds, seed_sources, cfg, index_cfg)
    else:
        assert km is not None
        cand, seed, sim, info = select_cluster(cands, seeds, seed_sources, km, cfg)
    order = np.argsort(cand)
    cand, seed, sim = cand[order], seed[order], sim[order]
    return Selection(cand, [seed_ids[s] for s in seed], sim, {"mode": mode, **info})
