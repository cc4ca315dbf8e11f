"""Faiss indices over L2-normalised embeddings (inner product = cosine), built and queried in blocks.

Exact `IndexFlatIP` up to `index.flat_max_rows` rows; above it an IVF index (`ivf`: IVF-Flat, `ivfpq`: IVF-PQ
for when even fp32 vectors do not fit in RAM). GPU when faiss sees one (faiss-gpu build), CPU otherwise.
Vectors are streamed from the on-disk store block by block, so only the index itself lives in RAM.
Under torch.distributed `knn_search` shards the database over the ranks and merges the top-k exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import require_faiss
from .config import IndexConfig
from .distributed import Comm, canonical_ties, merge_topk, pad_columns, shard_bounds, to_rank_gpu
from .embed import EmbeddingStore


@dataclass
class IndexInfo:
    kind: str
    rows: int
    nlist: int | None = None
    nprobe: int | None = None
    train_rows: int | None = None
    gpu: bool = False
    factory: str | None = None
    rerank_from_store: bool = False  # ivfpq: exact re-ranking with the stored vectors at search time

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def use_gpu(flag: bool | None) -> bool:
    faiss = require_faiss()

    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if flag and not available:
        raise RuntimeError("gpu=true but faiss sees no GPU: install faiss-gpu-cu12 instead of faiss-cpu")
    return available if flag is None else bool(flag)


def index_kind(n: int, cfg: IndexConfig, gpu: bool = False) -> str:
    if cfg.type != "auto":
        return cfg.type
    if n <= cfg.flat_max_rows:
        return "flat"
    return "ivf" if gpu else "ivfpq_fs"  # fast-scan PQ has no GPU implementation


def _default_pq_m(d: int) -> int:
    """d / 8 sub-quantizers (at least 16, so short vectors keep >= 8 bytes of 4-bit code), dividing d."""
    target = min(d, max(16, d // 8))
    return next(m for m in range(target, 0, -1) if d % m == 0)


def factory_string(kind: str, n: int, d: int, cfg: IndexConfig) -> tuple[str, int | None]:
    if kind == "flat":
        return "Flat", None
    nlist = cfg.nlist or int(min(65_536, max(64, 4 * math.sqrt(n))))
    nlist = max(1, min(nlist, n))
    m = cfg.pq_m or _default_pq_m(d)
    if kind in ("ivfpq", "ivfpq_fs") and d % m:
        raise ValueError(f"index.pq_m={m} must divide the embedding dimension {d}")
    return {
        "ivf": f"IVF{nlist},Flat",
        "ivfpq": f"IVF{nlist},PQ{m}",
        "ivfpq_fs": f"IVF{nlist},PQ{m}x4fs,Refine(SQfp16)",  # stored vectors are fp16: re-ranking is exact
    }[kind], nlist


def trained_index(store: EmbeddingStore, cfg: IndexConfig, seed: int = 0) -> tuple[Any, IndexInfo]:
    """The empty CPU index for the rows of `store` (IVF kinds trained on a seeded sample of them), and its info."""
    faiss = require_faiss()

    n, d = store.n, store.dim
    gpu = use_gpu(cfg.gpu)
    kind = index_kind(n, cfg, gpu)
    spec, nlist = factory_string(kind, n, d, cfg)
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    info = IndexInfo(kind=kind, rows=n)
    if nlist is not None:
        train_rows = min(n, max(nlist * cfg.train_points_per_list, 256 * 39 if "PQ" in spec else nlist))
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=train_rows, replace=False))
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.niter = cfg.train_niter
        ivf.cp.min_points_per_centroid = 1  # we choose the training size ourselves; no warning noise
        if hasattr(ivf, "pq"):
            ivf.pq.cp.niter = cfg.train_niter
        index.train(store.take(sample))
        info.nlist, info.nprobe, info.train_rows = nlist, min(cfg.nprobe, nlist), train_rows
    _search_params(index, info, cfg)
    info.factory = spec
    info.rerank_from_store = kind == "ivfpq"
    info.gpu = gpu
    return index, info


def _search_params(index: Any, info: IndexInfo, cfg: IndexConfig) -> None:
    faiss = require_faiss()

    if info.nprobe is not None:
        faiss.downcast_index(faiss.extract_index_ivf(index)).nprobe = info.nprobe
    if hasattr(index, "k_factor"):
        index.k_factor = cfg.refine_k_factor


def build_index(store: EmbeddingStore, cfg: IndexConfig, seed: int = 0) -> tuple[Any, IndexInfo]:
    """Index of every row of `store` (row i of the store = id i in the index); returns (index, info)."""
    faiss = require_faiss()

    index, info = trained_index(store, cfg, seed)
    if info.gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    for _, block in store.blocks(cfg.query_batch * 4):
        index.add(block)
    return index, info


def rerank_store(info: IndexInfo, store: EmbeddingStore) -> EmbeddingStore | None:
    return store if info.rerank_from_store else None


def search_blocks(index, queries: EmbeddingStore, k: int, batch: int, rerank: EmbeddingStore | None = None,
                  k_factor: float = 2.0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first query row, sims [b, k], ids [b, k]) for every block of queries.

    `rerank`: the indexed vectors (memory-mapped store); when given (IVF-PQ without in-index re-ranking), the
    index proposes k * k_factor candidates and the exact cosine from the stored fp16 vectors decides, so
    thresholds apply to true similarities, not PQ estimates.
    """
    k = max(1, min(k, index.ntotal))
    kk = max(k, min(int(round(k * k_factor)), index.ntotal)) if rerank is not None else k
    for start, block in queries.blocks(batch):
        sims, ids = index.search(block, kk)
        if rerank is not None:
            sims, ids = _rerank(block, ids, rerank, k)
        yield start, *canonical_ties(sims, ids)


