"""The one resolver for image data sources, used by training, the probe and curation.

A source is a Hub id, a local image folder, a ``save_to_disk`` folder (``Dataset`` or ``DatasetDict``), a parquet /
webdataset ``.tar`` / arrow file, a folder of those, a glob, or ``"sample"`` (the bundled sample set). Two steps:

* :func:`resolve_source` says what a source is without loading anything (:class:`Source`), and for local files
  lists them (:class:`LocalFiles`: every non-hidden entry, so curation can account for every one, not just images:
  regular files, and the entries that are not — broken or looping symbolic links, folders named like files, FIFOs,
  devices, unreadable ones — with a reason code, see :mod:`training.data.files`). Symbolic links are followed,
  also out of the folder (the user pointed at the folder, links included), but never round a loop;
* :func:`open_source` loads one split of it as a ``datasets.Dataset`` / ``IterableDataset``.

:func:`load_image_dataset` (training and the probe) does both and checks the image column.

Splits of local folders. ``datasets``' own folder loaders infer splits from *file names* containing split words
(``train``, ``test``, ``valid``, ``dev``, ...), so a plain folder holding ``reference_valid.png`` fails ("Unknown
split") or silently loads a subset. Here the files are listed explicitly (``data_files={split: [...]}``) and splits
come only from

* split sub-folders directly under the root (``train/``, ``validation/`` | ``valid/`` | ``val/`` | ``dev/``,
  ``test/`` | ``eval/`` ..., named as ``datasets`` names them), or
* for data shards, the Hub's shard names ``data/<split>-NNNNN-of-NNNNN.<ext>`` (what ``push_to_hub`` writes);

otherwise the whole folder is the one split asked for. Class sub-folders still give a ``label`` ClassLabel column
exactly as imagefolder infers it (the files of every split are passed, so all splits share the label names).

Entries that cannot be files (broken links, FIFOs, ...) are not handed to ``datasets`` (which would stop on them);
opening such a folder logs a warning with their count and reasons. Resolving a local image source registers it as
trusted (:func:`training.data.files.trust_local_source`): its rows hold only paths, and those paths may be opened.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
from datasets.distributed import split_dataset_by_node

from .files import Fault, os_fault, trust_hub_dataset, trust_local_source, walk

__all__ = [
    "IMAGE_SUFFIXES",
    "METADATA_FILENAMES",
    "SHARD_BUILDERS",
    "LocalFiles",
    "Source",
    "column_names",
    "list_files",
    "load_image_dataset",
    "open_source",
    "resolve_source",
]

logger = logging.getLogger(__name__)

# File suffix -> `datasets` packaged builder.
SHARD_BUILDERS = {".parquet": "parquet", ".tar": "webdataset", ".arrow": "arrow"}
# Image files of a folder (compared lower-case, so .JPG counts). Other files are listed but not loaded as images.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".gif", ".tif", ".tiff",
     ".pbm", ".pgm", ".ppm", ".pnm", ".tga"}
)
# imagefolder reads these as per-file metadata columns (they replace the folder labels); never data shards.
METADATA_FILENAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
# Split folder name -> split name, as `datasets` maps them.
SPLIT_FOLDERS = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test", "eval": "test", "evaluation": "test",
}
_HUB_SHARD = re.compile(r"^(?P<split>\w+?)-\d{5}-of-\d{5}\.")
_SOURCES_HELP = (
    "Pass a local imagefolder or save_to_disk directory, a parquet or webdataset .tar file, directory or glob, "
    "a Hugging Face Hub dataset id, or 'sample' for the bundled sample images."
)
# Streams made from a save_to_disk dataset get this many shards (divisible by common world sizes, so
# split_dataset_by_node can hand whole shards to each process and DataLoader workers).
_STREAM_SHARDS = 64
_SHOW_FILES = 5  # ignored files named in a log line
_SHOW_FAULTS = 20  # unreadable entries named in a log line

SourceKind = Literal["hub", "saved", "images", "shards"]


def list_files(root: Path) -> list[Path]:
    """Every non-hidden regular file under ``root`` (recursive; symbolic links followed, loops not), sorted by path
    string. :func:`training.data.files.walk` also returns the entries that are not files."""
    return walk(root).files


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _shard_builder(path: Path) -> str | None:
    return None if path.name in METADATA_FILENAMES else SHARD_BUILDERS.get(path.suffix.lower())


def _show(paths: Sequence[Path], root: Path) -> str:
    names = [p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in paths[:_SHOW_FILES]]
    return ", ".join(names) + (", ..." if len(paths) > _SHOW_FILES else "")


@dataclass(frozen=True)
class LocalFiles:
    """The entries behind a local source: a folder (every non-hidden entry under it), a glob's matches, or one file.

    ``root`` is the folder the files are relative to (the glob's fixed prefix, a file's parent). ``files`` are
    regular files (symbolic links to them included), ``stats`` their (size, mtime in ns) as listed; ``faults`` the
    entries that are not readable files, with their reason; ``hidden`` the hidden entries skipped (not walked).
    """

    root: Path
    files: tuple[Path, ...]
    is_folder: bool = True
    stats: tuple[tuple[int, int], ...] = ()
    faults: tuple[Fault, ...] = ()
    hidden: tuple[Path, ...] = ()

    @property
    def image_files(self) -> list[Path]:
        return [f for f in self.files if _is_image(f)]

    @property
    def shard_files(self) -> list[Path]:
        return [f for f in self.files if _shard_builder(f)]

    def split_folder(self, path: Path) -> str | None:
        """The split a file belongs to by its first folder under the root (``None`` outside split folders)."""
        if not self.is_folder:
            return None
        parts = path.relative_to(self.root).parts
        return SPLIT_FOLDERS.get(parts[0].lower()) if len(parts) > 1 else None

    def split_folders(self) -> dict[str, list[str]]:
        """Split -> the split folder name(s) directly under the root that hold files."""
        found: dict[str, set[str]] = {}
        for f in self.files:
            split = self.split_folder(f)
            if split:
                found.setdefault(split, set()).add(f.relative_to(self.root).parts[0])
        return {split: sorted(names) for split, names in found.items()}


@dataclass(frozen=True)
class Source:
    """What a data source is, resolved without loading it.

    ``kind``: ``"hub"`` (``name`` is a Hub id), ``"saved"`` (``path`` is a ``save_to_disk`` folder), ``"images"``
    (image files: ``local`` lists them, with every other file of the folder) or ``"shards"`` (parquet / webdataset /
    arrow files of one kind: ``builder``). ``name`` is the source as the user gave it (used in messages).
    """

    name: str
    kind: SourceKind
    path: Path | None = None
    builder: str | None = None
    local: LocalFiles | None = field(default=None, repr=False)


def _is_saved_to_disk(path: Path) -> bool:
    # `Dataset.save_to_disk` writes state.json; `DatasetDict.save_to_disk` writes dataset_dict.json.
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _looks_local(name: str) -> bool:
    """True for strings that can only mean a local path (so a missing one is not worth a Hub request)."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or Path(name).suffix.lower() in SHARD_BUILDERS.keys() | IMAGE_SUFFIXES
    )


