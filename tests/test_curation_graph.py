"""Curation graph logic, exactly, on given hashes / embeddings with known structure (no images, no models)."""

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from curation.cluster import _even_split, balanced_sample, cluster_store
from curation.config import ClusterConfig, IndexConfig, SelectConfig
from curation.embed import EmbeddingStore, normalize_rows
from curation.graph import (
    connected_components,
    contaminated_components,
    dedup_from_edges,
    exact_edges,
    hamming_pairs,
    id_ranks,
    knn_edges,
    phash_edges,
    representatives,
)
from curation.index import build_index, search_blocks
from curation.selection import select_rows


def test_connected_components_matches_scipy():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(1, 400))
        m = int(rng.integers(0, 500))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        labels = connected_components(n, a, b)
        k, ref = scipy_components(coo_matrix((np.ones(m), (a, b)), shape=(n, n)), directed=False)
        assert len(np.unique(labels)) == k
        for comp in range(k):
            members = np.nonzero(ref == comp)[0]
            assert np.all(labels[members] == members.min())  # label = smallest index


def test_keep_rule_largest_area_then_lowest_id():
    ids = ["s/b", "s/a", "s/c", "s/d", "s/e"]
    labels = np.array([0, 0, 0, 3, 3])
    area = np.array([100, 100, 50, 10, 20])
    rep = representatives(labels, area, id_ranks(ids))
    # component {0,1,2}: 0 and 1 tie on area, "s/a" < "s/b" -> row 1; component {3,4}: larger area -> row 4
    assert rep.tolist() == [1, 1, 1, 4, 4]


def _planted_embeddings(seed: int = 0):
    """8 groups: orthogonal bases; group g has members at known cosines to its base."""
    rng = np.random.default_rng(seed)
    d = 32
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    rows, group = [], []
    for g in range(8):
        base = basis[g]
        rows.append(base)
        group.append(g)
        if g < 4:  # a copy at cosine ~0.9 of the base
            rows.append(0.9 * base + np.sqrt(1 - 0.81) * basis[8 + g])
            group.append(g)
    # a chain: c0 ~ c1 (0.8), c1 ~ c2 (0.8), c0 vs c2 = 0.28 (< 0.6) -> one component only through c1
    c0 = basis[20]
    c1 = 0.8 * basis[20] + 0.6 * basis[21]
    c2 = 0.8 * c1 + 0.6 * basis[22]
    rows += [c0, c1, c2]
    group += [100, 100, 100]
    return normalize_rows(np.array(rows)), np.array(group)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_knn_threshold_components_keep_rule(kind):
    x, group = _planted_embeddings()
    n = len(x)
    store = EmbeddingStore.from_array(x.astype(np.float16))
    cfg = IndexConfig(type=kind, nlist=2, nprobe=2, train_points_per_list=4)
    index, info = build_index(store, cfg)
    assert info.kind == kind
    parts = [knn_edges(i, s, 0.6, start) for start, s, i in search_blocks(index, store, 64, 1024)]
    a, b, sim = (np.concatenate([p[j] for p in parts]) for j in range(3))
    ids = [f"s/{i:03d}" for i in range(n)]
    area = np.full(n, 100)
    area[1] = 400  # the copy of group 0 is larger: it is kept instead of the base
    res = dedup_from_edges(n, a, b, area, id_ranks(ids), sim)
    # expected components = groups; exactly one kept per group
    for g in np.unique(group):
        members = np.nonzero(group == g)[0]
        assert len(np.unique(res.rep[members])) == 1
    kept = np.nonzero(res.rep == np.arange(n))[0]
    assert len(kept) == len(np.unique(group))
    assert res.rep[0] == 1 and res.rep[1] == 1  # largest area wins
    chain = np.nonzero(group == 100)[0]
    assert res.rep[chain].tolist() == [chain[0]] * 3  # equal area -> lowest id
    assert np.nanmax(res.score[chain]) == pytest.approx(0.8, abs=2e-3)
    # every edge is above the threshold, no edge crosses groups (no false merges)
    assert np.all(sim > 0.6) and np.all(group[a] == group[b])


def test_decontamination_drops_whole_component():
    # rows 0-1-2 one component (rep 0), row 3 alone, row 4 alone
    n = 5
    res = dedup_from_edges(n, np.array([0, 1]), np.array([1, 2]), np.full(n, 1), np.arange(n))
    assert res.rep.tolist() == [0, 0, 0, 3, 4]
    # an eval image touches row 2, which was already removed as a duplicate: its representative 0 must go
    assert contaminated_components(res.rep, np.array([2])).tolist() == [0]
    assert contaminated_components(res.rep, np.array([4, 1, 2])).tolist() == [0, 4]
    assert contaminated_components(res.rep, np.array([], dtype=np.int64)).tolist() == []


def test_exact_edges_group_identical_hashes():
    a, b = exact_edges(["x", "y", "x", "z", "x"])
    labels = connected_components(5, a, b)
    assert labels.tolist() == [0, 1, 0, 3, 0]


def test_hamming_pairs_exact_against_brute_force():
    rng = np.random.default_rng(1)
    n = 3000
    h = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64)
    for i in range(0, 400, 2):  # plant pairs at distance 0..8
        x = int(h[i])
        for bit in rng.choice(64, size=int(rng.integers(0, 9)), replace=False):
            x ^= 1 << int(bit)
        h[i + 1] = np.uint64(x)
    x = h[:, None] ^ h[None, :]
    dist = np.unpackbits(x.view(np.uint8).reshape(n, n, 8), axis=2).sum(axis=2)
    for dmax in (0, 3, 6, 8):
        ii, jj, dd = hamming_pairs(h, dmax)
        got = set(zip(ii.tolist(), jj.tolist()))
        ref_i, ref_j = np.nonzero(np.triu(dist <= dmax, k=1))
        assert got == set(zip(ref_i.tolist(), ref_j.tolist()))
        assert np.all(dd <= dmax)


