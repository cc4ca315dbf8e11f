"""On-disk cache of extracted features, keyed by content fingerprints, with a size limit (LRU eviction).

A key hashes the model's weights and config, the dataset's fingerprint and columns, the preprocessing and the
compute dtype, so a stale entry is never reused, whatever folder or Hub id the model came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .common import EvaluationError, unwrap
from .features import FeatureSet

logger = logging.getLogger(__name__)

# Bump when the extracted features change meaning (invalidates every cache entry).
# 2: images decoded by `training.data.decode_image`.
FEATURE_CACHE_VERSION = "2"
DEFAULT_CACHE_MAX_BYTES = 2 << 30  # 2 GiB; the probe's --cache_max_gb


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model: class, config (minus paths/versions) and every parameter and buffer byte.

    Any change of weights or architecture gives a new fingerprint, whatever the folder or Hub id it came from.
    """
    h = hashlib.blake2b(digest_size=20)
    base = unwrap(model)
    h.update(type(base).__qualname__.encode())
    config = getattr(base, "config", None)
    if config is not None:
        cfg = {
            k: v for k, v in config.to_dict().items()
            if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype", "architectures")
        }
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(base.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """Identity of a `datasets.Dataset` (its `_fingerprint`, which tracks its files and transforms) and length."""
    fp = getattr(dataset, "_fingerprint", None)
    if fp is None:
        raise EvaluationError("only map-style `datasets.Dataset` objects can be cached (no fingerprint)")
    return f"{fp}:{len(dataset)}"


def feature_cache_key(
    model: torch.nn.Module | str,
    dataset: Any,
    *,
    image_processor: Any,
    image_column: str,
    label_column: str,
    dtype: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """Cache key = hash(model content, dataset fingerprint + columns, preprocessing config, compute dtype).

    `model` may be a model (content-hashed with `model_fingerprint`) or a precomputed fingerprint string.
    """
    processor_cfg = image_processor.to_dict() if hasattr(image_processor, "to_dict") else repr(image_processor)
    payload = {
        "version": FEATURE_CACHE_VERSION,
        "model": model if isinstance(model, str) else model_fingerprint(model),
        "dataset": dataset_fingerprint(dataset),
        "columns": [image_column, label_column],
        "processor": processor_cfg,
        "dtype": dtype,
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """Features stored as `<dir>/features-<key>.safetensors` (tensors `cls`, `patch_mean`, `labels`).

    Written to a temporary file and renamed, so an interrupted run never leaves a truncated entry. A stale
    entry is never reused: the key changes with the model's weights, the dataset and the preprocessing.

    `max_bytes` bounds the total size of the entries (None: no bound). After each save the least recently used
    entries are deleted until the rest fits; the entry just written is always kept. Use is recorded in the file's
    modification time (a hit touches it), which works on file systems mounted `noatime`.
    """

    def __init__(self, directory: str | os.PathLike, max_bytes: int | None = DEFAULT_CACHE_MAX_BYTES):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None (no limit), got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path:
        return self.directory / f"features-{key[:40]}.safetensors"

    def entries(self) -> list[Path]:
        """Cache files, least recently used first."""
        found = []
        for p in self.directory.glob("features-*.safetensors"):
            try:
                found.append((p.stat().st_mtime_ns, p.name, p))
            except FileNotFoundError:  # evicted by another process meanwhile
                continue
        return [p for *_, p in sorted(found)]

    def size_bytes(self) -> int:
        return sum(_size(p) for p in self.entries())

    def load(self, key: str) -> FeatureSet | None:
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                features = FeatureSet(cls=f.get_tensor("cls"), patch_mean=f.get_tensor("patch_mean"),
                                      labels=f.get_tensor("labels"))
        except Exception as e:  # a damaged cache entry is recomputed, not fatal
            logger.warning("ignoring unreadable feature cache %s: %s", path, e)
            return None
        _touch(path)
        return features

    def save(self, key: str, features: FeatureSet, metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        meta = {"key": key, "num_rows": str(len(features)), **{k: str(v) for k, v in (metadata or {}).items()}}
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"cls": features.cls.contiguous(), "patch_mean": features.patch_mean.contiguous(),
                       "labels": features.labels.contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least recently used entries (never `keep`) until the cache fits `max_bytes`; returns them."""
        if self.max_bytes is None:
            return []
        entries = self.entries()
        total = sum(_size(p) for p in entries)
        removed = []
        for p in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and p == keep:
                continue
            total -= _size(p)
            p.unlink(missing_ok=True)
            removed.append(p)
        if removed:
            logger.info("feature cache %s: evicted %d least recently used entries to stay under %.2f GB",
                        self.directory, len(removed), self.max_bytes / 1e9)
        if total > self.max_bytes:
            logger.warning("feature cache %s holds %.2f GB, over its %.2f GB limit, because the newest entry alone is "
                           "that large; raise the limit (probe.py --cache_max_gb) to keep more than one entry",
                           self.directory, total / 1e9, self.max_bytes / 1e9)
        return removed

    def clear(self) -> int:
        """Delete every cache entry (and leftover temporary files); returns how many entries were deleted.

        Only the cache's own files are removed, never the directory's other contents.
        """
        if not self.directory.is_dir():
            return 0
        entries = self.entries()
        for p in [*entries, *self.directory.glob("tmp*.tmp")]:
            p.unlink(missing_ok=True)
        return len(entries)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves hits; it just cannot record their recency
        pass


def default_cache_dir() -> Path:
    """`$DINOFORGE_CACHE/probe_features`, else `$XDG_CACHE_HOME/dinoforge/probe_features` (~/.cache by default)."""
    root = os.environ.get("DINOFORGE_CACHE")
    if root:
        return Path(root) / "probe_features"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinoforge" / "probe_features"
