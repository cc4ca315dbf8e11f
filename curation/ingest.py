"""Ingest: turn any configured image source into one on-disk Arrow table `id, source, path, image(bytes)`.

Sources: a local image folder (recursive), a `save_to_disk` folder, parquet / webdataset (.tar) / arrow shards
(a file, a folder of shards or a glob), image files (a file or a glob), or a Hub dataset id, optionally streamed.
What a source is, and how one split of it is opened, is decided by the project's one resolver
(`training.data.sources`), so training, the probe and curation read a source the same way. An image folder is
ingested whole: every non-hidden file (images or not, every split folder), so validation can see and report each
one. Images are kept as raw file bytes (never decoded here).

Row identity (DESIGN.md): `id = <source name>/<path inside the source>` for folders and webdataset keys,
`<source name>/<row index, zero-padded>` for Hub / parquet / arrow sources; never a content hash (exact copies
share one). Zero padding makes string order equal row order, which the "lowest id" keep rule relies on.

Every source is written once to `cache/ingest/<name>-<key>.arrow` (temporary file renamed when complete), where
the key covers the file list (paths, sizes, mtimes) or the loaded dataset's fingerprint: re-runs reuse it.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from datasets.arrow_writer import ArrowWriter

from training.data.sources import Source, open_source, resolve_source

from .common import CurationError, fingerprint
from .config import SourceConfig

INGEST_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "path": datasets.Value("string"),
        "image": datasets.Value("large_binary"),
    }
)
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
WRITER_BATCH = 256  # rows per Arrow record batch: bounded memory even with large images


def check_sources(sources: list[SourceConfig], role: str) -> None:
    """Fail early, naming the source and the fix."""
    names = set()
    for i, src in enumerate(sources):
        where = f"{role}[{i}]"
        if not src.name or not NAME_RE.match(src.name):
            raise CurationError(f"{where}: give each source a `name` made of letters, digits, '_', '.', '-' "
                                f"(got {src.name!r}); it prefixes every row id")
        if src.name in names:
            raise CurationError(f"{where}: source name {src.name!r} is used twice; row ids must be unique")
        names.add(src.name)
        if (src.path is None) == (src.dataset is None):
            raise CurationError(f"{where} ({src.name}): set exactly one of `path` (local folder/files) or "
                                f"`dataset` (Hub id)")
        if src.path is not None and not glob.glob(os.path.expanduser(src.path)):
            raise CurationError(f"{where} ({src.name}): path {src.path!r} does not exist; pass an image folder, "
                                f"a save_to_disk folder, parquet/tar shards or a glob")


def _file_key(files: list[Path]) -> list[Any]:
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _rows_from_folder(src: SourceConfig, root: Path, files: list[Path]) -> Iterator[dict[str, Any]]:
    for f in files:
        rel = f.relative_to(root).as_posix()
        try:
            data = f.read_bytes()
        except OSError:  # unreadable file: validation records it as zero-byte/unreadable, never a crash here
            data = b""
        yield {"id": f"{src.name}/{rel}", "source": src.name, "path": rel, "image": data}


def _image_bytes(value: Any) -> tuple[bytes, str]:
    """(bytes, path) from an undecoded Image value, raw bytes, or a path."""
    if value is None:
        return b"", ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path") or ""
        if data is None and path and os.path.isfile(path):
            data = Path(path).read_bytes()
        return (bytes(data) if data is not None else b""), path
    if isinstance(value, str) and os.path.isfile(value):
        return Path(value).read_bytes(), value
    raise CurationError(f"image column holds {type(value).__name__}; expected an Image feature, bytes or a path")


def _prepare_loaded(ds: Any, src: SourceConfig, extra_columns: list[str]) -> Any:
    """Check the image (and precomputed embedding) columns and switch the image to undecoded bytes."""
    features = ds.features
    if features is not None and src.image_column not in features:
        raise CurationError(f"source {src.name!r}: no image column {src.image_column!r}; columns are "
                            f"{list(features)} — set image_column")
    missing = [c for c in extra_columns if features is not None and c not in features]
    if missing:
        raise CurationError(f"source {src.name!r}: embedding column(s) {missing} not found; columns are "
                            f"{list(features)}. Every source needs the configured embedding_column")
    if features is not None and isinstance(features[src.image_column], datasets.Image):
        ds = ds.cast_column(src.image_column, datasets.Image(decode=False))
    keep = [src.image_column] + list(extra_columns)
    keep += ["__key__"] if features is not None and "__key__" in features else []
    if features is not None:
        ds = ds.select_columns(keep)
    return ds


def _rows_from_loaded(src: SourceConfig, ds: Any, extra_columns: list[str]) -> Iterator[dict[str, Any]]:
    width = 9
    for index, row in enumerate(ds):
        extra = {c: row[c] for c in extra_columns}
        data, path = _image_bytes(row[src.image_column])
        key = row.get("__key__")
        if key:
            rel = str(key)
        else:
            rel = f"{index:0{width}d}"
        yield {"id": f"{src.name}/{rel}", "source": src.name, "path": path or rel, "image": data, **extra}


def _resolve(src: SourceConfig) -> Source:
    """The shared resolver's view of a source; its errors (which name the fix) prefixed with the source name."""
    try:
        source = resolve_source(src.path if src.path is not None else src.dataset)
    except ValueError as e:
        raise CurationError(f"source {src.name!r}: {e}") from e
    if src.path is not None and source.kind == "hub":
        raise CurationError(f"source {src.name!r}: path {src.path!r} does not exist; pass an image folder, a "
                            f"save_to_disk folder, parquet/tar shards or a glob (or `dataset` for a Hub id)")
    return source


