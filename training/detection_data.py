"""A small synthetic detection set with known boxes: shapes pasted on photo crops, generated offline.

Built from the same pieces as the `objects` set (training/objects_data.py: one shape silhouette per instance with
its own proportions, paint, rotation and scale, photos bundled with scikit-image as backgrounds), but with 1–3
objects per image and every object's tight box recorded. Train and test use disjoint background photos.

The layout is the COCO-style one of detection sets on the Hub (e.g. `cppe-5`): columns `image`, `image_id`,
`width`, `height`, `objects` = `{"bbox": [[x, y, w, h], ...] (pixels, top-left corner), "category": [class, ...]}`
with `category` a ClassLabel, so grounding prompts come from the category names. Written with `save_to_disk`
(a `DatasetDict` with `train` and `test`) into `$DINOFORGE_CACHE/shapes_detection` (default
`~/.cache/dinoforge/shapes_detection`) once; `python -m training.detection_data` builds it and prints the path.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .objects_data import _HELD_OUT_PHOTOS, _TRAIN_PHOTOS, _fill, _load_photo, _shape_mask

__all__ = ["DETECTION_CLASSES", "DETECTION_SPLITS", "build_detection_dataset", "default_detection_root",
           "render_scene"]

DETECTION_VERSION = 1
_MARKER = "dinoforge_shapes_detection.json"
_SEED = 20261201
IMAGE_SIZE = 112  # 8x8 patches of 14
DETECTION_CLASSES = ("circle", "cross", "square", "star", "triangle")
DETECTION_SPLITS: dict[str, int] = {"train": 480, "test": 120}
_BACKGROUNDS = {"train": _TRAIN_PHOTOS, "test": _HELD_OUT_PHOTOS}


def default_detection_root() -> Path:
    cache = os.environ.get("DINOFORGE_CACHE") or Path.home() / ".cache" / "dinoforge"
    return Path(cache).expanduser() / "shapes_detection"


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = w * h
    return inter / (aw * ah + bw * bh - inter)


def render_scene(classes: list[str], background: Image.Image, rng: np.random.Generator,
                 size: int = IMAGE_SIZE) -> tuple[Image.Image, list[tuple[str, list[float]]]]:
    """`size`² crop of `background` with one instance of each class in `classes` pasted on it, and the
    `(class, [x, y, w, h])` of each object placed (tight box of its silhouette, pixels). Objects overlap by IoU
    ≤ 0.1: a placement is redrawn up to 10 times, and an object that still overlaps is left out."""
    w, h = background.size
    side = int(min(w, h) * rng.uniform(0.3, 0.7))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    image = background.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    placed: list[tuple[str, list[float]]] = []
    for name in classes:
        mask = _shape_mask(name, rng).rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR)
        extent = int(size * rng.uniform(0.25, 0.5))
        mask = mask.resize((extent, extent), Image.Resampling.LANCZOS)
        tight = mask.point(lambda v: 255 if v > 127 else 0).getbbox()
        if tight is None:
            continue
        for _ in range(10):
            x, y = (int(rng.integers(0, size - extent + 1)) for _ in range(2))
            box = [float(x + tight[0]), float(y + tight[1]), float(tight[2] - tight[0]), float(tight[3] - tight[1])]
            if all(_iou(box, other) <= 0.1 for _, other in placed):
                image.paste(_fill(extent, rng), (x, y), mask)
                placed.append((name, box))
                break
    return image, placed


def _rows(split: str, count: int, classes: tuple[str, ...], photos: dict[str, Image.Image]) -> dict[str, list]:
    rows: dict[str, list] = {"image": [], "image_id": [], "width": [], "height": [], "objects": []}
    backgrounds = [photos[n] for n in _BACKGROUNDS[split]]
    rng = np.random.default_rng([_SEED, list(DETECTION_SPLITS).index(split)])
    for i in range(count):
        n = int(rng.integers(1, 4))
        names = [classes[int(c)] for c in rng.choice(len(classes), size=n, replace=False)]
        image, placed = render_scene(names, backgrounds[int(rng.integers(len(backgrounds)))], rng)
        rows["image"].append(image)
        rows["image_id"].append(i)
        rows["width"].append(image.width)
        rows["height"].append(image.height)
        rows["objects"].append({"bbox": [box for _, box in placed],
                                "category": [classes.index(name) for name, _ in placed]})
    return rows


def _write(target: Path, classes: tuple[str, ...]) -> None:
    import datasets

    photos = {name: _load_photo(name) for name in _TRAIN_PHOTOS + _HELD_OUT_PHOTOS}
    features = datasets.Features({
        "image": datasets.Image(), "image_id": datasets.Value("int64"), "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                    "category": datasets.List(datasets.ClassLabel(names=list(classes)))},
    })
    splits = {split: datasets.Dataset.from_dict(_rows(split, count, classes, photos), features=features)
              for split, count in DETECTION_SPLITS.items()}
    datasets.DatasetDict(splits).save_to_disk(str(target))
    (target / _MARKER).write_text(json.dumps({"version": DETECTION_VERSION, "classes": list(classes),
                                              "splits": DETECTION_SPLITS}, indent=2) + "\n")


def _is_complete(root: Path) -> bool:
    try:
        return json.loads((root / _MARKER).read_text()).get("version") == DETECTION_VERSION
    except (OSError, ValueError):
        return False


def build_detection_dataset(root: str | os.PathLike | None = None) -> Path:
    """Write the shapes detection set into `root` (default `default_detection_root()`) once and return it.
    Atomic like the sample sets: written into a temporary sibling folder, renamed into place when complete."""
    root = Path(root).expanduser() if root is not None else default_detection_root()
    if _is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write(tmp / "data", DETECTION_CLASSES)
        if root.exists():
            if _is_complete(root):
                return root
            stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            root.rename(stale / root.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            (tmp / "data").rename(root)
        except OSError:
            if not _is_complete(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


if __name__ == "__main__":
    print(build_detection_dataset(sys.argv[1] if len(sys.argv) > 1 else None))