def _glob_root(pattern: str) -> Path:
    """The leading folders of a glob that contain no wildcard."""
    parts = Path(pattern).parts
    fixed = parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]
    return Path(*fixed) if fixed else Path(".")


def _files_source(name: str, files: list[Path], local: LocalFiles, pattern: str | None = None) -> Source:
    """A glob's matches (``pattern``) or one file: all images, or shards of one kind."""
    suffixes = {f.suffix.lower() for f in files}
    builders = {_shard_builder(f) or ("imagefolder" if _is_image(f) else None) for f in files}
    if None in builders or len(builders) != 1:
        raise ValueError(
            f"Dataset {name!r}: cannot read files with suffixes {sorted(suffixes)} together. Supported: one of "
            f"{sorted(SHARD_BUILDERS)} or image files. {_SOURCES_HELP}"
        )
    builder = builders.pop()
    if builder == "imagefolder" and pattern:  # what the glob matches, not the rest of the folder
        trust_local_source(pattern=pattern)
    elif builder == "imagefolder":
        trust_local_source(files=files)
    return Source(name, "images" if builder == "imagefolder" else "shards", local.root, builder, local)


_FILE_SUFFIXES = IMAGE_SUFFIXES | SHARD_BUILDERS.keys()


def _folder_source(name: str, path: Path) -> Source:
    listing = walk(path, _FILE_SUFFIXES)
    local = LocalFiles(path, tuple(listing.files), True, tuple(listing.stats), tuple(listing.faults),
                       tuple(listing.hidden))
    shards = local.shard_files
    if not shards:
        trust_local_source(folder=path)
        return Source(name, "images", path, "imagefolder", local)
    kinds = sorted({_shard_builder(f) for f in shards})
    if len(kinds) > 1:
        raise ValueError(
            f"Dataset {name!r}: the folder mixes data shard kinds {kinds}; point it at one kind (a sub-folder or "
            f"a glob such as '{path}/**/*.parquet'). {_SOURCES_HELP}"
        )
    return Source(name, "shards", path, kinds[0], local)


