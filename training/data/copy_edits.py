"""Copy edits: two strongly edited copies of every image (copy detection, `method: copy_detection`).

SSCD (Pizzi et al. 2022) trains a descriptor to match an image with copies of it made by the edits found in the
wild; this is a from-scratch PIL implementation of such edits (nothing taken from any reference code). Each view is

    aggressive crop (area `crop_scale`, any aspect in `crop_ratio`) → the working size → flips, rotation, rescale
    (down and up), then in a random order colour, grey, blur, text overlay, logo / watermark overlay, border,
    screenshot-like framing → JPEG at low quality → the view size (square) → tensor, ImageNet mean/std

each edit with its own probability (`CopyEditsConfig`); view 1, the "original" side of the pair, gets a milder
crop and rarer edits (`view1_crop_min`, `view1_probability_scale`). Mixing (another image of the batch pasted into view 2)
happens in the collate, which sees the batch (`CopyEditMixer`). `style="heldout"` draws the overlays from other
families (TrueType fonts instead of PIL's default one, star / ring / stripe logos instead of ellipses and boxes,
patterned instead of solid borders, crops anchored at a corner) for evaluating on edits the model never saw.

Every random choice comes from a `random.Random` seeded with the loader's per-sample seed
(`derive_seed(seed, epoch, index)`) and the view number, so views depend only on (seed, epoch, index, image) and a
resumed run sees the same ones; `edit_image(image, seed)` is the same chain for one copy (calibration).
"""

from __future__ import annotations

import io
import math
import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF

from modeling.convert import IMAGENET_MEAN, IMAGENET_STD

from ..config import check
from .loader import SampleCollator, build_loader

__all__ = ["EDIT_KINDS", "CopyEditAugmentation", "CopyEditMixer", "CopyEditsConfig", "build_copy_edit_loader",
           "paste_image"]

Style = Literal["train", "heldout"]


@dataclass
class CopyEditsConfig:
    """Config section `edits`: the probability of each edit per view and its strength. The view size is
    `crops.global_size`."""

    crop_scale: tuple[float, float] = field(default=(0.1, 1.0), metadata=check(gt=0, le=1, ordered=True))
    crop_ratio: tuple[float, float] = field(default=(0.25, 4.0), metadata=check(gt=0, ordered=True))
    flip_probability: float = field(default=0.5, metadata=check(ge=0, le=1))  # horizontal (vertical: a quarter)
    rotate_probability: float = field(default=0.2, metadata=check(ge=0, le=1))
    resize_probability: float = field(default=0.3, metadata=check(ge=0, le=1))  # down-scale, then back up
    color_probability: float = field(default=0.6, metadata=check(ge=0, le=1))
    grayscale_probability: float = field(default=0.2, metadata=check(ge=0, le=1))
    blur_probability: float = field(default=0.3, metadata=check(ge=0, le=1))
    text_probability: float = field(default=0.3, metadata=check(ge=0, le=1))
    logo_probability: float = field(default=0.3, metadata=check(ge=0, le=1))
    border_probability: float = field(default=0.2, metadata=check(ge=0, le=1))
    screenshot_probability: float = field(default=0.1, metadata=check(ge=0, le=1))
    jpeg_probability: float = field(default=0.5, metadata=check(ge=0, le=1))
    jpeg_quality: tuple[int, int] = field(default=(10, 60), metadata=check(ge=1, le=95, ordered=True))
    mix_probability: float = field(default=0.15, metadata=check(ge=0, le=1))  # paste another image into view 2
    # View 1 plays the original: a crop of at least this area and every other edit's probability times
    # `view1_probability_scale` (1.0 and crop_scale: symmetric views, as SSCD; on small data independent strong
    # crops of both views often share no content, which turns matching copies into matching scenes).
    view1_crop_min: float = field(default=0.5, metadata=check(gt=0, le=1))
    view1_probability_scale: float = field(default=0.3, metadata=check(ge=0, le=1))


def original_view_config(config: CopyEditsConfig) -> CopyEditsConfig:
    """The edits of view 1 (the "original" side of a pair): milder crop, rarer edits (see `view1_*`)."""
    scaled = {f.name: getattr(config, f.name) * config.view1_probability_scale for f in fields(config)
              if f.name.endswith("_probability") and f.name != "mix_probability"}
    crop_min = max(config.crop_scale[0], config.view1_crop_min)
    return replace(config, crop_scale=(min(crop_min, config.crop_scale[1]), config.crop_scale[1]), **scaled)


# ---- the edits: (image, rng, style) -> image -----------------------------------------------------------------


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return rng.randrange(256), rng.randrange(256), rng.randrange(256)


