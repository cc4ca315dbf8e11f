"""Ingest: turn any configured image source into one on-disk Arrow table `id, source, path, image(bytes), error`.

Sources: a local image folder (recursive), a `save_to_disk` folder, parquet / webdataset (.tar) / arrow shards
(a file, a folder of shards or a glob), image files (a file or a glob), or a Hub dataset id, optionally streamed.
What a source is, and how one split of it is opened, is decided by the project's one resolver
(`training.data.sources`), so training, the probe and curation read a source the same way. An image folder is
ingested whole: every non-hidden entry (images or not, every split folder), so validation can see and report each
one. Images are kept as raw file bytes (never decoded here).

Every entry is accounted for. An entry that cannot be read becomes a row with an empty image and its reason in
`error` (`broken_symlink`, `symlink_loop`, `not_a_file`, `special_file`, `unreadable`, `vanished`, `changed`,
`path_only`: see `training.data.files`); validation turns `error` into the row's removal reason, so it lands in the
manifest, and the run goes on. Symbolic links are followed, also out of the folder (the user pointed at the folder,
links included), never round a loop; FIFOs and devices are never opened. Hidden entries (`.DS_Store`, `.git/`)
are skipped and counted in the stats. A file that differs from the listing when it is read (size / mtime) is
`changed`, so the cache key (made from the listing) never describes other bytes than the ones ingested.

Rows of loaded sources (parquet, `save_to_disk`, Hub) whose image is only a path are *not* read — a crafted
dataset could otherwise pull any local file into a curated set that is then pushed — unless the source says
`allow_local_paths: true`; URLs are never fetched. Such rows are removed with reason `path_only`; a source in which
every row is like that is an error that says what to set.

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

from training.data.files import FileFault, PathPolicy, is_url, read_file
from training.data.sources import LocalFiles, Source, open_source, resolve_source

from .common import CurationError, fingerprint, read_json, write_json
from .config import SourceConfig

INGEST_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "source": datasets.Value("string"),
        "path": datasets.Value("string"),
        "image": datasets.Value("large_binary"),
        "error": datasets.Value("string"),  # "" or "<reason>: <detail>" for an entry that could not be read
    }
)
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
WRITER_BATCH = 256  # rows per Arrow record batch: bounded memory even with large images
_SHOW_HIDDEN = 20  # hidden entries named in the stats


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


def _file_key(local: LocalFiles) -> list[Any]:
    # From the listing (never a second stat that could fail on a broken link); faults included.
    return [[(str(f), *st) for f, st in zip(local.files, local.stats)],
            [(str(f.path), f.reason) for f in local.faults]]


def _rows_from_folder(src: SourceConfig, local: LocalFiles) -> Iterator[dict[str, Any]]:
    """One row per listed entry, in path order: a file's bytes, or the reason it could not be read."""
    entries: list[tuple[Path, Any]] = [*zip(local.files, local.stats), *((f.path, f) for f in local.faults)]
    entries.sort(key=lambda e: e[0])  # Path order, as ids have always been assigned
    for path, what in entries:
        rel = path.relative_to(local.root).as_posix()
        data, error = b"", ""
        if isinstance(what, tuple):
            try:
                data = read_file(path, what)
            except FileFault as err:  # vanished, changed, unreadable since the listing: a row with its reason
                error = f"{err.reason}: {err.detail}"
        else:
            error = f"{what.reason}: {what.detail}"
        yield {"id": f"{src.name}/{rel}", "source": src.name, "path": rel, "image": data, "error": error}


def _image_bytes(value: Any, policy: PathPolicy) -> tuple[bytes, str, str]:
    """(bytes, path, error) from an undecoded Image value, raw bytes, or a path; a value that is only a path is
    read only where `policy` allows (never a URL)."""
    if value is None:
        return b"", "", ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), "", ""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path") or ""
        if data is not None:
            return bytes(data), path, ""
        if not path:
            return b"", "", ""
    elif isinstance(value, str):
        path = value
    else:
        raise CurationError(f"image column holds {type(value).__name__}; expected an Image feature, bytes or a path")
    if is_url(path):
        return b"", path, "path_only: the image is only a URL, which is never fetched"
    if not policy.allows(path):
        return b"", path, ("path_only: the image is only a local path, not read (set allow_local_paths: true on "
                           "the source if the dataset's paths are trusted)")
    try:
        return read_file(path), path, ""
    except FileFault as err:
        return b"", path, f"{err.reason}: {err.detail}"


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
    policy = PathPolicy(any_local=src.allow_local_paths)
    for index, row in enumerate(ds):
        extra = {c: row[c] for c in extra_columns}
        data, path, error = _image_bytes(row[src.image_column], policy)
        key = row.get("__key__")
        if key:
            rel = str(key)
        else:
            rel = f"{index:0{width}d}"
        yield {"id": f"{src.name}/{rel}", "source": src.name, "path": path or rel, "image": data, "error": error,
               **extra}


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
        shards = set(source.local.shard_files)
        key = ["files", source.builder, src.split,
               [(str(f), *st) for f, st in zip(source.local.files, source.local.stats) if f in shards]]
    return ds, key


