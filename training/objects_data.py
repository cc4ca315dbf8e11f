"""A small labelled set where the label is *content*: the `objects` dataset, generated offline.

The `sample` set's label is the photo a crop was cut from, which colour and texture statistics solve. Here each
image is a crop of a real photo (the background) with one foreground object pasted on it, and the label is the
object's class — one of ten shapes: circle, triangle, square, pentagon, hexagon, star, cross, ring, crescent,
arrow. Everything else is a nuisance a representation has to ignore: each object instance has its own random
proportions (aspect, vertex jitter, stroke width), colour (or a two-colour texture), scale (35–70 % of the image
side), rotation and position; the background is a random crop of a random photo. Train and test never share an
instance or a background photo: their backgrounds come from disjoint sets of the photos bundled with
scikit-image (`skimage.data`, files inside the installed package, no download), and every instance is drawn
from its own seed.

    <root>/train/<class>/<class>_0000.png        80 per class  (800)
    <root>/validation/<class>/<class>_0000.png   20 per class  (200)
    <root>/test/<class>/<class>_0000.png         40 per class  (400)

64×64 px PNGs; `build_objects_dataset()` writes them once into `$DINOFORGE_CACHE/objects` (default
`~/.cache/dinoforge/objects`) and returns the path; the dataset name `"objects"` resolves to it like `"sample"`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["OBJECT_CLASSES", "OBJECT_SPLITS", "build_objects_dataset", "default_objects_root", "iter_split",
           "render_object", "render_object_and_mask"]

OBJECTS_VERSION = 1
_MARKER = "dinoforge_objects.json"
_SEED = 20261130
IMAGE_SIZE = 64
_CANVAS = 256  # shapes are drawn large, then rotated and scaled down (antialiased edges)

OBJECT_CLASSES = ("arrow", "circle", "crescent", "cross", "hexagon", "pentagon", "ring", "square", "star", "triangle")
OBJECT_SPLITS: dict[str, int] = {"train": 80, "validation": 20, "test": 40}
# Background photos: training's and the held-out ones (validation and test) are disjoint, so a test image's
# background was never seen in training.
_TRAIN_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "gravel", "hubble_deep_field",
                 "immunohistochemistry", "moon", "rocket")
_HELD_OUT_PHOTOS = ("cell", "coins", "colorwheel", "grass", "page", "retina", "stereo_motorcycle", "text")
_BACKGROUNDS = {"train": _TRAIN_PHOTOS, "validation": _HELD_OUT_PHOTOS, "test": _HELD_OUT_PHOTOS}


def default_objects_root() -> Path:
    cache = os.environ.get("DINOFORGE_CACHE") or Path.home() / ".cache" / "dinoforge"
    return Path(cache).expanduser() / "objects"


def _polygon(n: int, rng: np.random.Generator, jitter: float, star_inner: float | None = None) -> list[tuple]:
    """A regular n-gon (or 2n-point star) around the canvas centre, each vertex radius jittered."""
    c, radius = _CANVAS / 2, _CANVAS * 0.45
    points = []
    count = 2 * n if star_inner else n
    start = rng.uniform(0, 2 * math.pi)
    for i in range(count):
        r = radius * (star_inner if star_inner and i % 2 else 1.0) * (1 + rng.uniform(-jitter, jitter))
        a = start + 2 * math.pi * i / count
        points.append((c + r * math.cos(a), c + r * math.sin(a)))
    return points


def _shape_mask(name: str, rng: np.random.Generator) -> Image.Image:
    """The binary silhouette (mode L, 0/255) of one instance of class `name`, centred on a square canvas."""
    mask = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    c, r = _CANVAS / 2, _CANVAS * 0.45
    jitter = rng.uniform(0.0, 0.08)
    stroke = rng.uniform(0.22, 0.38)  # relative width of the strokes of ring, cross, arrow, crescent
    if name == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif name == "ring":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        inner = r * (1 - stroke)
        draw.ellipse([c - inner, c - inner, c + inner, c + inner], fill=0)
    elif name == "crescent":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=255)
        shift = r * rng.uniform(0.45, 0.7)
        draw.ellipse([c - r + shift, c - r - shift * 0.2, c + r + shift, c + r - shift * 0.2], fill=0)
    elif name == "triangle":
        draw.polygon(_polygon(3, rng, jitter), fill=255)
    elif name == "square":
        draw.polygon(_polygon(4, rng, jitter), fill=255)
    elif name == "pentagon":
        draw.polygon(_polygon(5, rng, jitter), fill=255)
    elif name == "hexagon":
        draw.polygon(_polygon(6, rng, jitter), fill=255)
    elif name == "star":
        draw.polygon(_polygon(5, rng, jitter, star_inner=rng.uniform(0.38, 0.5)), fill=255)
    elif name == "cross":
        w = r * stroke
        draw.rectangle([c - r, c - w, c + r, c + w], fill=255)
        draw.rectangle([c - w, c - r, c + w, c + r], fill=255)
    elif name == "arrow":
        w = r * stroke * 0.7
        head = r * rng.uniform(0.8, 1.0)
        draw.rectangle([c - r, c - w, c + r * 0.2, c + w], fill=255)
        draw.polygon([(c + r * 0.1, c - head), (c + r, c), (c + r * 0.1, c + head)], fill=255)
    else:
        raise ValueError(f"unknown object class {name!r}")
    aspect = rng.uniform(0.75, 1.0)  # squash one axis: no two instances have the same proportions
    squashed = mask.resize((_CANVAS, max(1, int(_CANVAS * aspect))), Image.Resampling.BILINEAR)
    out = Image.new("L", (_CANVAS, _CANVAS), 0)
    out.paste(squashed, (0, (_CANVAS - squashed.height) // 2))
    return out


def _fill(size: int, rng: np.random.Generator) -> Image.Image:
    """The object's paint: one random colour, or (one in three) a two-colour stripe / check texture."""
    a = rng.integers(0, 256, 3)
    if rng.random() < 2 / 3:
        return Image.new("RGB", (size, size), tuple(int(v) for v in a))
    b = rng.integers(0, 256, 3)
    period = int(rng.integers(6, 20))
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = ((xx // period) % 2) if rng.random() < 0.5 else ((xx // period + yy // period) % 2)
    pixels = np.where(pattern[..., None] == 1, a, b).astype(np.uint8)
    return Image.fromarray(pixels)


def render_object(name: str, background: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One image: a random `IMAGE_SIZE` crop of `background` with one random instance of class `name` on it."""
    return render_object_and_mask(name, background, rng)[0]


def render_object_and_mask(name: str, background: Image.Image,
                           rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """`render_object` (the same draws) and the object's antialiased mask on the whole image (mode L, 0..255)."""
    bg = _random_crop(background, rng)
    mask = _shape_mask(name, rng).rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR)
    side = int(IMAGE_SIZE * rng.uniform(0.35, 0.7))
    mask = mask.resize((side, side), Image.Resampling.LANCZOS)
    paint = _fill(side, rng)
    x, y = (int(rng.integers(0, IMAGE_SIZE - side + 1)) for _ in range(2))
    bg.paste(paint, (x, y), mask)
    full = Image.new("L", bg.size, 0)
    full.paste(mask, (x, y))
    return bg, full


def iter_split(split: str, photos: dict[str, Image.Image] | None = None
               ) -> Iterator[tuple[str, int, Image.Image, Image.Image]]:
    """``(class name, index, image, mask)`` of every image of ``split``, in the order and with the random streams
    the stored set was written with (``photos``: the loaded background photos, loaded here when None)."""
    split_id = list(OBJECT_SPLITS).index(split)
    names = _BACKGROUNDS[split]
    photos = photos or {name: _load_photo(name) for name in names}
    backgrounds = [photos[n] for n in names]
    for class_id, name in enumerate(OBJECT_CLASSES):
        rng = np.random.default_rng([_SEED, split_id, class_id])  # one stream per (split, class)
        for i in range(OBJECT_SPLITS[split]):
            background = backgrounds[int(rng.integers(len(backgrounds)))]
            yield (name, i, *render_object_and_mask(name, background, rng))


def _random_crop(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.25, 0.6))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    return photo.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))