def crop(image: Image.Image, rng: random.Random, style: Style = "train", scale: Sequence[float] = (0.1, 1.0),
         ratio: Sequence[float] = (0.25, 4.0)) -> Image.Image:
    """A crop of area fraction in `scale` and aspect (w/h) in `ratio` (log-uniform); held-out: at a corner."""
    w, h = image.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            if style == "heldout":
                x, y = rng.choice((0, w - cw)), rng.choice((0, h - ch))
            else:
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return image.crop((x, y, x + cw, y + ch))
    return image


def flip(image: Image.Image, rng: random.Random, style: Style = "train") -> Image.Image:
    image = ImageOps.mirror(image)
    return ImageOps.flip(image) if rng.random() < 0.25 else image


def rotate(image: Image.Image, rng: random.Random, style: Style = "train") -> Image.Image:
    if rng.random() < 0.5:  # quarter turns keep every pixel
        return image.rotate(90 * rng.randint(1, 3), expand=True)
    return image.rotate(rng.uniform(-30, 30), resample=Image.BILINEAR, expand=True, fillcolor=_colour(rng))


def rescale(image: Image.Image, rng: random.Random, style: Style = "train") -> Image.Image:
    """Down-scale to 15-70 % and back: the detail lost by thumbnails and re-uploads."""
    w, h = image.size
    f = rng.uniform(0.15, 0.7)
    small = image.resize((max(1, round(w * f)), max(1, round(h * f))), rng.choice((Image.NEAREST, Image.BILINEAR)))
    return small.resize((w, h), Image.BILINEAR)


def colour(image: Image.Image, rng: random.Random, style: Style = "train") -> Image.Image:
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.5, 1.5))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.5, 1.5))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.0, 2.0))
    if rng.random() < 0.5:  # hue rotation
        hsv = image.convert("HSV")
        h, s, v = hsv.split()
        shift = rng.randrange(256)
        h = h.point(lambda x: (x + shift) % 256)
        image = Image.merge("HSV", (h, s, v)).convert("RGB")
    return image


def grayscale(image: Image.Image, rng: random.Random, style: Style = "train") -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


def blur(image: Image.Image, rng: random.Random, style: Style = "train") -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.005, 0.04) * min(image.size)))


def jpeg(image: Image.Image, rng: random.Random, style: Style = "train",
         quality: Sequence[int] = (10, 60)) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(*quality))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


_TTF_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")


def _truetype_fonts() -> list[str]:
    found: list[str] = []
    for folder in _TTF_DIRS:
        if Path(folder).is_dir():
            found += sorted(str(p) for p in Path(folder).rglob("*.ttf"))[:50]
    return found


_FONTS: list[str] | None = None


