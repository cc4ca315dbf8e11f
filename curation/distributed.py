"""Multi-process pieces of the graph steps: torch.distributed collectives (gloo on CPU, NCCL on GPU), shard
bounds, the exact top-k merge and exact (fixed-point) sums.

Under `accelerate launch --num_processes N curate.py ...` every process memory-maps the same embedding store, so
nothing is scattered: the ranks agree on contiguous row ranges (`shard_bounds`) and each reads its own rows.
- kNN (index.knn_search): each rank indexes its range of the database and searches every query; the per-shard
  top-k lists are gathered on the main process and merged by (similarity, then lower row id).
- k-means (cluster.kmeans): each rank assigns its own training rows; per-cluster sums are all-reduced as 64-bit
  fixed-point integers. Integer addition is associative, so the sums (and the centroids) do not depend on how
  the rows were split: one process and N processes compute the same bits.
Results land on the main process (rank 0), which writes the step's files as it always did.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

# Fixed-point fraction bits for exact sums of values in [-1, 1]: 2^-32 resolution, and up to 2^31 summands per
# accumulator before an int64 could overflow.
FIXED_BITS = 32
PAD_SIM = float(np.finfo(np.float32).min)  # what Faiss returns next to id -1 for inner-product searches


@dataclass(frozen=True)
class Comm:
    """This process's place in the default torch.distributed group, and where collective tensors live
    (the current CUDA device for NCCL, the CPU for gloo)."""

    rank: int
    world: int
    local_rank: int
    device: str

    @classmethod
    def current(cls) -> Comm | None:
        """The initialised default group when it has more than one process (accelerate launch), else None."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                   device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _tensor(self, arr: np.ndarray) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)

    def all_reduce(self, arr: np.ndarray, op: str = "sum") -> np.ndarray:
        """Element-wise sum (or max) over the ranks, returned on every rank."""
        import torch.distributed as dist

        t = self._tensor(arr)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def broadcast_object(self, obj: Any) -> Any:
        """The main process's `obj` (any picklable value), on every rank."""
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device != "cpu" else None)
        return box[0]

    def gather(self, arr: np.ndarray) -> list[np.ndarray] | None:
        """Every rank's `arr` (same shape and dtype everywhere) in rank order on the main process; None elsewhere."""
        import torch
        import torch.distributed as dist

        t = self._tensor(arr)
        parts = [torch.empty_like(t) for _ in range(self.world)] if self.is_main else None
        dist.gather(t, parts, dst=0)
        return [p.cpu().numpy() for p in parts] if parts is not None else None

    def gather_rows(self, arr: np.ndarray) -> np.ndarray | None:
        """Concatenation (rank order) of every rank's rows; the first dimension may differ between ranks."""
        sizes = self.all_reduce(np.eye(self.world, dtype=np.int64)[self.rank] * len(arr))
        pad = np.zeros((int(sizes.max()) - len(arr), *arr.shape[1:]), dtype=arr.dtype)
        parts = self.gather(np.concatenate([arr, pad]))
        return None if parts is None else np.concatenate([p[:s] for p, s in zip(parts, sizes)])


def shard_bounds(n: int, world: int, align: int = 1) -> np.ndarray:
    """Row ranges [b[r], b[r+1]) of the ranks: contiguous, in rank order, multiples of `align` when every rank
    still gets at least one aligned block (so each block is the same BLAS call as in one process), else even."""
    per = math.ceil(n / max(world, 1))
    if align > 1 and per >= align:
        per = math.ceil(per / align) * align
    return np.minimum(np.arange(world + 1, dtype=np.int64) * per, n)


def sort_rows(sims: np.ndarray, ids: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every row ordered by similarity (descending), equal similarities by lower id, id -1 (padding) last;
    the first `k` columns. The one tie rule of the kNN results, whether from one index or merged shards."""
    key = np.where(ids >= 0, -sims.astype(np.float64), np.inf)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), key), axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


def canonical_ties(sims: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A Faiss result block with equal similarities ordered by id (Faiss leaves them in heap order). Rows
    without ties, the usual case, are returned untouched."""
    if sims.shape[1] < 2:
        return sims, ids
    tie = np.nonzero(np.any(sims[:, 1:] == sims[:, :-1], axis=1))[0]
    if len(tie):
        sims, ids = sims.copy(), ids.copy()
        sims[tie], ids[tie] = sort_rows(sims[tie], ids[tie])
    return sims, ids


def merge_topk(sims_parts: list[np.ndarray], ids_parts: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of the union of per-shard top-k lists (global ids): the k best over all shards, ties to the
    lower id, which is what one index over all rows returns."""
    sims, ids = sort_rows(np.concatenate(sims_parts, axis=1), np.concatenate(ids_parts, axis=1), k)
    sims[ids < 0] = PAD_SIM
    return sims, ids


def pad_columns(sims: np.ndarray, ids: np.ndarray, rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[rows, k] blocks, padded with (PAD_SIM, -1) (a shard smaller than k, or an empty one)."""
    out_s = np.full((rows, k), PAD_SIM, dtype=np.float32)
    out_i = np.full((rows, k), -1, dtype=np.int64)
    out_s[:, :sims.shape[1]], out_i[:, :ids.shape[1]] = sims, ids
    return out_s, out_i


def fixed_point(x: np.ndarray, bits: int) -> np.ndarray:
    """x * 2^bits rounded to int64 (exact float64 scaling): sums of these are exact and order-independent."""
    return np.rint(np.asarray(x, dtype=np.float64) * float(2**bits)).astype(np.int64)


def all_reduce_sum(arr: np.ndarray, comm: Comm | None) -> np.ndarray:
    return arr if comm is None else comm.all_reduce(arr)


def all_reduce_max(value: float, comm: Comm | None) -> float:
    return value if comm is None else float(comm.all_reduce(np.array([value], dtype=np.float64), op="max")[0])


def rows_at(x: np.ndarray, offset: int, idx: np.ndarray, comm: Comm | None) -> np.ndarray:
    """Rows `idx` (global row numbers) of the matrix whose rows offset.. are `x` on this rank, on every rank.
    The owner contributes the float32 bit patterns, the others zeros, summed as integers: an exact copy."""
    out = np.zeros((len(idx), x.shape[1]), dtype=np.float32)
    mine = (idx >= offset) & (idx < offset + len(x))
    out[mine] = x[idx[mine] - offset]
    if comm is None:
        return out
    bits = all_reduce_sum(out.view(np.int32).astype(np.int64), comm)
    return bits.astype(np.int32).view(np.float32)


def gpu_device(comm: Comm | None) -> int:
    """The GPU a rank's Faiss index goes on: its local rank (modulo the GPUs Faiss sees)."""
    import faiss

    return (comm.local_rank if comm is not None else 0) % max(1, faiss.get_num_gpus())


def to_rank_gpu(index: Any, comm: Comm | None) -> Any:
    """A CPU Faiss index moved to this rank's GPU (keeping its GPU resources alive with it)."""
    import faiss

    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, gpu_device(comm), index)
    gpu_index.referenced_objects = [res]
    return gpu_index