def _load_photo(name: str) -> Image.Image:
    import skimage.data  # only needed the first time the set is built

    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):
        array = array[0]
    image = Image.fromarray(np.ascontiguousarray(array))
    return image.convert("RGB")


def _is_complete(root: Path) -> bool:
    try:
        return json.loads((root / _MARKER).read_text()).get("version") == OBJECTS_VERSION
    except (OSError, ValueError):
        return False


def _write(target: Path) -> None:
    photos = {name: _load_photo(name) for name in _TRAIN_PHOTOS + _HELD_OUT_PHOTOS}
    for split in OBJECT_SPLITS:
        for name, i, image, _ in iter_split(split, photos):
            folder = target / split / name
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{name}_{i:04d}.png")
    (target / "README.md").write_text(
        "---\npretty_name: dinoforge objects on photos\ntask_categories:\n- image-classification\n---\n\n"
        "# dinoforge objects\n\nGenerated by `training.objects_data.build_objects_dataset()`: one random shape "
        "(the label) pasted on a random crop of a photo bundled with scikit-image; train and test use disjoint "
        "photos and instances.\n"
    )
    marker = {"version": OBJECTS_VERSION, "classes": list(OBJECT_CLASSES),
              "splits": {s: c * len(OBJECT_CLASSES) for s, c in OBJECT_SPLITS.items()}}
    (target / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def build_objects_dataset(root: str | os.PathLike | None = None) -> Path:
    """Write the objects imagefolder dataset into `root` (default `default_objects_root()`) once and return it
    (atomic, like the sample set: `training.sample_data.build_once`)."""
    from .sample_data import build_once

    return build_once(Path(root).expanduser() if root is not None else default_objects_root(), _is_complete, _write)