def _glob_source(name: str, pattern: str) -> Source:
    """A glob's regular files; matches that are not files (broken links, FIFOs, folders named like files) are
    kept as faults, so they are reported rather than silently dropped."""
    root = _glob_root(pattern).absolute()
    files: list[tuple[Path, tuple[int, int]]] = []
    faults: list[Fault] = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match).absolute()
        try:
            st = os.stat(path)
        except OSError as err:  # broken link, loop, permission: with its reason
            fault = os_fault(path, err)
            faults.append(Fault(path, fault.reason, fault.detail))
            continue
        if stat.S_ISREG(st.st_mode):
            files.append((path, (st.st_size, st.st_mtime_ns)))
        elif not stat.S_ISDIR(st.st_mode):
            faults.append(Fault(path, "special_file", "not a regular file; never opened"))
        elif path.suffix.lower() in _FILE_SUFFIXES:
            faults.append(Fault(path, "not_a_file", "a folder named like a file"))
    files.sort(key=lambda item: str(item[0]))
    if not files:
        found = f" (only entries that are not files: {_show([f.path for f in faults], root)})" if faults else ""
        raise ValueError(f"Dataset {name!r}: the pattern matches no files{found}. {_SOURCES_HELP}")
    local = LocalFiles(root, tuple(f for f, _ in files), False,
                       tuple(s for _, s in files), tuple(faults))
    return _files_source(name, list(local.files), local, pattern)


def resolve_source(dataset: str | os.PathLike) -> Source:
    """Say what ``dataset`` is (see :class:`Source`) without loading it; ``"sample"`` is built on first use.

    Raises ``ValueError`` naming the problem and the fix for a missing local path, a glob that matches nothing,
    files of mixed kinds, or a folder mixing shard kinds. Anything not local is taken as a Hub id (checked when
    opened).
    """
    name = str(dataset)
    if name == "sample":
        from training.sample_data import build_sample_dataset

        return _folder_source(name, build_sample_dataset().absolute())
    if name == "objects":  # the content-labelled set (shapes on photos), see training.objects_data
        from training.objects_data import build_objects_dataset

        return _folder_source(name, build_objects_dataset().absolute())
    path = Path(name).expanduser()
    if path.is_dir():
        path = path.absolute()
        if _is_saved_to_disk(path):
            return Source(name, "saved", path)
        return _folder_source(name, path)
    if path.is_file():
        path = path.absolute()
        st = path.stat()
        return _files_source(name, [path], LocalFiles(path.parent, (path,), False, ((st.st_size, st.st_mtime_ns),)))
    if os.path.lexists(path) and not glob.has_magic(str(path)):  # a broken link, a FIFO, ...: say which
        try:
            os.stat(path)
            fault = None
        except OSError as err:
            fault = os_fault(path, err)
        what = f"{fault.reason}: {fault.detail}" if fault else "special_file: not a regular file or folder"
        raise ValueError(f"Dataset {name!r}: cannot be read ({what}). {_SOURCES_HELP}")
    if glob.has_magic(str(path)):
        return _glob_source(name, str(path))
    if _looks_local(name):
        raise ValueError(f"Dataset {name!r}: no such file or directory. {_SOURCES_HELP}")
    return Source(name, "hub")


