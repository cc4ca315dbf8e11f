"""Distributed kNN, k-means and the whole offline pipeline in 2 gloo processes equal one process, bit for bit.

Every process runs Faiss with one thread (the 1-process references too): BLAS rounding depends on the thread
count, in one process as much as in several, so equal thread counts make the comparison exact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import datasets
import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from curation import CurateConfig, run_pipeline
from curation.cluster import cluster_store
from curation.config import ClusterConfig, IndexConfig
from curation.distributed import PAD_SIM, Comm, merge_topk, shard_bounds
from curation.embed import EmbeddingStore, normalize_rows
from curation.index import knn_search
from training.config import load_config

# name -> (index config, planted exact copies); k = 8, query_batch 128: several query blocks. IVF scans lists
# in probe order, so an exact tie at the k-th place may keep another id than the merge (lower id): no copies there.
KNN_CASES = {
    "flat": (IndexConfig(type="flat", query_batch=128), True),
    "ivf": (IndexConfig(type="ivf", nlist=16, nprobe=4, query_batch=128), False),
    "ivfpq_fs": (IndexConfig(type="ivfpq_fs", nlist=16, nprobe=4, query_batch=128), False),
}
KMEANS_CASES = {  # name -> (config, rows of the data); block 64: the training rows span both ranks
    "spherical": (ClusterConfig(num_clusters=12, niter=8, nredo=2, max_points_per_centroid=30, levels=2,
                                branching=3), "blobs"),
    "l2_with_empty_clusters": (ClusterConfig(num_clusters=15, niter=5, spherical=False), "ten_distinct"),
}


@contextlib.contextmanager
def faiss_threads(n: int):
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _entry(rank: int, world: int, init_file: str, fn, args) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"})
    faiss.omp_set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_two(tmp_path: Path, fn, *args) -> None:
    """`fn(rank, world, *args)` in 2 gloo processes, with a fresh rendezvous file (a reused FileStore file
    holds the addresses of an earlier group)."""
    init_file = Path(tempfile.mkdtemp(dir=tmp_path, prefix="gloo_")) / "init"
    mp.spawn(_entry, args=(2, str(init_file), fn, args), nprocs=2, join=True)


# ---------- data ----------


def knn_data(copies: bool) -> np.ndarray:
    """1000 x 32 unit vectors in 12 blobs; with `copies`, rows 990.. are exact copies of rows 0.. (ties)."""
    rng = np.random.default_rng(0)
    centers = normalize_rows(rng.standard_normal((12, 32)))
    x = normalize_rows(centers[rng.integers(0, 12, 1000)] + 0.3 * rng.standard_normal((1000, 32)))
    if copies:
        x[990:] = x[:10]
    return x.astype(np.float16)


def kmeans_data(kind: str) -> np.ndarray:
    rng = np.random.default_rng(1)
    if kind == "blobs":
        centers = normalize_rows(rng.standard_normal((12, 16)))
        return normalize_rows(centers[rng.integers(0, 12, 500)] + 0.1 * rng.standard_normal((500, 16)))
    distinct = normalize_rows(rng.standard_normal((10, 8)))  # 15 clusters over 10 distinct points: empty ones
    return distinct[rng.integers(0, 10, 300)]


def knn_results(comm: Comm | None) -> dict[str, np.ndarray]:
    out = {}
    for name, (cfg, copies) in KNN_CASES.items():
        store = EmbeddingStore.from_array(knn_data(copies))
        _, blocks = knn_search(store, store, 8, cfg, seed=0, comm=comm)
        parts = list(blocks)
        if parts:
            out[f"{name}_sims"] = np.concatenate([p[1] for p in parts])
            out[f"{name}_ids"] = np.concatenate([p[2] for p in parts])
    return out


def kmeans_results(comm: Comm | None) -> dict[str, np.ndarray]:
    out = {}
    for name, (cfg, data) in KMEANS_CASES.items():
        km = cluster_store(EmbeddingStore.from_array(kmeans_data(data)), cfg, comm, block=64)
        if km is not None:
            out[f"{name}_centroids"], out[f"{name}_labels"] = km.centroids, km.labels
            for i, p in enumerate(km.parents):
                out[f"{name}_parent{i}"] = p
    return out


def _graph_worker(rank: int, world: int, out: str) -> None:
    comm = Comm.current()
    assert comm is not None and comm.world == world and comm.rank == rank
    results = {**knn_results(comm), **kmeans_results(comm)}
    assert bool(results) == (rank == 0)  # merged results only on the main process
    if rank == 0:
        np.savez(out, **results)


# ---------- tests ----------


def test_shard_bounds_and_exact_merge():
    assert shard_bounds(10, 2).tolist() == [0, 5, 10]
    assert shard_bounds(10, 3).tolist() == [0, 4, 8, 10]
    assert shard_bounds(300_000, 2, 65_536).tolist() == [0, 196_608, 300_000]  # aligned blocks
    assert shard_bounds(100, 2, 64).tolist() == [0, 50, 100]  # too small to align: even
    assert shard_bounds(1, 3).tolist() == [0, 1, 1, 1]
    # shard 0 holds ids 0..9, shard 1 ids 10..19; equal similarities go to the lower id, padding last
    s0, i0 = np.array([[0.9, 0.5, 0.5]], np.float32), np.array([[3, 7, 2]])
    s1, i1 = np.array([[0.5, 0.4, PAD_SIM]], np.float32), np.array([[11, 15, -1]])
    sims, ids = merge_topk([s0, s1], [i0, i1], 4)
    assert ids.tolist() == [[3, 2, 7, 11]] and sims.tolist()[0][:1] == [np.float32(0.9)]
    sims, ids = merge_topk([s1[:, 2:], s1[:, 2:]], [i1[:, 2:], i1[:, 2:]], 2)
    assert ids.tolist() == [[-1, -1]] and np.all(sims == PAD_SIM)


@pytest.mark.slow  # the pipeline's two-process test stays fast
def test_knn_and_kmeans_two_processes_equal_one_process(tmp_path):
    """Sharded flat / IVF-Flat kNN and k-means (spherical with a hierarchy; L2 with empty clusters split) in 2
    gloo processes give exactly the 1-process arrays; PQ fast-scan re-ranks a superset, so never worse."""
    out = tmp_path / "two.npz"
    spawn_two(tmp_path, _graph_worker, str(out))
    with faiss_threads(1):
        ref = {**knn_results(None), **kmeans_results(None)}
    two = dict(np.load(out))
    assert set(two) == set(ref)
    for name in ("flat", "ivf"):
        np.testing.assert_array_equal(two[f"{name}_ids"], ref[f"{name}_ids"], err_msg=name)
        np.testing.assert_array_equal(two[f"{name}_sims"], ref[f"{name}_sims"], err_msg=name)
    # the planted exact copies: row i and row 590 + i tie, the lower id first (the one tie rule)
    assert ref["flat_ids"][990, :2].tolist() == [0, 990] and ref["flat_ids"][0, :2].tolist() == [0, 990]
    assert np.all(two["ivfpq_fs_sims"] >= ref["ivfpq_fs_sims"] - 1e-6)
    for key in (k for k in ref if not k.startswith(tuple(KNN_CASES))):
        np.testing.assert_array_equal(two[key], ref[key], err_msg=key)


def pipeline_source(root: Path) -> None:
    """40 distinct tiles with an embedding column: rows 30..35 copy rows 0..5 by embedding (cosine ~0.99),
    one eval image overlaps row 12 by embedding (cosine ~0.8)."""
    from curation_fixtures import distinct_images, encode

    tiles = distinct_images(41)
    rng = np.random.default_rng(0)
    emb = normalize_rows(rng.standard_normal((40, 32)))
    emb[30:36] = normalize_rows(emb[:6] + 0.02 * rng.standard_normal((6, 32)))
    feats = datasets.Features({"image": datasets.Image(), "emb": datasets.List(datasets.Value("float32"))})
    datasets.Dataset.from_dict({"image": [{"bytes": encode(t[1]), "path": None} for t in tiles[:40]],
                               "emb": emb.tolist()}, features=feats).save_to_disk(str(root / "src"))
    ev = normalize_rows(0.8 * emb[12:13] + 0.6 * normalize_rows(rng.standard_normal((1, 32))))
    datasets.Dataset.from_dict({"image": [{"bytes": encode(tiles[40][1]), "path": None}], "emb": ev.tolist()},
                               features=feats).save_to_disk(str(root / "ev"))


def pipeline_argv(root: Path, out: Path) -> list[str]:
    return [f"sources=[{{name: src, path: {root / 'src'}}}]", f"eval_sets=[{{name: ev, path: {root / 'ev'}}}]",
            "validate.min_size=32", "dedup.copy_detection.embedding_column=emb", "dedup.copy_detection.threshold=0.95",
            "decontaminate.embedding_column=emb", "decontaminate.threshold=0.7", "embed.model=null",
            "embed.embedding_column=emb", "embed.chunk_rows=8", "index.query_batch=16", "cluster.num_clusters=5",
            "cluster.niter=5", "select.mode=balanced", "select.target_size=20", "output.keep_images=false",
            f"output.dir={out}"]


def _pipeline_worker(rank: int, world: int, root: str, out: str) -> None:
    stats = run_pipeline(load_config(CurateConfig, pipeline_argv(Path(root), Path(out))))
    assert (stats["world_size"] == 2) if rank == 0 else stats == {}


def curated(out: Path) -> tuple[list[str], list[dict]]:
    ids = datasets.load_from_disk(str(out / "dataset"))["id"]
    return ids, pq.read_table(out / "removed.parquet").to_pylist()


def test_pipeline_two_processes_equal_one_process(tmp_path):
    """curate.py's whole offline pipeline (hashes, copy-detection kNN, decontamination, k-means, balanced
    selection) in 2 gloo processes: the same kept set and the same removal manifest as one process."""
    pipeline_source(tmp_path)
    spawn_two(tmp_path, _pipeline_worker, str(tmp_path), str(tmp_path / "two"))
    with faiss_threads(1):
        stats = run_pipeline(load_config(CurateConfig, pipeline_argv(tmp_path, tmp_path / "one")))
    assert stats["removed_reasons"] == {"near_duplicate": 6, "eval_overlap": 1, "not_selected": 13}
    ids_two, manifest_two = curated(tmp_path / "two")
    ids_one, manifest_one = curated(tmp_path / "one")
    assert ids_two == ids_one and len(ids_one) == 20
    assert manifest_two == manifest_one
    labels = [datasets.load_from_disk(str(tmp_path / o / "dataset"))["cluster"] for o in ("one", "two")]
    assert labels[0] == labels[1]