def _open(src: SourceConfig, source: Source) -> tuple[Any, list[Any]]:
    """Open split `src.split` of a saved / shard / Hub source lazily; return (dataset, cache key parts)."""
    kwargs: dict[str, Any] = {}
    if source.kind == "hub":
        kwargs = {"name": src.config_name, "revision": src.revision}
    # A saved dataset is memory-mapped: open it map-style (its fingerprint keys the cache), stream it afterwards.
    streaming = src.streaming and source.kind != "saved"
    try:
        ds = open_source(source, src.split, streaming=streaming, **kwargs)
    except ValueError as e:
        raise CurationError(f"source {src.name!r}: {e}") from e
    if source.kind == "hub":
        key = ["hub", src.dataset, src.config_name, src.split, src.revision]
        if not src.streaming:
            key.append(ds._fingerprint)
    elif source.kind == "saved":
        key = ["disk", str(source.path), ds._fingerprint]
        if src.streaming:
            ds = ds.to_iterable_dataset()
    else:
        assert source.local is not None
        key = ["files", source.builder, src.split, _file_key(source.local.shard_files)]
    return ds, key


def ingest_source(src: SourceConfig, cache_dir: Path, extra_columns: list[str] | None = None) -> datasets.Dataset:
    """Write (or reuse) the unified Arrow table of one source and memory-map it.

    `extra_columns`: precomputed embedding columns to carry along (float32 vectors)."""
    extra_columns = sorted(set(extra_columns or []))
    features = datasets.Features({**INGEST_FEATURES, **{c: datasets.List(datasets.Value("float32"))
                                                        for c in extra_columns}})
    source = _resolve(src)
    if source.kind == "images":  # every file (not only images), raw bytes: validation reports the bad ones
        assert source.local is not None
        root = source.local.root
        files = sorted(source.local.files)  # Path order, as ids have always been assigned
        if extra_columns:
            raise CurationError(f"source {src.name!r} is an image folder, which has no embedding column "
                                f"{extra_columns}; use a parquet / save_to_disk / Hub source, or set "
                                f"embedding_column=null and a model")
        if not files:
            raise CurationError(f"source {src.name!r}: folder {src.path!r} holds no files")
        key = fingerprint("ingest", src.name, "folder", _file_key(files))
        rows: Any = lambda: _rows_from_folder(src, root, files)  # noqa: E731
    else:
        ds, key_parts = _open(src, source)
        key = fingerprint("ingest", src.name, src.image_column, key_parts, extra_columns)
        ds = _prepare_loaded(ds, src, extra_columns)
        rows = lambda: _rows_from_loaded(src, ds, extra_columns)  # noqa: E731
    out = cache_dir / "ingest" / f"{src.name}-{key}.arrow"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        with ArrowWriter(features=features, path=str(tmp), writer_batch_size=WRITER_BATCH) as writer:
            for row in rows():
                writer.write(row)
            writer.finalize()
        os.replace(tmp, out)
    ds_out = datasets.Dataset.from_file(str(out))
    ds_out._fingerprint = key  # our own chain of keys drives every later cache (see pipeline.py)
    return ds_out


def ingest_all(sources: list[SourceConfig], cache_dir: Path, role: str,
               extra_columns: list[str] | None = None) -> datasets.Dataset | None:
    """Ingest and concatenate a list of sources (None when the list is empty)."""
    if not sources:
        return None
    check_sources(sources, role)
    parts = [ingest_source(src, cache_dir, extra_columns) for src in sources]
    if len(parts) == 1:
        return parts[0]
    ds = datasets.concatenate_datasets(parts)
    ds._fingerprint = fingerprint("concat", [p._fingerprint for p in parts])
    return ds