def test_phash_edges_flip_and_identical_collapse():
    rng = np.random.default_rng(2)
    h = rng.integers(0, 2**63, size=50, dtype=np.int64).astype(np.uint64)
    flip = rng.integers(0, 2**63, size=50, dtype=np.int64).astype(np.uint64)
    h[10] = h[11] = h[12]  # identical hashes
    h[20] = flip[30]  # 20 is the mirror image of 30
    a, b, _ = phash_edges(h, flip, 4)
    labels = connected_components(50, a, b)
    assert labels[10] == labels[11] == labels[12]
    assert labels[20] == labels[30]
    assert len(np.unique(labels)) == 50 - 3


def test_even_split_and_balanced_sampling():
    alloc = _even_split(np.array([1, 10, 10, 3]), 12)
    assert alloc.sum() == 12 and alloc.tolist() == [1, 4, 4, 3]
    assert _even_split(np.array([2, 2]), 10).tolist() == [2, 2]
    # 3 leaf clusters of sizes 100, 10, 2 under one parent; target 30 -> 2 from the small one, rest even
    labels = np.array([0] * 100 + [1] * 10 + [2] * 2)
    rows = balanced_sample(labels, [np.array([0, 0, 0])], 30, seed=0)
    counts = np.bincount(labels[rows], minlength=3)
    assert counts.tolist() == [18, 10, 2] and len(np.unique(rows)) == 30


def test_kmeans_hierarchy_and_selection_modes():
    rng = np.random.default_rng(0)
    centers = normalize_rows(rng.standard_normal((6, 16)))
    x = normalize_rows(np.repeat(centers, 50, axis=0) + 0.05 * rng.standard_normal((300, 16)))
    store = EmbeddingStore.from_array(x)
    km = cluster_store(store, ClusterConfig(num_clusters=6, levels=2, branching=3, niter=20, nredo=5,
                                            max_points_per_centroid=20, seed=0))
    assert km.info["train_rows"] == 120 and km.info["subsampled"]  # 6 * 20, reported
    assert km.info["level_sizes"] == [6, 2] and len(km.parents) == 1
    # each planted blob is one cluster
    for c in range(6):
        assert len(np.unique(km.labels[c * 50:(c + 1) * 50])) == 1
    seeds = EmbeddingStore.from_array(centers[:2])
    seed_ids = ["seedA/0", "seedA/1"]
    sel = select_rows("sample", store, seeds, seed_ids, np.array(["seedA", "seedA"], dtype=object), km,
                      SelectConfig(k=4), IndexConfig(), store.n)
    assert len(sel.rows) == 8 and set(sel.retrieved_by) == set(seed_ids)
    assert np.all(sel.similarity > 0.9)
    # cluster mode: 5 seeds in blob 0 (> 3 hits) -> up to per_cluster rows of that blob; blob 1 has 1 seed
    seeds5 = EmbeddingStore.from_array(np.concatenate([x[:5], x[50:51]]))
    sel = select_rows("cluster", store, seeds5, [f"s/{i}" for i in range(6)], np.array(["s"] * 6, dtype=object),
                      km, SelectConfig(per_cluster=20, min_seed_hits=3), IndexConfig(), store.n)
    assert len(sel.rows) == 20 and np.all(sel.rows < 50)
    sel = select_rows("balanced", store, None, [], np.zeros(0), km, SelectConfig(target_size=60), IndexConfig(),
                      store.n)
    assert np.bincount(km.labels[sel.rows]).tolist() == [10] * 6


@pytest.mark.parametrize("kind", ["ivf", "ivfpq_fs", pytest.param("ivfpq", marks=pytest.mark.slow)])
def test_approximate_indices_find_planted_pairs(kind):
    """Above index.flat_max_rows the index is approximate: planted near-copies must still be found."""
    rng = np.random.default_rng(0)
    n, d, pairs = 4000, 64, 100
    centers = normalize_rows(rng.standard_normal((20, d)))
    # blob members: cosine ~0.9 to their centre, ~0.8 to each other; planted copies: cosine ~0.99
    x = normalize_rows(centers[rng.integers(0, 20, n)] + 0.5 / np.sqrt(d) * rng.standard_normal((n, d)))
    x[n - pairs:] = normalize_rows(x[:pairs] + 0.15 / np.sqrt(d) * rng.standard_normal((pairs, d)))
    store = EmbeddingStore.from_array(x.astype(np.float16))
    cfg = IndexConfig(flat_max_rows=1000, type="auto" if kind == "ivfpq_fs" else kind, nprobe=8)
    index, info = build_index(store, cfg)
    assert info.kind == kind and info.nlist == 252  # int(4 * sqrt(4000))
    rerank = store if info.rerank_from_store else None
    parts = [knn_edges(i, s, 0.95, start) for start, s, i in search_blocks(index, store, 16, 1024, rerank, 4.0)]
    a, b, _ = (np.concatenate([p[j] for p in parts]) for j in range(3))
    res = dedup_from_edges(n, a, b, np.ones(n, dtype=np.int64), np.arange(n))
    found = res.rep[np.arange(pairs)] == res.rep[np.arange(n - pairs, n)]
    assert found.mean() >= 0.98
    assert np.bincount(res.rep).max() == 2  # no false merges: every component is one planted pair or single