# ---------------------------------------------------------------------------------------------------------------
# Opening a split


def _split_base(split: str) -> str:
    """``"train[:10%]"`` -> ``"train"`` (the slice is applied by ``datasets``)."""
    return re.split(r"[\[+]", split, maxsplit=1)[0]


def _unknown_split(name: str, split: str, available: Sequence[str]) -> ValueError:
    return ValueError(
        f"Dataset {name!r}: Unknown split {split!r}. Should be one of {sorted(available)}. "
        f"Pick an existing split with split=... (config: data.split=<name>)."
    )


def _as_data_file(path: Path) -> str:
    # `datasets` treats data_files entries as glob patterns: escape names holding wildcard characters.
    text = str(path)
    return glob.escape(text) if glob.has_magic(text) else text


def _split_groups(source: Source, files: list[Path], split: str, what: str) -> dict[str, list[Path]]:
    """Split -> files, by split folders (or Hub shard names); a folder without them is the one split asked for."""
    local = source.local
    assert local is not None
    duplicated = {s: names for s, names in local.split_folders().items() if len(names) > 1}
    if duplicated:
        split_name, names = next(iter(duplicated.items()))
        raise ValueError(
            f"Dataset {source.name!r}: folders {names} all mean the split {split_name!r}; rename or move all but "
            "one of them"
        )
    groups: dict[str, list[Path]] = {}
    outside: list[Path] = []
    for f in files:
        split_name = local.split_folder(f)
        if split_name is None and source.kind == "shards" and local.is_folder:
            rel = f.relative_to(local.root).parts
            match = _HUB_SHARD.match(rel[-1]) if len(rel) == 2 and rel[0] == "data" else None
            split_name = match["split"] if match else None
        if split_name is None:
            outside.append(f)
        else:
            groups.setdefault(split_name, []).append(f)
    if not groups:
        return {_split_base(split): files}
    if outside:
        logger.warning(
            "Dataset %r: %d %s outside the split folders %s ignored: %s",
            source.name, len(outside), what, sorted(groups), _show(outside, local.root),
        )
    return groups


def _metadata_for(local: LocalFiles, groups: dict[str, list[Path]]) -> dict[str, list[Path]]:
    """imagefolder metadata files (captions, labels, ...) go with the split whose folder holds them."""
    metadata = [f for f in local.files if f.name in METADATA_FILENAMES]
    if not metadata:
        return groups
    out = {split: list(files) for split, files in groups.items()}
    for f in metadata:
        split = local.split_folder(f)
        if split is None and len(groups) == 1:
            split = next(iter(groups))
        if split in out:
            out[split].append(f)
        else:
            logger.warning("Dataset %r: metadata file %s belongs to no split; ignored", local.root, f)
    return out


