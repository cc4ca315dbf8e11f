"""Background swap: every view pastes the image's salient foreground onto a background cut from another image.

Why: on a small dataset whose images are objects on varied backgrounds, two crops of one image share far more
background than object, so instance-discrimination objectives (MoCo v3, SimCLR, DINO) match the views by their
background and learn nothing about the object (docs/small_data.md: kNN at chance on the `objects` set). With
the background swapped independently in each view, the object is what the two views share. This is the
"background augmentation" of Ryali, Schwab and Morcos (2021), with the foreground found without a model:

* foreground: minimum-barrier salient-object detection (Zhang et al., "Minimum Barrier Salient Object Detection
  at 80 FPS", ICCV 2015). A pixel's saliency is its minimum-barrier distance to the image border — over all paths
  to the border, the smallest range (max − min) of the colour along the path — per CIE-Lab channel of a blurred
  `mask_size` thumbnail, summed over the channels; Otsu's threshold on it gives the mask. No labels, no weights.
* backgrounds: from each image of a bank, its least salient square window of half its side, the region least
  likely to hold an object.

Masks of the bank images are computed once, batched, when the swap is built (``BackgroundSwap.from_dataset``);
an image outside the bank gets its mask on first use (~0.1 s), cached in the worker up to ``MAX_CACHED`` masks (a
mask depends only on the image, so the cache never changes results). The swap is meant for small datasets: the
bank pass decodes up to ``max_images`` images once at start-up (16 s for the 800 images of `objects` on one
core). Draws come from torch's default generator, which the augmentations fork and seed per sample: a resumed
run sees the same swaps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .decode import ImageDecodeError, decode_image
from .loader import _without_decoding, content_key

__all__ = ["BackgroundSwap", "foreground_masks", "minimum_barrier_saliency"]

logger = logging.getLogger(__name__)


def minimum_barrier_saliency(images: torch.Tensor, rounds: int = 2) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, H, W]``: each pixel's minimum-barrier distance to the image border, per channel,
    summed over channels. Raster sweeps (down, up, right, left) relax each pixel from its neighbour; ``rounds``
    repetitions reach paths that turn that many times (2 is within 2 % of the converged mean on 64 px images)."""
    x = images.float()
    dist = torch.full_like(x, float("inf"))
    for border in (dist[..., 0, :], dist[..., -1, :], dist[..., :, 0], dist[..., :, -1]):
        border.zero_()
    high, low = x.clone(), x.clone()
    h, w = x.shape[-2:]

    def relax(dst: tuple, src: tuple) -> None:
        new_high = torch.maximum(high[src], x[dst])
        new_low = torch.minimum(low[src], x[dst])
        candidate = new_high - new_low
        better = candidate < dist[dst]
        dist[dst] = torch.where(better, candidate, dist[dst])
        high[dst] = torch.where(better, new_high, high[dst])
        low[dst] = torch.where(better, new_low, low[dst])

    e = slice(None)
    for _ in range(rounds):
        for i in range(1, h):
            relax((e, e, i, e), (e, e, i - 1, e))
        for i in range(h - 2, -1, -1):
            relax((e, e, i, e), (e, e, i + 1, e))
        for j in range(1, w):
            relax((e, e, e, j), (e, e, e, j - 1))
        for j in range(w - 2, -1, -1):
            relax((e, e, e, j), (e, e, e, j + 1))
    return dist.sum(1)