def _font(rng: random.Random, size: int, style: Style) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Training: PIL's bundled default font; held out: the system's TrueType fonts (default when there are none)."""
    global _FONTS
    if style == "heldout":
        if _FONTS is None:
            _FONTS = _truetype_fonts()
        if _FONTS:
            return ImageFont.truetype(rng.choice(_FONTS), size)
    return ImageFont.load_default(size=size)


def _overlay(image: Image.Image, draw: Callable[[ImageDraw.ImageDraw, random.Random], None],
             rng: random.Random) -> Image.Image:
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw(ImageDraw.Draw(layer), rng)
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def text(image: Image.Image, rng: random.Random, style: Style = "train") -> Image.Image:
    """1-3 lines of random text (captions, watermarks), 6-25 % of the height, partly transparent."""
    w, h = image.size

    def draw(d: ImageDraw.ImageDraw, rng: random.Random) -> None:
        for _ in range(rng.randint(1, 3)):
            chars = string.ascii_letters + string.digits + "  .,!?@#"
            words = "".join(rng.choice(chars) for _ in range(rng.randint(3, 14)))
            font = _font(rng, max(6, round(h * rng.uniform(0.06, 0.25))), style)
            xy = (rng.uniform(-0.1, 0.8) * w, rng.uniform(-0.05, 0.9) * h)
            d.text(xy, words, font=font, fill=(*_colour(rng), rng.randint(120, 255)))

    return _overlay(image, draw, rng)


def _star(cx: float, cy: float, r: float, points: int) -> list[tuple[float, float]]:
    return [(cx + (r if i % 2 == 0 else r / 2.5) * math.cos(math.pi * i / points),
             cy + (r if i % 2 == 0 else r / 2.5) * math.sin(math.pi * i / points)) for i in range(2 * points)]


def logo(image: Image.Image, rng: random.Random, style: Style = "train") -> Image.Image:
    """A random "logo" (1-3 shapes in a box of 10-35 % of the shorter side) with alpha, anywhere."""
    w, h = image.size
    side = max(4, round(min(w, h) * rng.uniform(0.1, 0.35)))
    x0, y0 = rng.randint(0, max(0, w - side)), rng.randint(0, max(0, h - side))

    def draw(d: ImageDraw.ImageDraw, rng: random.Random) -> None:
        for _ in range(rng.randint(1, 3)):
            fill = (*_colour(rng), rng.randint(90, 230))
            a, b = sorted(rng.uniform(0, side) for _ in range(2)), sorted(rng.uniform(0, side) for _ in range(2))
            box = (x0 + a[0], y0 + b[0], x0 + max(a[1], a[0] + 2), y0 + max(b[1], b[0] + 2))
            kind = rng.randrange(3)
            if style == "heldout":
                if kind == 0:
                    d.polygon(_star(x0 + side / 2, y0 + side / 2, side / 2, rng.randint(5, 8)), fill=fill)
                elif kind == 1:
                    d.ellipse(box, outline=fill, width=max(1, side // 8))
                else:
                    for i in range(0, side, max(2, side // 6)):
                        d.line((x0 + i, y0, x0 + i + side // 4, y0 + side), fill=fill, width=max(1, side // 16))
            elif kind == 0:
                d.ellipse(box, fill=fill)
            elif kind == 1:
                d.rectangle(box, fill=fill)
            else:
                d.polygon([(x0 + rng.uniform(0, side), y0 + rng.uniform(0, side)) for _ in range(3)], fill=fill)

    return _overlay(image, draw, rng)


def border(image: Image.Image, rng: random.Random, style: Style = "train") -> Image.Image:
    """Padding of 2-20 % per side: a solid colour (held out: stripes)."""
    w, h = image.size
    left, right, top, bottom = (round(rng.uniform(0.02, 0.2) * s) for s in (w, w, h, h))
    canvas = Image.new("RGB", (w + left + right, h + top + bottom), _colour(rng))
    if style == "heldout":
        d, other, step = ImageDraw.Draw(canvas), _colour(rng), max(2, min(w, h) // 12)
        for i in range(-canvas.height, canvas.width, 2 * step):
            d.line((i, 0, i + canvas.height, canvas.height), fill=other, width=step)
    canvas.paste(image, (left, top))
    return canvas


def screenshot(image: Image.Image, rng: random.Random, style: Style = "train") -> Image.Image:
    """The image inside a larger "window": a title bar, a page background and some interface boxes."""
    w, h = image.size
    bar = max(3, round(h * rng.uniform(0.05, 0.12)))
    W, H = round(w * rng.uniform(1.1, 1.6)), round(h * rng.uniform(1.1, 1.5)) + bar
    page = rng.choice(((250, 250, 250), (30, 30, 35), _colour(rng)))
    canvas = Image.new("RGB", (W, H), page)
    d = ImageDraw.Draw(canvas)
    d.rectangle((0, 0, W, bar), fill=_colour(rng))
    for _ in range(rng.randint(1, 4)):
        x, y = rng.uniform(0, W), rng.uniform(bar, H)
        d.rectangle((x, y, x + rng.uniform(0.05, 0.4) * W, y + rng.uniform(0.02, 0.08) * H), fill=_colour(rng))
    canvas.paste(image, (rng.randint(0, W - w), rng.randint(bar, H - h)))
    return canvas


def paste_image(base: Image.Image, other: Image.Image, rng: random.Random) -> Image.Image:
    """Another image pasted into `base` (20-50 % of its shorter side, anywhere): a mixed copy."""
    w, h = base.size
    side = max(2, round(min(w, h) * rng.uniform(0.2, 0.5)))
    ow, oh = other.size
    f = side / max(ow, oh)
    small = other.convert("RGB").resize((max(1, round(ow * f)), max(1, round(oh * f))), Image.BILINEAR)
    out = base.copy()
    out.paste(small, (rng.randint(0, w - small.width), rng.randint(0, h - small.height)))
    return out


# Edits applied after the geometry, in a random order per view; JPEG always comes last.
_SHUFFLED = ("color", "grayscale", "blur", "text", "logo", "border", "screenshot")
EDIT_KINDS = ("crop", "flip", "rotate", "resize", *_SHUFFLED, "jpeg")
_EDITS: dict[str, Callable[..., Image.Image]] = {
    "flip": flip, "rotate": rotate, "resize": rescale, "color": colour, "grayscale": grayscale, "blur": blur,
    "text": text, "logo": logo, "border": border, "screenshot": screenshot,
}


class CopyEditAugmentation:
    """``image -> {"view1": t1, "view2": t2}``: two independent edit chains, normalised ``[3, size, size]``."""

    def __init__(self, size: int = 64, config: CopyEditsConfig | None = None, style: Style = "train",
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.size, self.config, self.style = size, config or CopyEditsConfig(), style
        self.view1_config = original_view_config(self.config)
        self.mean, self.std = list(mean), list(std)

    def __repr__(self) -> str:
        return f"CopyEditAugmentation(size={self.size}, style={self.style!r}, config={self.config})"

    def edit(self, image: Image.Image, rng: random.Random, kinds: Sequence[str] | None = None,
             size: int | None = None, config: CopyEditsConfig | None = None,
             applied: list[str] | None = None) -> Image.Image:
        """One edited copy. `kinds`: apply exactly these edits (else each with its probability in `config`, default
        this augmentation's); `size`: a square output of that size (None: the edited image as it comes, working
        size ≤ 512 px); `applied`: a list that receives the names of the edits made, in order (benchmarks)."""
        c = config or self.config
        chosen = set(kinds) if kinds is not None else None
        unknown = (chosen or set()) - set(EDIT_KINDS)
        if unknown:
            raise ValueError(f"unknown edits {sorted(unknown)}; available: {list(EDIT_KINDS)}")

        def wants(kind: str) -> bool:
            draw = rng.random()  # always drawn, so one edit's switch does not shift the others' randomness
            p = 1.0 if kind == "crop" else getattr(c, f"{kind}_probability")
            made = kind in chosen if chosen is not None else draw < p
            if made and applied is not None:
                applied.append(kind)
            return made

        image = image.convert("RGB")
        if wants("crop"):
            image = crop(image, rng, self.style, c.crop_scale, c.crop_ratio)
        work = size or 512  # edits run at about the output size: cheap, and overlays scale with it
        f = work / min(image.size) if size else min(1.0, work / max(image.size))
        image = image.resize((max(1, round(image.width * f)), max(1, round(image.height * f))), Image.BILINEAR)
        for kind in ("flip", "rotate", "resize"):
            if wants(kind):
                image = _EDITS[kind](image, rng, self.style)
        order = list(_SHUFFLED)
        rng.shuffle(order)
        for kind in order:
            if wants(kind):
                image = _EDITS[kind](image, rng, self.style)
        if wants("jpeg"):
            image = jpeg(image, rng, self.style, c.jpeg_quality)
        return image.resize((size, size), Image.BILINEAR) if size else image

    def edit_image(self, image: Image.Image, seed: int, kinds: Sequence[str] | None = None,
                   size: int | None = None, applied: list[str] | None = None) -> Image.Image:
        """The copy of `image` for `seed` (the same chain as training's views; calibration, tests)."""
        return self.edit(image, random.Random(seed), kinds, size, applied=applied)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def __call__(self, image: Image.Image, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Both views of ``image``; with ``seed`` they depend only on (seed, image)."""
        base = random.randrange(2**62) if seed is None else int(seed)
        return {"view1": self.to_tensor(self.edit(image, random.Random(2 * base + 1), size=self.size,
                                                  config=self.view1_config)),
                "view2": self.to_tensor(self.edit(image, random.Random(2 * base + 2), size=self.size))}


class CopyEditMixer:
    """Collate: stack the views and, with `mix_probability` per image, paste a part of another image of the batch
    (its view 1, 20-50 % of the side) into view 2 — the positive stays the pasted-on image. Drawn from each
    sample's own seed, so a batch is the same on resume."""

    def __init__(self, mix_probability: float = 0.15) -> None:
        self.mix_probability = mix_probability

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        view1 = torch.stack([s["view1"] for s in samples])
        view2 = torch.stack([s["view2"] for s in samples])
        n, size = len(samples), view2.shape[-1]
        for i, s in enumerate(samples):
            rng = random.Random(int(s.get("sample_seed", i)) * 7 + 3)
            if n < 2 or rng.random() >= self.mix_probability:
                continue
            j = (i + rng.randint(1, n - 1)) % n
            side = max(2, round(size * rng.uniform(0.2, 0.5)))
            patch = F.interpolate(view1[j : j + 1], size=(side, side), mode="bilinear", align_corners=False)[0]
            y, x = rng.randint(0, size - side), rng.randint(0, size - side)
            view2[i, :, y : y + side, x : x + side] = patch
        return {"view1": view1, "view2": view2}


def build_copy_edit_loader(
    dataset: datasets.Dataset | datasets.IterableDataset,
    augmentation: CopyEditAugmentation,
    batch_size: int,
    mix_probability: float = 0.15,
    **loader_options: Any,
) -> DataLoader:
    """:func:`training.data.loader.build_loader` with the copy edits and the mixing collate (batches `view1`,
    `view2` `[B, 3, S, S]`, `batch_size`, `num_skipped`, `skipped`)."""
    return build_loader(dataset, augmentation, SampleCollator(CopyEditMixer(mix_probability)), batch_size,
                        **loader_options)
