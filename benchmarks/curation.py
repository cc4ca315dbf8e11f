"""Curation benchmarks (CPU). Prints tables; never part of the test run.

    python benchmarks/curation.py sample          # images/s per step + recall per transform on the sample set
    python benchmarks/curation.py copy-dedup      # 1M synthetic 256-d embeddings, 10,000 planted pairs
    python benchmarks/curation.py copy-dedup-10m  # 10M, streamed to a memory-mapped .npy (5 GB), 100,000 pairs
    python benchmarks/curation.py processes       # the same kNN (+ k-means) in 1 process, then in 2 (gloo)
    python benchmarks/curation.py all

`sample`: real photos (scikit-image tiles) with injected exact / re-encoded / resized / cropped / flipped copies
and eval-set overlaps, run through the full pipeline offline (hashes + a tiny random-init DINOv2 saved locally).
`copy-dedup`: copy-detection dedup exactly as the pipeline runs it (Faiss IVF index, k = 64 kNN, cosine > 0.6,
union-find components, keep rule), reporting wall time, peak RSS, planted-pair recall and false merges.
Targets: < 3 min, < 6 GiB, recall >= 99 %, no false merges.
`copy-dedup-10m`: the same dedup (same code, same table) at 10M x 256-d, with vectors that are never all in RAM:
generated block by block (seed per block; the 2,000 blobs of `copy-dedup`, each planted pair inside one block)
into a temporary `.npy` under `--workdir` (5 GB of disk), memory-mapped as the `EmbeddingStore` and streamed in
blocks. Defaults chosen for this size (measured at 1M first, docs/curation_at_scale.md): IVF4096 + PQ32x4fs +
fp16 re-rank (the `Refine(SQfp16)` copy is 5 GB of RAM), nprobe 8, k = 16 (a copy is the nearest neighbour; the
coarse quantizer, 10M x 4096 dot products for the add and again for the search, dominates the time).
Targets: recall >= 99 %, peak RSS < 16 GiB (the touched pages of the mapped file count); the time is quoted
(measured on 2 shared cores: 34 min, 14.0 GiB, recall 99.94 %). Generation is reported, not counted.
`--n 1000000` is the quick check (~3 min). Not part of `all`.
`processes`: the copy-detection kNN and the k-means of the pipeline (`index.knn_search`, `cluster.cluster_store`)
on the same memory-mapped embeddings, first in 1 process, then sharded over `--procs` gloo processes
(curation.distributed), each process with cores / processes Faiss threads; prints the two wall times per phase
side by side and whether the results are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # ru_maxrss is KiB on Linux


def bench_sample(n_distinct: int, copies: int, threshold: float) -> None:
    import datasets

    datasets.disable_progress_bars()
    from curation_fixtures import build_collection, save_tiny_dinov2, score_curation

    from curation import CurateConfig, run_pipeline
    from training.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        truth = build_collection(root, n_distinct=n_distinct, n_copies_per_transform=copies, n_eval=8, n_seeds=16)
        model = save_tiny_dinov2(root / "tiny_dinov2")
        argv = [f"sources=[{{name: web, path: {root / 'uncurated'}}}]",
                f"seeds=[{{name: seedset, path: {root / 'seeds'}}}]",
                f"eval_sets=[{{name: evalset, path: {root / 'eval'}}}]", "validate.min_size=32",
                f"dedup.copy_detection.model={model}", f"dedup.copy_detection.threshold={threshold}",
                f"decontaminate.model={model}", f"decontaminate.threshold={threshold}", f"embed.model={model}",
                "cluster.num_clusters=16", "select.mode=sample", f"output.dir={root / 'out'}"]
        stats = run_pipeline(load_config(CurateConfig, argv))
        print(f"\nSample set: {stats['steps'][0]['rows_in']} files ({n_distinct} distinct 96 px tiles + "
              f"{copies} copies per transform + 8 eval overlaps), CPU, {os.cpu_count()} cores")
        print(f"{'step':24s} {'rows in':>8s} {'kept':>6s} {'removed':>8s} {'seconds':>8s} {'images/s':>10s}")
        for s in stats["steps"]:
            ips = f"{s['images_per_s']:.0f}" if s["images_per_s"] else "-"
            print(f"{s['step']:24s} {s['rows_in']:8d} {s['rows_kept']:6d} {s['rows_removed']:8d} "
                  f"{s['seconds']:8.3f} {ips:>10s}")
        manifest = datasets.load_from_disk(str(root / "out" / "removed")).to_list()
        score = score_curation(manifest, truth)
        print(f"\nOffline configuration: exact sha256 + pHash <= 6 (and mirrored) + tiny random DINOv2 at cosine > "
              f"{threshold}")
        print(f"{'transform':10s} recall")
        for k, v in score["recall"].items():
            print(f"{k:10s} {v:6.1%}")
        print(f"precision {score['precision']:.1%}, false merges {len(score['false_merges'])}, "
              f"eval-overlap recall {score['eval_recall']:.1%}")


def planted_embeddings(n: int, d: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors (2,000 Gaussian blobs, like real embeddings) with `pairs` planted near-copies
    at cosine ~0.9 to their original; returns (float16 matrix, planted pairs [pairs, 2])."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((2000, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float16)
    block = 100_000
    for s in range(0, n, block):
        e = min(s + block, n)
        v = centers[rng.integers(0, len(centers), e - s)] + 0.1 * rng.standard_normal((e - s, d)).astype(np.float32)
        x[s:e] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    originals = rng.choice(n, size=2 * pairs, replace=False)
    src, dst = originals[:pairs], originals[pairs:]
    noise = rng.standard_normal((pairs, d)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    base = x[src].astype(np.float32)
    noise -= (noise * base).sum(1, keepdims=True) * base  # orthogonal to base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = rng.uniform(0.8, 0.95, size=(pairs, 1)).astype(np.float32)
    x[dst] = (cos * base + np.sqrt(1 - cos**2) * noise).astype(np.float16)
    return x, np.stack([src, dst], axis=1)


def planted_embeddings_file(path: Path, n: int, d: int, pairs: int, centers: int = 2000, seed: int = 0,
                            block: int = 100_000) -> np.ndarray:
    """`planted_embeddings`, streamed to a `.npy` file block by block (the matrix is never held in RAM): unit
    vectors in `centers` Gaussian blobs (as there: 2,000 centres, noise 0.1 per dimension) and `pairs` near-copies
    at cosine 0.8-0.95 to their original, each pair planted inside one block. Block b draws from its own seed
    (seed, b), so a block is reproducible alone. Written with plain file writes, not a memory map, so generating
    does not count in the process' peak RSS. Returns the planted pairs [pairs, 2]."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((centers, d)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    planted = []
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.float16).str, "fortran_order": False,
                                                 "shape": (n, d)})
        for b, s in enumerate(range(0, n, block)):
            e = min(s + block, n)
            r = np.random.default_rng([seed, b])
            v = mu[r.integers(0, len(mu), e - s)] + 0.1 * r.standard_normal((e - s, d), np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            p = pairs * e // n - pairs * s // n  # this block's share of the pairs
            rows = r.choice(e - s, size=2 * p, replace=False)
            src, dst = rows[:p], rows[p:]
            base = v[src]
            noise = r.standard_normal((p, d), np.float32)
            noise -= (noise * base).sum(1, keepdims=True) * base  # orthogonal to base
            noise /= np.linalg.norm(noise, axis=1, keepdims=True)
            cos = r.uniform(0.8, 0.95, size=(p, 1)).astype(np.float32)
            v[dst] = cos * base + np.sqrt(1 - cos**2) * noise
            f.write(np.ascontiguousarray(v.astype(np.float16)).tobytes())
            planted.append(np.stack([src + s, dst + s], axis=1))
    return np.concatenate(planted).astype(np.int64)


def _rss_split_gib() -> tuple[float, float]:
    """Current (anonymous, file-backed) resident memory: file-backed = touched pages of memory-mapped files."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / (1 << 20)  # kB
    return fields.get("RssAnon", float("nan")), fields.get("RssFile", float("nan"))


def _dedup_and_report(store, planted: np.ndarray, cfg, k: int, threshold: float, gen_s: float, what: str,
                      time_target: str, rss_target: str) -> None:
    """Copy-detection dedup of `store` with the pipeline's code (`build_index` + `search_blocks` with the same
    re-ranking rule as `index.knn_search`, `knn_edges`, `dedup_from_edges`), then the table."""
    import faiss

    from curation.graph import dedup_from_edges, knn_edges
    from curation.index import build_index, rerank_store, search_blocks

    n = store.n
    t0 = time.time()
    index, info = build_index(store, cfg)
    t_build = time.time() - t0
    parts = [knn_edges(ids, sims, threshold, start) for start, sims, ids in
             search_blocks(index, store, k, cfg.query_batch, rerank_store(info, store), cfg.refine_k_factor)]
    a, b, sim = (np.concatenate([p[j] for p in parts]) for j in range(3))
    t_search = time.time() - t0 - t_build
    ids_rank = np.arange(n)  # ids in row order: "lowest id" = lowest row
    res = dedup_from_edges(n, a, b, np.ones(n, dtype=np.int64), ids_rank, sim)
    total = time.time() - t0
    anon, file_backed = _rss_split_gib()
    rep = res.rep
    found = rep[planted[:, 0]] == rep[planted[:, 1]]
    # false merge: a component holding anything other than one planted pair's two rows
    partner = np.full(n, -1)
    partner[planted[:, 0]], partner[planted[:, 1]] = planted[:, 1], planted[:, 0]
    removed = np.nonzero(rep != np.arange(n))[0]
    false = int(np.sum(partner[removed] != rep[removed]))
    comp_sizes = np.bincount(rep)
    print(f"\nCopy-detection dedup: {n:,} x {store.dim}-d fp16 embeddings ({what}), {len(planted):,} planted pairs, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    print(f"index: {json.dumps(info.as_dict())}, k = {k}, cosine > {threshold}")
    print(f"{'data generation (not counted)':34s} {gen_s:8.1f} s")
    print(f"{'index build (train + add)':34s} {t_build:8.1f} s")
    print(f"{'kNN search + threshold':34s} {t_search:8.1f} s")
    print(f"{'components + keep rule':34s} {total - t_build - t_search:8.1f} s")
    print(f"{'total wall time':34s} {total:8.1f} s   {time_target}")
    print(f"{'peak RSS (whole process)':34s} {peak_rss_gib():8.2f} GiB {rss_target}")
    print(f"{'  RSS at the end: anonymous':34s} {anon:8.2f} GiB (index, arrays)")
    print(f"{'  RSS at the end: file-backed':34s} {file_backed:8.2f} GiB (memory-mapped files, libraries)")
    print(f"{'edges above threshold':34s} {len(a):8d}")
    print(f"{'planted-pair recall':34s} {found.mean():8.2%} (target >= 99 %)")
    print(f"{'rows removed':34s} {len(removed):8d}")
    print(f"{'false merges':34s} {false:8d} (largest component {comp_sizes.max()})")


def bench_copy_dedup(n: int, d: int, pairs: int, nlist: int, nprobe: int, k: int, threshold: float,
                     index_type: str) -> None:
    from curation.config import IndexConfig
    from curation.embed import EmbeddingStore

    t_gen = time.time()
    x, planted = planted_embeddings(n, d, pairs)
    gen_s = time.time() - t_gen
    store = EmbeddingStore.from_array(x)  # fp16 storage, converted block by block
    cfg = IndexConfig(type=index_type, nlist=nlist, nprobe=nprobe, query_batch=16_384)
    _dedup_and_report(store, planted, cfg, k, threshold, gen_s, "clustered, in RAM", "(target < 180 s)",
                      "(target < 6 GiB)")


def bench_copy_dedup_stream(n: int, d: int, pairs: int, nlist: int, nprobe: int, k: int, threshold: float,
                            index_type: str, workdir: str | None) -> None:
    """As `bench_copy_dedup`, but the vectors are written to a `.npy` file block by block and the store
    memory-maps it (as the pipeline memory-maps its Arrow embedding chunks): 10M x 256-d fp16 = 5 GB on disk."""
    from curation.config import IndexConfig
    from curation.embed import EmbeddingStore

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "embeddings.npy"
        t_gen = time.time()
        planted = planted_embeddings_file(path, n, d, pairs)
        gen_s = time.time() - t_gen
        store = EmbeddingStore.from_array(np.load(path, mmap_mode="r"))  # memory-mapped, streamed in blocks
        cfg = IndexConfig(type=index_type, nlist=nlist, nprobe=nprobe, query_batch=16_384)
        _dedup_and_report(store, planted, cfg, k, threshold, gen_s,
                          "2,000 Gaussian blobs, memory-mapped .npy, "
                          f"{path.stat().st_size / (1 << 30):.2f} GiB", "(quoted; no target)", "(target < 16 GiB)")
        del store


def _processes_worker(rank: int, world: int, init_file: str | None, args: dict, out: str) -> None:
    import faiss
    import torch.distributed as dist

    from curation.cluster import cluster_store
    from curation.config import ClusterConfig, IndexConfig
    from curation.distributed import Comm
    from curation.embed import EmbeddingStore
    from curation.graph import knn_edges
    from curation.index import knn_search

    faiss.omp_set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if init_file is not None:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    comm = Comm.current()
    store = EmbeddingStore.from_array(np.load(args["data"], mmap_mode="r"))
    cfg = IndexConfig(type=args["index"], nlist=args["nlist"], nprobe=args["nprobe"], query_batch=16_384)
    t0 = time.time()
    info, blocks = knn_search(store, store, args["k"], cfg, seed=0, comm=comm)
    t_build = time.time() - t0
    parts = [knn_edges(ids, sims, args["threshold"], start) for start, sims, ids in blocks]
    t_search = time.time() - t0 - t_build
    t1 = time.time()
    km = cluster_store(store, ClusterConfig(num_clusters=args["clusters"], niter=args["niter"],
                                            max_points_per_centroid=args["points_per_centroid"]), comm)
    t_kmeans = time.time() - t1
    if rank == 0:
        a, b, sim = (np.concatenate([p[j] for p in parts]) for j in range(3))
        order = np.lexsort((b, a))
        assert km is not None
        np.savez(out, a=a[order], b=b[order], sim=sim[order], labels=km.labels, centroids=km.centroids,
                 times=np.array([t_build, t_search, t_kmeans]), train_rows=km.info["train_rows"],
                 factory=info.factory or "")
    if init_file is not None:
        dist.barrier()
        dist.destroy_process_group()


def bench_processes(n: int, d: int, pairs: int, nlist: int, nprobe: int, k: int, threshold: float, index_type: str,
                    clusters: int, niter: int, points_per_centroid: int, procs: int) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t_gen = time.time()
        x, planted = planted_embeddings(n, d, pairs)
        np.save(root / "x.npy", x)
        del x
        gen_s = time.time() - t_gen
        args = {"data": str(root / "x.npy"), "index": index_type, "nlist": nlist, "nprobe": nprobe, "k": k,
                "threshold": threshold, "clusters": clusters, "niter": niter,
                "points_per_centroid": points_per_centroid}
        results, walls = {}, {}
        for world in (1, procs):
            out = root / f"w{world}.npz"
            init = None if world == 1 else str(Path(tempfile.mkdtemp(dir=root, prefix="gloo_")) / "init")
            t0 = time.time()
            mp.spawn(_processes_worker, args=(world, init, args, str(out)), nprocs=world, join=True)
            walls[world] = time.time() - t0
            results[world] = dict(np.load(out))
            b, q, c = results[world]["times"]  # printed at once: a long run killed later still reports this one
            print(f"[{world} process(es)] build {b:.1f} s, search {q:.1f} s, k-means {c:.1f} s, wall {walls[world]:.1f} s",
                  flush=True)
        one, many = results[1], results[procs]
        print(f"\nkNN + k-means in 1 vs {procs} processes: {n:,} x {d}-d fp16 embeddings ({pairs:,} planted pairs; "
              f"generation {gen_s:.0f} s, not counted), index {one['factory']}, k = {k}, cosine > {threshold}; "
              f"k-means {clusters} clusters on {int(one['train_rows']):,} rows, {niter} iterations; "
              f"{os.cpu_count()} cores, Faiss threads = cores / processes")
        print(f"{'phase':34s} {'1 process':>10s} {f'{procs} processes':>12s}")
        names = ["index build (train + add)", "kNN search + merge + threshold", "k-means (train + assign all)"]
        for name, a, b in zip(names, one["times"], many["times"]):
            print(f"{name:34s} {a:9.1f}s {b:11.1f}s")
        print(f"{'wall incl. process start':34s} {walls[1]:9.1f}s {walls[procs]:11.1f}s")
        same_edges = all(np.array_equal(one[c], many[c]) for c in ("a", "b", "sim"))
        for world, r in ((1, one), (procs, many)):
            key = set(zip(r["a"].tolist(), r["b"].tolist()))
            found = np.mean([(int(s), int(t)) in key or (int(t), int(s)) in key for s, t in planted])
            print(f"{world} process(es): {len(r['a']):,} edges, planted-pair recall {found:.2%}")
        print(f"identical edges: {same_edges}; identical k-means labels: {np.array_equal(one['labels'], many['labels'])}, "
              f"centroids: {np.array_equal(one['centroids'], many['centroids'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sample", "copy-dedup", "copy-dedup-10m", "processes", "all"])
    parser.add_argument("--n", type=int, default=None, help="rows (default 1M; copy-dedup-10m: 10M)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=None, help="planted pairs (default 10,000; copy-dedup-10m: n/100)")
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--nprobe", type=int, default=None, help="default 16; copy-dedup-10m: 8")
    parser.add_argument("--index", default="ivfpq_fs", choices=["flat", "ivf", "ivfpq", "ivfpq_fs"])
    parser.add_argument("--k", type=int, default=None, help="neighbours per row (default 64; copy-dedup-10m: 16)")
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--workdir", default=None, help="copy-dedup-10m: folder for the temporary .npy (default: "
                                                        "the system temp folder)")
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--tiny-threshold", type=float, default=0.99995)
    parser.add_argument("--procs", type=int, default=2, help="processes: the multi-process run")
    parser.add_argument("--clusters", type=int, default=1024, help="processes: k-means clusters")
    parser.add_argument("--niter", type=int, default=20, help="processes: k-means iterations")
    parser.add_argument("--points-per-centroid", type=int, default=64, help="processes: k-means subsample")
    args = parser.parse_args()
    if args.what == "copy-dedup-10m":
        n = args.n or 10_000_000
        bench_copy_dedup_stream(n, args.dim, args.pairs or n // 100, args.nlist, args.nprobe or 8, args.k or 16,
                                args.threshold, args.index, args.workdir)
        return
    args.n, args.pairs = args.n or 1_000_000, args.pairs or 10_000
    args.nprobe, args.k = args.nprobe or 16, args.k or 64
    if args.what in ("sample", "all"):
        bench_sample(args.distinct, args.copies, args.tiny_threshold)
    if args.what in ("copy-dedup", "all"):
        bench_copy_dedup(args.n, args.dim, args.pairs, args.nlist, args.nprobe, args.k, args.threshold, args.index)
    if args.what in ("processes", "all"):
        bench_processes(args.n, args.dim, args.pairs, args.nlist, args.nprobe, args.k, args.threshold, args.index,
                        args.clusters, args.niter, args.points_per_centroid, args.procs)


if __name__ == "__main__":
    main()