def _hidden_info(local: LocalFiles | None) -> dict[str, Any]:
    hidden = list(local.hidden) if local is not None else []
    return {"hidden_skipped": len(hidden),
            "hidden": [p.relative_to(local.root).as_posix() for p in hidden[:_SHOW_HIDDEN]] if local else []}


def ingest_source(src: SourceConfig, cache_dir: Path, extra_columns: list[str] | None = None,
                  info: dict[str, Any] | None = None) -> datasets.Dataset:
    """Write (or reuse) the unified Arrow table of one source and memory-map it.

    `extra_columns`: precomputed embedding columns to carry along (float32 vectors). `info`, when given, is filled
    with what the listing / reading found: `entries_listed` (rows), `errors` (reason -> count of entries that
    could not be read), `hidden_skipped` (+ the first few `hidden` names)."""
    extra_columns = sorted(set(extra_columns or []))
    features = datasets.Features({**INGEST_FEATURES, **{c: datasets.List(datasets.Value("float32"))
                                                        for c in extra_columns}})
    source = _resolve(src)
    if source.kind == "images":  # every entry (not only images), raw bytes: validation reports the bad ones
        local = source.local
        assert local is not None
        if extra_columns:
            raise CurationError(f"source {src.name!r} is an image folder, which has no embedding column "
                                f"{extra_columns}; use a parquet / save_to_disk / Hub source, or set "
                                f"embedding_column=null and a model")
        unlisted = [f for f in local.faults if f.path == local.root]
        if unlisted:
            raise CurationError(f"source {src.name!r}: cannot read folder {src.path!r}: {unlisted[0].detail}")
        if not local.files and not local.faults:
            raise CurationError(f"source {src.name!r}: folder {src.path!r} holds no files")
        key = fingerprint("ingest", src.name, "folder", _file_key(local))
        rows: Any = lambda: _rows_from_folder(src, local)  # noqa: E731
    else:
        ds, key_parts = _open(src, source)
        key = fingerprint("ingest", src.name, src.image_column, key_parts, extra_columns, src.allow_local_paths)
        ds = _prepare_loaded(ds, src, extra_columns)
        rows = lambda: _rows_from_loaded(src, ds, extra_columns)  # noqa: E731
    out = cache_dir / "ingest" / f"{src.name}-{key}.arrow"
    sidecar = out.with_suffix(".json")
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        errors: dict[str, int] = {}
        n = 0
        with ArrowWriter(features=features, path=str(tmp), writer_batch_size=WRITER_BATCH) as writer:
            for row in rows():
                n += 1
                if row["error"]:
                    reason = row["error"].split(":", 1)[0]
                    errors[reason] = errors.get(reason, 0) + 1
                writer.write(row)
            writer.finalize()
        if n and errors.get("path_only") == n:
            tmp.unlink(missing_ok=True)
            raise CurationError(
                f"source {src.name!r}: every row's image is only a path or URL, no image bytes; such paths are not "
                "read (a dataset could name any local file). If the dataset's paths are trusted, set "
                "allow_local_paths: true on the source (URLs are never fetched: store the image bytes, or download "
                "the files into a folder and point `path` at it)")
        write_json(sidecar, {"entries_listed": n, "errors": errors, **_hidden_info(source.local)})
        os.replace(tmp, out)
    if info is not None:
        info.update(read_json(sidecar))
    ds_out = datasets.Dataset.from_file(str(out))
    ds_out._fingerprint = key  # our own chain of keys drives every later cache (see pipeline.py)
    return ds_out


def ingest_all(sources: list[SourceConfig], cache_dir: Path, role: str, extra_columns: list[str] | None = None,
               infos: dict[str, dict[str, Any]] | None = None) -> datasets.Dataset | None:
    """Ingest and concatenate a list of sources (None when the list is empty); `infos` gets each source's
    ingest info (see `ingest_source`) under its name."""
    if not sources:
        return None
    check_sources(sources, role)
    parts = []
    for src in sources:
        info: dict[str, Any] = {}
        parts.append(ingest_source(src, cache_dir, extra_columns, info))
        if infos is not None:
            infos[src.name] = info
    if len(parts) == 1:
        return parts[0]
    ds = datasets.concatenate_datasets(parts)
    ds._fingerprint = fingerprint("concat", [p._fingerprint for p in parts])
    return ds
