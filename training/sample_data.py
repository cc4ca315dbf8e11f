"""The project's sample image dataset, generated offline from photos that ship inside scikit-image.

``accelerate launch train.py`` must work with no download, and ``probe.py`` needs labelled data to score a
model on. This module cuts varied crops out of 12 real photos bundled in ``skimage.data`` (files inside the
installed package, loaded without ``pooch`` or network) and writes them as an imagefolder dataset:

    <root>/train/<class>/<class>_0000.jpg        24 per class  (288, for self-supervised training)
    <root>/validation/<class>/<class>_0000.jpg    5 per class   (60)
    <root>/test/<class>/<class>_0000.jpg         15 per class  (180, held out, for kNN / linear probes)

The label of an image is the photo it was cut from, so crops of one photo form a class; ``datasets`` reads the
folder natively (``load_dataset(str(root))``) with a ``label`` ClassLabel column named after the folders. Each
crop has a random position, scale (15-80 % of the photo's area), aspect ratio (3:4 .. 4:3), a horizontal flip
half of the time, mild brightness/contrast/saturation changes, and is resized so its shorter side is 128-160 px.
Generation is seeded (same files every time) and takes about a second.

``build_sample_dataset()`` writes it once into ``$DINOFORGE_CACHE/sample`` (default ``~/.cache/dinoforge/sample``)
and then only returns the path. The dataset name ``"sample"`` (the default ``data.dataset``) resolves to it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["SAMPLE_CLASSES", "SAMPLE_SPLITS", "build_sample_dataset", "default_sample_root"]

# Bump when the content changes, so caches written by an older version are rebuilt.
SAMPLE_VERSION = 1
_MARKER = "dinoforge_sample.json"
_SEED = 20240417

# class name -> skimage.data loader name. All are photographs shipped inside the scikit-image wheel (no pooch
# download); gray ones stay single-channel JPEGs, which also exercises the RGB conversion in the data loader.
SAMPLE_CLASSES: dict[str, str] = {
    "astronaut": "astronaut",
    "camera": "camera",
    "cat": "chelsea",
    "coffee": "coffee",
    "coins": "coins",
    "gravel": "gravel",
    "hubble": "hubble_deep_field",
    "immunohistochemistry": "immunohistochemistry",
    "moon": "moon",
    "motorcycle": "stereo_motorcycle",
    "retina": "retina",
    "rocket": "rocket",
}
# split -> images per class
SAMPLE_SPLITS: dict[str, int] = {"train": 24, "validation": 5, "test": 15}


def default_sample_root() -> Path:
    """``$DINOFORGE_CACHE/sample``, or ``~/.cache/dinoforge/sample``."""
    cache = os.environ.get("DINOFORGE_CACHE") or Path.home() / ".cache" / "dinoforge"
    return Path(cache).expanduser() / "sample"


def _load_photo(loader_name: str) -> Image.Image:
    import skimage.data  # imported lazily: only needed the first time the sample set is built

    array = getattr(skimage.data, loader_name)()
    if isinstance(array, tuple):  # stereo_motorcycle() returns (left, right, disparity): keep the left view
        array = array[0]
    return Image.fromarray(np.ascontiguousarray(array))


def _random_view(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One varied crop of ``photo``: random box, flip, mild photometric change, shorter side 128-160 px."""
    width, height = photo.size
    area = width * height * rng.uniform(0.15, 0.8)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))  # width / height
    crop_w = int(min(width, round(np.sqrt(area * aspect))))
    crop_h = int(min(height, round(np.sqrt(area / aspect))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    short = int(rng.integers(128, 161))
    scale = short / min(crop_w, crop_h)
    size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
    # Resize first: the photometric changes then run on ~150 px images instead of megapixel crops.
    view = photo.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.8, 1.2))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.8, 1.2))
    if view.mode == "RGB":
        view = ImageEnhance.Color(view).enhance(rng.uniform(0.8, 1.2))
    return view


def _is_complete(root: Path) -> bool:
    try:
        marker = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == SAMPLE_VERSION


def _write(target: Path) -> None:
    for class_id, (class_name, loader_name) in enumerate(sorted(SAMPLE_CLASSES.items())):
        photo = _load_photo(loader_name)
        for split_id, (split, count) in enumerate(SAMPLE_SPLITS.items()):
            # One independent stream per (split, class): adding a split or class never changes the others.
            rng = np.random.default_rng([_SEED, split_id, class_id])
            folder = target / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                _random_view(photo, rng).save(folder / f"{class_name}_{i:04d}.jpg", quality=90)
    (target / "README.md").write_text(
        # A small YAML header: `datasets` reads README.md as a dataset card and warns when it has none.
        "---\npretty_name: dinoforge sample images\ntask_categories:\n- image-classification\n---\n\n"
        "# dinoforge sample images\n\n"
        "Generated by `training.sample_data.build_sample_dataset()` from photographs bundled with scikit-image "
        "(`skimage.data`; see its README for sources and licences). Each image is a random crop of one photo; "
        "the label (folder name) is the photo it came from.\n"
    )
    marker = {
        "version": SAMPLE_VERSION,
        "classes": sorted(SAMPLE_CLASSES),
        "splits": {split: count * len(SAMPLE_CLASSES) for split, count in SAMPLE_SPLITS.items()},
    }
    (target / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def build_once(root: Path, is_complete: Callable[[Path], bool], write: Callable[[Path], None]) -> Path:
    """Write a generated dataset into ``root`` once and return it: idempotent (a complete copy is returned
    untouched) and atomic: files go to a temporary sibling directory that is renamed into place when complete, so
    an interrupted build or several processes building at once (e.g. every rank of ``accelerate launch``) never
    leave a half-written dataset behind."""
    if is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write(tmp)
        if root.exists():  # an older version (or a stray folder without a marker): move it out of the way
            if is_complete(root):  # another process finished first
                return root
            stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            root.rename(stale / root.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(root)
        except OSError:  # another process renamed its copy into place between our check and our rename
            if not is_complete(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def build_sample_dataset(root: str | os.PathLike | None = None) -> Path:
    """Write the sample imagefolder dataset into ``root`` (default :func:`default_sample_root`) once and return it
    (see :func:`build_once`)."""
    return build_once(Path(root).expanduser() if root is not None else default_sample_root(), _is_complete, _write)