def _lab_thumbnails(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB images -> ``[N, 3, size, size]`` CIE-Lab / 100, Gaussian-blurred (σ = size / 64) against texture."""
    from skimage.color import rgb2lab

    rgb = np.stack([np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
                    for im in images])
    lab = torch.from_numpy(rgb2lab(rgb)).permute(0, 3, 1, 2).float() / 100
    sigma = size / 64
    radius = max(1, round(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1)
    lab = F.conv2d(F.pad(lab, (radius, radius, 0, 0), mode="reflect"), kernel.view(3, 1, 1, -1), groups=3)
    return F.conv2d(F.pad(lab, (0, 0, radius, radius), mode="reflect"), kernel.view(3, 1, -1, 1), groups=3)


def foreground_masks(images: Sequence[Image.Image], size: int = 64) -> np.ndarray:
    """Boolean ``[N, size, size]`` foreground masks of RGB images (resized to ``size`` x ``size``): Otsu's threshold
    of the minimum-barrier saliency. An image without contrast gets an empty mask."""
    from skimage.filters import threshold_otsu

    saliency = minimum_barrier_saliency(_lab_thumbnails(images, size)).numpy()
    masks = np.zeros(saliency.shape, dtype=bool)
    for i, s in enumerate(saliency):
        if s.max() > s.min():
            masks[i] = s > threshold_otsu(s)
    return masks


def _least_salient_window(image: Image.Image, mask: np.ndarray, out_size: int) -> np.ndarray:
    """The square window of half the mask's side with the least foreground, cut from ``image`` at its own
    resolution and resized to ``out_size`` (uint8 ``[out_size, out_size, 3]``)."""
    size = mask.shape[0]
    win = size // 2
    cover = F.avg_pool2d(torch.from_numpy(mask).float()[None, None], win, stride=1)[0, 0]
    r, c = divmod(int(cover.flatten().argmin()), cover.shape[1])
    sx, sy = image.width / size, image.height / size
    box = (round(c * sx), round(r * sy), round((c + win) * sx), round((r + win) * sy))
    return np.asarray(image.resize((out_size, out_size), Image.Resampling.BILINEAR, box=box))


class BackgroundSwap:
    """``image -> image`` with probability ``probability``: the image's foreground mask (soft-edged, upsampled from
    ``mask_size``) pasted onto a random bank background resized to the image. Build it with :meth:`from_images`
    or :meth:`from_dataset`. An image whose mask covers less than ``MIN_FOREGROUND`` or more than
    ``MAX_FOREGROUND`` of it is left as it is."""

    MIN_FOREGROUND = 0.01
    MAX_FOREGROUND = 0.9
    MAX_CACHED = 65536  # masks kept per worker (512 bytes each at mask_size 64)

    def __init__(self, backgrounds: np.ndarray, masks: dict[int, np.ndarray], probability: float,
                 mask_size: int = 64) -> None:
        if not 0 <= probability <= 1:
            raise ValueError(f"background swap probability must be in [0, 1], got {probability}")
        if len(backgrounds) == 0:
            raise ValueError("background swap needs at least one background image")
        self.backgrounds = backgrounds
        self.probability = probability
        self.mask_size = mask_size
        self._masks = dict(masks)  # loader.content_key(image) -> np.packbits(mask)

    @classmethod
    def from_images(cls, images: Iterable[Image.Image], probability: float, mask_size: int = 64,
                    chunk: int = 256) -> BackgroundSwap:
        """The bank and the masks of ``images`` (RGB), masks computed ``chunk`` images at a time."""
        images = list(images)
        backgrounds, masks = [], {}
        for start in range(0, len(images), chunk):
            part = images[start:start + chunk]
            for image, mask in zip(part, foreground_masks(part, mask_size)):
                backgrounds.append(_least_salient_window(image, mask, mask_size))
                masks[content_key(image)] = np.packbits(mask)
        swap = cls(np.stack(backgrounds) if backgrounds else np.zeros((0,)), masks, probability, mask_size)
        coverage = np.mean([np.unpackbits(m).mean() for m in masks.values()]) if masks else 0.0
        logger.info("background swap: %d images, mean foreground %.1f %% of the image, p %.2f per view",
                    len(images), 100 * coverage, probability)
        return swap

    @classmethod
    def from_dataset(cls, dataset: Any, probability: float, *, image_column: str = "image", max_images: int = 4096,
                     seed: int = 0, mask_size: int = 64, **decode_options: Any) -> BackgroundSwap:
        """Bank of up to ``max_images`` images of a ``datasets`` dataset (a seeded random subset of a larger map-style
        one; the first ones of a stream). Rows that do not decode are left out of the bank and counted in the log
        (the training loader reports and skips them as usual). ``decode_options``: ``max_pixels``, ``allow_paths``."""

        dataset = _without_decoding(dataset, image_column, {})  # decoded here, so a broken file is counted, not fatal
        if hasattr(dataset, "__len__"):
            count = len(dataset)
            order = (np.random.default_rng(seed).choice(count, max_images, replace=False) if count > max_images
                     else np.arange(count))
            rows: Iterable[dict] = (dataset[int(i)] for i in order)
        else:
            rows = (row for _, row in zip(range(max_images), dataset))
        images, failed = [], 0
        for row in rows:
            try:
                images.append(decode_image(row[image_column], **decode_options))
            except ImageDecodeError:
                failed += 1
        if failed:
            logger.warning("background swap: %d of %d bank rows did not decode and are not in the bank", failed,
                           failed + len(images))
        return cls.from_images(images, probability, mask_size)

    def __repr__(self) -> str:
        return (f"BackgroundSwap(p={self.probability}, {len(self.backgrounds)} backgrounds, "
                f"mask_size={self.mask_size})")

    def mask(self, image: Image.Image) -> np.ndarray:
        """Boolean ``[mask_size, mask_size]`` foreground mask of ``image`` (cached)."""
        key = content_key(image)
        packed = self._masks.get(key)
        if packed is None:
            packed = np.packbits(foreground_masks([image], self.mask_size)[0])
            if len(self._masks) < self.MAX_CACHED:  # bounded: a large stream would otherwise fill the memory
                self._masks[key] = packed
        return np.unpackbits(packed)[: self.mask_size**2].reshape(self.mask_size, self.mask_size).astype(bool)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.for_image(image)()

    def _draws(self, image: Image.Image) -> Callable[[], tuple[int, Image.Image] | None]:
        """Per call (one per view): the two draws — always both (coin, background index), so the stream does not
        depend on the coin — and, when the view is swapped, ``(index, alpha)``: the image's mask as an 8-bit image
        at mask size, looked up once, by the first call that swaps. None: the view keeps its background (the coin,
        or no usable foreground: a swap would drop the content)."""
        alpha: Image.Image | None = None
        found = True

        def draw() -> tuple[int, Image.Image] | None:
            nonlocal alpha, found
            coin = torch.rand(1).item()
            index = int(torch.randint(len(self.backgrounds), (1,)).item())
            if coin >= self.probability or not found:
                return None
            if alpha is None:
                mask = self.mask(image)
                found = self.MIN_FOREGROUND <= mask.mean() <= self.MAX_FOREGROUND
                if not found:
                    return None
                alpha = Image.fromarray(mask.astype(np.uint8) * 255)
            return index, alpha

        return draw

    def for_image(self, image: Image.Image) -> Callable[[], Image.Image]:
        """A function returning a swap of ``image``, with draws of its own at each call (one per view)."""
        draw = self._draws(image)

        def swap() -> Image.Image:
            drawn = draw()
            if drawn is None:
                return image
            index, alpha = drawn
            background = Image.fromarray(self.backgrounds[index]).resize(image.size, Image.Resampling.BILINEAR)
            return Image.composite(image, background, alpha.resize(image.size, Image.Resampling.BILINEAR))

        return swap

    def _bank_image(self, index: int) -> Image.Image:
        """Bank entry ``index`` as a PIL image, kept (per worker) once made: the batched views cut every view's
        background from one, and re-wrapping the array each time cost as much as the cut."""
        cache = self.__dict__.setdefault("_bank_images", {})
        if index not in cache:
            cache[index] = Image.fromarray(self.backgrounds[index])
        return cache[index]

    def for_crops(self, image: Image.Image) -> Callable[[tuple[int, int, int, int], int, Image.Resampling],
                                                        tuple[np.ndarray, np.ndarray] | None]:
        """Like :meth:`for_image`, for a pipeline that crops first and composites later (the batched two-view
        views): the returned function takes a crop box of ``image`` (left, top, right, bottom), the output size
        and the resampling, makes the same two draws per call, and returns ``(alpha uint8 [size, size],
        background uint8 [size, size, 3])`` — the mask and the drawn background cut to that box, i.e. what
        :meth:`for_image`'s composite would show there — or None where that would leave the image as it is."""
        draw = self._draws(image)

        def swap_crop(box: tuple[int, int, int, int], size: int, resample: Image.Resampling):
            drawn = draw()
            if drawn is None:
                return None
            index, alpha = drawn

            def cut(part: Image.Image, resample: Image.Resampling) -> np.ndarray:  # the box in `part`'s own grid
                sx, sy = part.width / image.width, part.height / image.height
                return np.asarray(part.resize((size, size), resample,
                                              box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)))

            # alpha bilinear, as for_image resizes it
            return cut(alpha, Image.Resampling.BILINEAR), cut(self._bank_image(index), resample)

        return swap_crop