def knn_search(store: EmbeddingStore, queries: EmbeddingStore, k: int, cfg: IndexConfig, seed: int = 0,
               comm: Comm | None = None) -> tuple[IndexInfo, Iterator[tuple[int, np.ndarray, np.ndarray]]]:
    """The k nearest rows of `store` for every row of `queries`: (index info, blocks of (first query row, sims
    [b, k], ids [b, k])). The one entry point of the graph steps' kNN.

    One process (`comm` None): `build_index` + `search_blocks`. Under torch.distributed the rows of `store` are
    sharded over the ranks (`distributed.shard_bounds`); IVF kinds are trained once, on the main process, exactly
    as in one process, and the trained empty index is broadcast; each rank adds its rows, searches every query
    block, and the main process merges the per-shard top-k exactly (`distributed.merge_topk`). Every rank must
    iterate the blocks (each holds a gather); only the main process receives any. A flat index (and IVF-Flat,
    whose scan does not depend on the partition) then gives what one process gives; PQ kinds re-rank each shard's
    own top k * refine_k_factor, a superset of the one-process candidates.
    """
    if comm is None:
        index, info = build_index(store, cfg, seed)
        return info, search_blocks(index, queries, k, cfg.query_batch, rerank_store(info, store),
                                   cfg.refine_k_factor)
    return _sharded_knn(store, queries, k, cfg, seed, comm)


def _shard_align(cfg: IndexConfig) -> int:
    """Shard boundaries on multiples of Faiss' BLAS database block and of the add block, so every BLAS call
    a shard makes is one the single index makes too (same bits, given the same BLAS threads)."""
    faiss = require_faiss()

    return math.lcm(int(faiss.cvar.distance_compute_blas_database_bs), cfg.query_batch * 4)


def _sharded_knn(store: EmbeddingStore, queries: EmbeddingStore, k: int, cfg: IndexConfig, seed: int, comm: Comm,
                 ) -> tuple[IndexInfo, Iterator[tuple[int, np.ndarray, np.ndarray]]]:
    faiss = require_faiss()

    bounds = shard_bounds(store.n, comm.world, _shard_align(cfg))
    lo, hi = int(bounds[comm.rank]), int(bounds[comm.rank + 1])
    payload = None
    if comm.is_main:
        index, info = trained_index(store, cfg, seed)
        payload = (info, faiss.serialize_index(index))
    info, blob = comm.broadcast_object(payload)
    index = faiss.deserialize_index(blob)
    _search_params(index, info, cfg)
    if info.gpu:
        index = to_rank_gpu(index, comm)
    shard = store.subset(np.arange(lo, hi))
    for _, block in shard.blocks(cfg.query_batch * 4):
        index.add(block)
    kk = max(1, min(k, store.n))

    def blocks() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        local = (search_blocks(index, queries, kk, cfg.query_batch, rerank_store(info, shard), cfg.refine_k_factor)
                 if hi > lo else None)
        for start in range(0, queries.n, cfg.query_batch):
            rows = min(cfg.query_batch, queries.n - start)
            sims, ids = np.zeros((rows, 0), np.float32), np.zeros((rows, 0), np.int64)
            if local is not None:
                _, sims, ids = next(local)
                ids = np.where(ids >= 0, ids + lo, -1)
            sims, ids = pad_columns(sims, ids, rows, kk)
            all_sims, all_ids = comm.gather(sims), comm.gather(ids)
            if all_sims is not None and all_ids is not None:
                yield start, *merge_topk(all_sims, all_ids, kk)

    return info, blocks()


def _rerank(queries: np.ndarray, ids: np.ndarray, store: EmbeddingStore, k: int, sub: int = 256,
            ) -> tuple[np.ndarray, np.ndarray]:
    out_s = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(ids), k), -1, dtype=np.int64)
    for s in range(0, len(ids), sub):
        cand = ids[s:s + sub]
        valid = cand >= 0
        vecs = np.zeros(cand.shape + (store.dim,), dtype=np.float32)
        vecs[valid] = store.take(cand[valid])
        exact = np.einsum("bd,bkd->bk", queries[s:s + sub], vecs)
        exact[~valid] = -np.inf
        top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        out_s[s:s + sub] = np.take_along_axis(exact, top, axis=1)
        out_i[s:s + sub] = np.where(np.isfinite(out_s[s:s + sub]), np.take_along_axis(cand, top, axis=1), -1)
    return out_s, out_i
