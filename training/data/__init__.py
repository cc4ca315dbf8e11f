"""Training data: one source resolver, one image decoder, and a generic loader with multi-crop as one pipeline.

* :mod:`.sources` — :func:`load_image_dataset`: any source (Hub id, image folder, ``save_to_disk``, parquet /
  webdataset / arrow files, folders and globs of them, ``"sample"``) → ``datasets.Dataset`` / ``IterableDataset``;
* :mod:`.decode` — :func:`decode_image`: any image value → upright 8-bit RGB, or a typed :class:`ImageDecodeError`;
* :mod:`.files` — listing folders so every entry is accounted for, reading files safely (no FIFO ever blocks),
  and the :class:`PathPolicy` that decides which local paths a dataset row may open;
* :mod:`.sampler` — :class:`ResumableSampler` and :func:`choose_resolution` (exact resume, multi-resolution);
* :mod:`.loader` — :class:`ImageDataset` / :class:`ImageStream` and :func:`build_loader`: decode → per-sample
  transform → pluggable collate, in the DataLoader workers, with undecodable images counted in ``num_skipped``;
* :mod:`.multicrop` — the DINO / iBOT pipeline: :class:`MultiCropCollator` and :func:`build_dataloader`.
"""

from .decode import (
    DECODE_REASONS,
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageDecodeError,
    decode,
    decode_image,
    fix_for,
)
from .files import FILE_REASONS, FileFault, PathPolicy, path_policy, read_file, trust_local_source, walk
from .loader import (
    ImageDataset,
    ImageStream,
    SampleCollator,
    SampleTransform,
    SkippedSample,
    build_loader,
    drop_missing,
    set_loader_epoch,
    skipped_entries,
)
from .multicrop import MultiCropCollator, MultiCropDataset, MultiCropStream, build_dataloader, collate_multicrop
from .sampler import ResumableSampler, choose_resolution
from .sources import LocalFiles, Source, list_files, load_image_dataset, open_source, resolve_source

__all__ = [
    "DECODE_REASONS",
    "DEFAULT_MAX_PIXELS",
    "FILE_REASONS",
    "FileFault",
    "PathPolicy",
    "DecodedImage",
    "ImageDataset",
    "ImageDecodeError",
    "ImageStream",
    "LocalFiles",
    "MultiCropCollator",
    "MultiCropDataset",
    "MultiCropStream",
    "ResumableSampler",
    "SampleCollator",
    "SampleTransform",
    "SkippedSample",
    "Source",
    "build_dataloader",
    "build_loader",
    "choose_resolution",
    "collate_multicrop",
    "decode",
    "decode_image",
    "drop_missing",
    "fix_for",
    "list_files",
    "load_image_dataset",
    "open_source",
    "path_policy",
    "read_file",
    "resolve_source",
    "set_loader_epoch",
    "skipped_entries",
    "trust_local_source",
    "walk",
]
