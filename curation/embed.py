"""Embeddings: model resolution (offline-safe), a batched `datasets.map` embedder, and the on-disk store.

Storage: each chunk of `embed.chunk_rows` rows is one `datasets.map` whose output (a fixed-size fp16 list
column, L2-normalised vectors) goes to `cache/embeddings/<key>/chunk-<start>.arrow`. `datasets` writes a map to
a temporary file and renames it when complete, so a killed run keeps its finished chunks and recomputes only the
unfinished one. Under `accelerate launch` process r embeds chunks r, r + world, ... (data parallel, one model
per GPU); everybody then memory-maps all chunks. The matrix is never loaded whole: readers get zero-copy
views of the memory-mapped Arrow files and convert one block at a time.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from training.data.decode import decode_image

from .common import CurationError, DistState, fingerprint, kill_point


@dataclass(frozen=True)
class ModelRef:
    """A resolved embedder: where to load it from and a stable identity for cache keys."""

    name: str
    path: str
    identity: str


def _dir_digest(path: Path) -> str:
    """Content hash of a model folder (config, preprocessor and weight files)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(f.relative_to(path).as_posix().encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023
                h.update(block)
    return h.hexdigest()[:16]


def resolve_model(name: str, config_key: str) -> ModelRef:
    """Local folder, or a Hub id (from the cache when offline). Fails at once with the fix when it cannot."""
    p = Path(os.path.expanduser(name))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CurationError(f"{config_key}={name!r}: folder has no config.json; pass a folder written by "
                                f"save_pretrained (any AutoModel)")
        return ModelRef(name=name, path=str(p), identity=f"local:{_dir_digest(p)}")
    if name.startswith((".", "/", "~")) or p.suffix:
        raise CurationError(f"{config_key}={name!r}: no such model folder; pass an existing local folder or a "
                            f"Hub id")
    from huggingface_hub import constants, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        path = snapshot_download(name, local_files_only=offline)
    except Exception as e:
        how = ("the Hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline
               else f"it could not be downloaded ({type(e).__name__})")
        raise CurationError(
            f"{config_key}={name!r} is a Hub model id, but {how}. Pass a local model folder instead, e.g. "
            f"{config_key}=/path/to/dinov2 (any AutoModel saved with save_pretrained), or {config_key}=null to "
            f"turn this embedding step off."
        ) from e
    return ModelRef(name=name, path=path, identity=f"hub:{name}@{Path(path).name}")


class Embedder:
    """AutoModel + AutoImageProcessor -> L2-normalised float32 vectors (CLS / pooler, or mean of patches).

    A folder exported by `method: copy_detection` also carries its descriptor head (`copy_descriptor.json` +
    `.safetensors`, `modeling.copy_detection`): then the vectors are that descriptor (GeM or CLS pooling +
    projection) and `pooling` is ignored."""

    def __init__(self, ref: ModelRef, pooling: str = "cls", device: str = "cpu", compute_dtype: str = "float32"):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.torch = torch
        self.device = device
        self.dtype = getattr(torch, compute_dtype)
        self.pooling = pooling
        self.model = AutoModel.from_pretrained(ref.path).to(device=device, dtype=self.dtype).eval()
        try:
            self.processor = AutoImageProcessor.from_pretrained(ref.path)
        except (OSError, ValueError):  # no preprocessor_config.json: DINOv2-style default below
            self.processor = None
        from modeling.copy_detection import load_copy_descriptor

        self.descriptor = load_copy_descriptor(ref.path)
        if self.descriptor is not None:
            self.descriptor = self.descriptor.to(device=device)
            self.dim = self.descriptor.dim
        else:
            self.dim = int(getattr(self.model.config, "hidden_size", 0) or self.model.config.projection_dim)

    def _pixels(self, images: list) -> Any:
        torch = self.torch
        if self.processor is not None:
            return self.processor(images=images, return_tensors="pt")["pixel_values"]
        size = int(getattr(self.model.config, "image_size", 224))
        mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
        std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
        arrs = [(np.asarray(im.resize((size, size), resample=3), dtype=np.float32) / 255.0 - mean) / std
                for im in images]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)

    def __call__(self, images: list) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            pixels = self._pixels(images).to(self.device, self.dtype)
            out = self.model(pixel_values=pixels)
            if self.descriptor is not None:
                feats = self.descriptor(out, normalize=False)
            elif self.pooling == "mean" and getattr(out, "last_hidden_state", None) is not None:
                feats = out.last_hidden_state[:, 1:].mean(dim=1)
            elif getattr(out, "pooler_output", None) is not None:
                feats = out.pooler_output
            elif getattr(out, "image_embeds", None) is not None:
                feats = out.image_embeds
            else:
                feats = out.last_hidden_state[:, 0]
            feats = torch.nn.functional.normalize(feats.float(), dim=-1)
        return feats.cpu().numpy()


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class EmbeddingStore:
    """Read-only view of N L2-normalised vectors kept in memory-mapped chunks (or in a numpy array).

    `rows` (optional) restricts the view to a subset of the underlying rows, in the given order.
    """

    def __init__(self, chunks: list[np.ndarray], rows: np.ndarray | None = None):
        self._chunks = chunks
        self._offsets = np.cumsum([0] + [len(c) for c in chunks])
        self.dim = int(chunks[0].shape[1]) if chunks else 0
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._keep = []  # keep the memory-mapped datasets alive

    @classmethod
    def from_array(cls, array: np.ndarray) -> EmbeddingStore:
        return cls([np.asarray(array)])

    @classmethod
    def from_files(cls, paths: list[Path]) -> EmbeddingStore:
        chunks, keep = [], []
        for p in paths:
            ds = datasets.Dataset.from_file(str(p))
            col = ds.data.table.column("embedding")
            dim = col.type.list_size
            parts = [c.flatten().to_numpy(zero_copy_only=True).reshape(-1, dim) for c in col.chunks]
            chunks.extend(parts)
            keep.append(ds)
        store = cls(chunks)
        store._keep = keep
        return store

    @property
    def n(self) -> int:
        return int(self._offsets[-1]) if self._rows is None else len(self._rows)

    def _take_base(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        which = np.searchsorted(self._offsets, idx, side="right") - 1
        for c in np.unique(which):
            sel = which == c
            out[sel] = self._chunks[c][idx[sel] - self._offsets[c]]
        return out

    def take(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        base = idx if self._rows is None else self._rows[idx]
        return normalize_rows(self._take_base(base))

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.n, rows):
            stop = min(start + rows, self.n)
            if self._rows is None and len(self._chunks) == 1:
                yield start, normalize_rows(self._chunks[0][start:stop])
            else:
                yield start, self.take(np.arange(start, stop))

    def subset(self, rows: np.ndarray) -> EmbeddingStore:
        rows = np.asarray(rows, dtype=np.int64)
        view = EmbeddingStore(self._chunks, rows if self._rows is None else self._rows[rows])
        view._keep = self._keep
        return view

    def to_array(self) -> np.ndarray:
        return self.take(np.arange(self.n))


@dataclass
class EmbedSpec:
    """What to embed with: a model, or a precomputed column of the dataset."""

    model: ModelRef | None = None
    column: str | None = None
    pooling: str = "cls"
    batch_size: int = 64
    dtype: str = "float16"
    compute_dtype: str = "float32"
    chunk_rows: int = 65_536
    device: str | None = None

    def identity(self) -> list[Any]:
        if self.column is not None:
            return ["column", self.column, self.dtype]
        assert self.model is not None
        return ["model", self.model.identity, self.pooling, self.dtype]


def _embed_batch(batch: dict[str, list], embedder: Embedder, dtype: str) -> dict[str, Any]:
    # The project's one decoder, as in training and the probe. Rows already passed validation under
    # validate.max_pixels, so no second pixel limit here.
    return {"embedding": embedder([decode_image(b, max_pixels=None) for b in batch["image"]]).astype(dtype)}


def _column_batch(batch: dict[str, list], column: str, dtype: str) -> dict[str, Any]:
    arr = np.asarray(batch[column], dtype=np.float32)
    if arr.ndim != 2:
        raise CurationError(f"embedding column {column!r} must hold equal-length vectors")
    return {"embedding": normalize_rows(arr).astype(dtype)}


def embed_dataset(ds: datasets.Dataset, ds_key: str, spec: EmbedSpec, cache_dir: Path, dist: DistState,
                  name: str) -> tuple[EmbeddingStore, bool]:
    """Embed every row of `ds` (its `image` bytes, or `spec.column`) into the chunked on-disk store.

    Returns (store, cached) where cached means every chunk existed before this call."""
    store_key = fingerprint("embed", ds_key, spec.identity(), spec.chunk_rows)
    folder = cache_dir / "embeddings" / f"{name}-{store_key}"
    folder.mkdir(parents=True, exist_ok=True)
    n = len(ds)
    starts = list(range(0, n, spec.chunk_rows))
    paths = [folder / f"chunk-{s:012d}.arrow" for s in starts]
    if spec.column is not None and spec.column not in ds.column_names:
        raise CurationError(f"embedding column {spec.column!r} not in dataset columns {ds.column_names}")
    embedder = None
    cached = all(p.is_file() for p in paths)
    mine = []
    for i, (start, path) in enumerate(zip(starts, paths)):
        if i % dist.world_size != dist.rank or path.is_file():
            continue
        mine.append(i)
        stop = min(start + spec.chunk_rows, n)
        part = ds.select(range(start, stop))
        if spec.column is not None:
            dim = len(part[0][spec.column])
            fn, kwargs, cols = _column_batch, {"column": spec.column, "dtype": spec.dtype}, [spec.column]
        else:
            if embedder is None:
                embedder = Embedder(spec.model, spec.pooling, spec.device or dist.device, spec.compute_dtype)
            dim = embedder.dim
            fn, kwargs, cols = _embed_batch, {"embedder": embedder, "dtype": spec.dtype}, ["image"]
        features = datasets.Features({"embedding": datasets.List(datasets.Value(spec.dtype), length=dim)})
        part.select_columns(cols).map(
            fn, fn_kwargs=kwargs, batched=True, batch_size=spec.batch_size, remove_columns=cols,
            features=features, cache_file_name=str(path), load_from_cache_file=True,
            new_fingerprint=fingerprint(store_key, start, stop), desc=f"embed {name} [{start}:{stop}]",
        )
        kill_point(f"embed:{name}:{i}")
    if dist.world_size > 1:
        print(f"[curate] rank {dist.rank}/{dist.world_size} embedded {name} chunks {mine} of {len(paths)}",
              file=sys.stderr, flush=True)
    dist.barrier()
    store = EmbeddingStore.from_files(paths) if n else EmbeddingStore([np.zeros((0, 1), np.float32)])
    return store, cached