def _open_files(source: Source, split: str, streaming: bool, /, **kwargs: Any):
    local = source.local
    assert local is not None
    if source.kind == "images":
        files, what = local.image_files, "image files"
        if not files:
            raise ValueError(
                f"Dataset {source.name!r}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) and no data "
                f"shards ({', '.join(sorted(SHARD_BUILDERS))}) in {local.root}. {_SOURCES_HELP}"
            )
    else:
        files, what = [f for f in local.files if _shard_builder(f) == source.builder], f"{source.builder} files"
    groups = _split_groups(source, files, split, what)
    base = _split_base(split)
    alias = SPLIT_FOLDERS.get(base.lower())
    if base not in groups and alias in groups:  # "val" asks for the split of a val/ folder, named "validation"
        split, base = alias + split[len(base):], alias
    if base not in groups:
        raise _unknown_split(source.name, split, list(groups))
    read = set(files)
    others = [f for f in local.files if f not in read and f.name not in METADATA_FILENAMES]
    _report_faults(source.name, local)
    logger.info(
        "Dataset %r: %s%s", source.name, ", ".join(f"{len(v)} {what} in {k!r}" for k, v in sorted(groups.items())),
        f" ({len(others)} other files not read: {_show(others, local.root)})" if others else "",
    )
    if source.kind == "images":
        # Every split's files go in (only `split` is returned), so class labels are inferred over all splits alike.
        groups = _metadata_for(local, groups)
    else:
        groups = {base: groups[base]}
    try:
        data_files = {k: [_as_data_file(f) for f in v] for k, v in groups.items()}
        return _load_dataset(source.name, source.builder, split, streaming, data_files=data_files, **kwargs)
    except ValueError as err:
        # A file removed between our listing and `datasets` resolving the list stops datasets: drop what is gone
        # (said in the log, as a vanished entry) and open the rest, once.
        gone = [f for v in groups.values() for f in v if not os.path.isfile(f)]
        if not isinstance(err.__cause__, FileNotFoundError) or not gone:
            raise
        logger.warning("Dataset %r: %d files vanished after the folder was listed and are not read (vanished): %s",
                       source.name, len(gone), _show(gone, local.root))
        data_files = {k: [_as_data_file(f) for f in v if f not in set(gone)] for k, v in groups.items()}
        return _load_dataset(source.name, source.builder, split, streaming, data_files=data_files, **kwargs)


def _report_faults(name: str, local: LocalFiles) -> None:
    """Entries that cannot be read as files are never handed to ``datasets``: say so, with their reasons."""
    if local.faults:
        reasons: dict[str, int] = {}
        for fault in local.faults:
            reasons[fault.reason] = reasons.get(fault.reason, 0) + 1
        logger.warning(
            "Dataset %r: %d entries are not readable files and are not read (%s): %s", name, len(local.faults),
            ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())),
            "; ".join(f"{_show([f.path], local.root)} ({f.reason})" for f in local.faults[:_SHOW_FAULTS])
            + ("; ..." if len(local.faults) > _SHOW_FAULTS else ""),
        )
    if local.hidden:
        logger.info("Dataset %r: %d hidden entries skipped: %s", name, len(local.hidden), _show(local.hidden, local.root))


def _load_dataset(name: str, path: str, split: str, streaming: bool, /, **kwargs: Any):
    """``datasets.load_dataset`` with errors a user can fix turned into ValueErrors that say how."""
    try:
        return datasets.load_dataset(path, split=split, streaming=streaming, **kwargs)
    except ValueError as err:
        if "Unknown split" in str(err):
            reason = str(err).rstrip(".")
            raise ValueError(
                f"Dataset {name!r}: {reason}. Pick an existing split with split=... (config: data.split=<name>)."
            ) from err
        raise
    except FileNotFoundError as err:
        raise ValueError(f"Dataset {name!r}: {err}. {_SOURCES_HELP}") from err


def _open_saved(source: Source, split: str, streaming: bool):
    loaded = datasets.load_from_disk(str(source.path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(
                f"Dataset {source.name!r} has no split {split!r}; available splits: {sorted(loaded)}. "
                f"Pick one with split=... (config: data.split=<name>)."
            )
        loaded = loaded[split]
    # A saved single Dataset has no split name of its own: it is used whatever `split` says.
    if streaming:
        loaded = loaded.to_iterable_dataset(num_shards=max(1, min(_STREAM_SHARDS, len(loaded))))
    return loaded


def _open_hub(source: Source, split: str, streaming: bool, /, **kwargs: Any):
    # Rows of a Hub image folder are paths into the Hub cache (or `hf://` URLs when streamed): they are this repo's
    # own files, which the user pointed at.
    trust_hub_dataset(source.name)
    try:
        return _load_dataset(source.name, source.name, split, streaming, **kwargs)
    except ValueError:
        raise
    except Exception as err:  # offline, unknown repo, no access, ...: all fixed the same ways
        offline = ""
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            offline = " (HF_HUB_OFFLINE is set, so only datasets already in the local cache load)"
        raise ValueError(
            f"Dataset {source.name!r} is not a local path and could not be loaded from the Hugging Face Hub"
            f"{offline}: {type(err).__name__}: {err}. {_SOURCES_HELP}"
        ) from err


def open_source(
    source: Source, split: str = "train", *, streaming: bool = False, **load_kwargs: Any
) -> datasets.Dataset | datasets.IterableDataset:
    """Load split ``split`` of a resolved source. ``load_kwargs`` go to ``datasets.load_dataset`` (``name=``,
    ``revision=``, ``cache_dir=``, ...; ignored for ``save_to_disk`` folders).

    Raises ``ValueError`` naming the problem and the fix (unknown split, a folder without images, an unknown or
    unreachable Hub id).
    """
    if source.kind == "hub":
        return _open_hub(source, split, streaming, **load_kwargs)
    if source.kind == "saved":
        return _open_saved(source, split, streaming)
    return _open_files(source, split, streaming, **load_kwargs)


def column_names(ds: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    """Column names of a dataset or stream (a stream with unknown features is peeked at)."""
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds.take(1)), None)
    return list(first) if first is not None else []


def _image_columns(ds: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    features = ds.features or {}
    return [name for name, feature in features.items() if isinstance(feature, datasets.Image)]


def load_image_dataset(
    dataset: str | os.PathLike,
    split: str = "train",
    image_column: str = "image",
    streaming: bool = False,
    *,
    rank: int = 0,
    world_size: int = 1,
    **load_kwargs: Any,
) -> datasets.Dataset | datasets.IterableDataset:
    """Open an image dataset from any source (see :func:`resolve_source`) and check it has ``image_column``.

    ``dataset`` may be a Hub id (``org/name``), a local image folder, a ``save_to_disk`` directory (``Dataset`` or
    ``DatasetDict``), a parquet / webdataset ``.tar`` / arrow file, a directory of those, a glob such as
    ``"shards/train-*.tar"``, or ``"sample"`` (built on first use, see ``training.sample_data``). ``load_kwargs``
    go to ``datasets.load_dataset`` (e.g. ``name=``, ``revision=``, ``cache_dir=``).

    With ``streaming=True`` the result is an ``IterableDataset`` already sharded for process ``rank`` of
    ``world_size`` (``split_dataset_by_node``). Map-style datasets are returned whole: the ``ResumableSampler``
    shards them, because exact resume needs the one global permutation.

    Raises ``ValueError`` naming the problem and the fix for a missing path, an unknown Hub id, a missing split
    or a missing image column.
    """
    ds = open_source(resolve_source(dataset), split, streaming=streaming, **load_kwargs)
    columns = column_names(ds)
    if image_column not in columns:
        image_columns = _image_columns(ds)
        hint = f" Image columns: {image_columns}." if image_columns else ""
        suggestion = image_columns[0] if image_columns else "<column>"
        raise ValueError(
            f"Dataset {str(dataset)!r} (split {split!r}) has no column {image_column!r}. Available columns: "
            f"{columns}.{hint} Pass image_column=... (config: data.image_column={suggestion})."
        )
    if streaming and world_size > 1:
        ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    return ds
