"""Two augmented views per image (MoCo v3, Barlow Twins, DenseCL), reproducible per sample.

The views follow the BYOL recipe the three references use (moco-v3 `main_moco.py`, barlowtwins `main.py`), an
asymmetric pair of one pipeline:

    RandomResizedCrop(size, scale) → horizontal flip p 0.5 → colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8 →
    grayscale p 0.2 → Gaussian blur (σ ∈ [0.1, 2]) with p 1.0 / 0.1 → solarize with p 0.0 / 0.2 →
    ToTensor → ImageNet mean/std

(view 1 / view 2 where two numbers are given). DenseCL's ImageNet recipe is the same with saturation 0.4, blur
p 0.5 on both views and no solarize; every number is a `ViewsConfig` field, so recipes set them.

The blur is PIL's `ImageFilter.GaussianBlur(radius=σ)`, the references' op (torchvision's `GaussianBlur` uses a
fixed, truncated kernel instead). Its σ and every other random choice are drawn from torch's CPU generator, which
`TwoViewAugmentation(image, seed=s)` forks and seeds with `s` — the references draw σ from Python's `random`,
which no per-sample seed would reach — so the views depend only on (seed, image): the loader derives
`s = derive_seed(seed, epoch, index)`, and a resumed run sees exactly the views of the original one.

`batched_color=True` (config `views.batched_color`) splits the work for small images, where the per-image PIL ops
cost more than a small CNN's step: each image gets its crop box (torchvision's rule, `random_resized_crop_box`),
flip, background-swap draws and colour parameters here, per sample and seeded as above; the crop (and the swap's
mask and background, cut to the same box) is resized in PIL; the composite and the photometric ops run once per
batch in the collate (training/data/batched_color.py). Same distributions, other random streams than the PIL
pipeline, so the two do not give the same views for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torchvision import transforms

from modeling.convert import IMAGENET_MEAN, IMAGENET_STD

from ..config import check
from .background_swap import BackgroundSwap
from .batched_color import BatchedColor, draw_color_params
from .loader import SampleCollator, build_loader

__all__ = ["TwoViewAugmentation", "ViewsConfig", "build_two_view_loader", "collate_two_views"]


@dataclass
class ViewsConfig:
    """The photometric half of the two-view augmentation (config section `views`; per view where a pair is
    given). Crop size, crop scale and flips come from the shared `crops` section (`global_size`, `global_scale`,
    `horizontal_flip`), which the end-of-run kNN also reads for its image size."""

    color_jitter: tuple[float, float, float, float] = field(default=(0.4, 0.4, 0.2, 0.1), metadata=check(ge=0))
    color_jitter_probability: float = field(default=0.8, metadata=check(ge=0, le=1))
    grayscale_probability: float = field(default=0.2, metadata=check(ge=0, le=1))
    blur_probability: tuple[float, float] = field(default=(1.0, 0.1), metadata=check(ge=0, le=1))
    blur_sigma: tuple[float, float] = field(default=(0.1, 2.0), metadata=check(gt=0, ordered=True))
    solarize_probability: tuple[float, float] = field(default=(0.0, 0.2), metadata=check(ge=0, le=1))
    # bicubic: Barlow Twins (and DINOv2's crops); bilinear: MoCo v3 and DenseCL (torchvision's default)
    interpolation: str = field(default="bicubic", metadata=check(choices=("bicubic", "bilinear")))
    # probability, per view, of pasting the image's salient foreground onto another image's background
    # (training/data/background_swap.py): small sets of objects on varied backgrounds; 0 = off (the references)
    background_swap: float = field(default=0.0, metadata=check(ge=0, le=1))
    # false: every op per image in PIL (the references'); true: crop and flip per image in PIL, the photometric ops
    # once per batch on tensors with per-image parameters (training/data/batched_color.py: less data time on small
    # images, docs/small_data.md finding 15; torchvision's tensor ops, a true Gaussian blur)
    batched_color: bool = False
    # with batched_color and background_swap: each crop's centre drawn inside the bounding box of the image's
    # salient foreground (the swap's mask), so crops rarely miss the object — ContrastiveCrop (Peng et al., 2022)
    object_centred_crops: bool = False


class RandomPILGaussianBlur:
    """With probability `p`, PIL's Gaussian blur with σ uniform in `sigma` (the references' `GaussianBlur`), drawing
    from torch's generator (one number for the coin, one for σ when it applies, like `RandomApply`)."""

    def __init__(self, p: float, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        self.p, self.sigma = p, tuple(sigma)

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.p < torch.rand(1).item():
            return image
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"RandomPILGaussianBlur(p={self.p}, sigma={self.sigma})"


class TwoViewAugmentation:
    """``image -> {"view1": t1, "view2": t2}``, normalised ``[3, size, size]`` tensors (see the module docstring)."""

    def __init__(
        self,
        size: int = 224,
        scale: Sequence[float] = (0.08, 1.0),
        horizontal_flip: bool = True,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_probability: float = 0.8,
        grayscale_probability: float = 0.2,
        blur_probability: Sequence[float] = (1.0, 0.1),
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_probability: Sequence[float] = (0.0, 0.2),
        interpolation: Literal["bicubic", "bilinear"] = "bicubic",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        background_swap: BackgroundSwap | None = None,
        batched_color: bool = False,
        object_centred_crops: bool = False,
    ) -> None:
        if len(blur_probability) != 2 or len(solarize_probability) != 2:
            raise ValueError("blur_probability and solarize_probability take one value per view, e.g. [1.0, 0.1]")
        mode = {"bicubic": transforms.InterpolationMode.BICUBIC, "bilinear": transforms.InterpolationMode.BILINEAR}
        if interpolation not in mode:
            raise ValueError(f"views.interpolation must be 'bicubic' or 'bilinear', got {interpolation!r}")
        self.size, self.scale = size, tuple(scale)
        self.background_swap = background_swap
        brightness, contrast, saturation, hue = color_jitter
        common = [
            transforms.RandomResizedCrop(size, scale=self.scale, interpolation=mode[interpolation]),
            *([transforms.RandomHorizontalFlip(p=0.5)] if horizontal_flip else []),
            transforms.RandomApply([transforms.ColorJitter(brightness, contrast, saturation, hue)],
                                   p=color_jitter_probability),
            transforms.RandomGrayscale(p=grayscale_probability),
        ]
        self.batched_color = batched_color
        if object_centred_crops and not (batched_color and background_swap is not None):
            raise ValueError("views.object_centred_crops needs views.batched_color: true and views.background_swap > 0 "
                             "(the crops are centred on the swap's foreground masks)")
        self.object_centred_crops = object_centred_crops
        if batched_color:  # crops here, the photometric ops (and the swap's composite) in `collate`
            self.horizontal_flip = horizontal_flip
            self._resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[interpolation]
            self._color = [
                dict(color_jitter=color_jitter, jitter_probability=color_jitter_probability,
                     grayscale_probability=grayscale_probability, blur_probability=blur,
                     blur_sigma=tuple(blur_sigma), solarize_probability=solarize)
                for blur, solarize in zip(blur_probability, solarize_probability)
            ]
            self.views = []
            self.collate = SampleCollator(_BatchedViews(BatchedColor(mean, std, max(blur_sigma))))
            return
        self.collate = collate_two_views
        to_tensor = [transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)]
        self.views = [
            transforms.Compose([*common, RandomPILGaussianBlur(blur, blur_sigma),
                                transforms.RandomSolarize(threshold=128, p=solarize), *to_tensor])
            for blur, solarize in zip(blur_probability, solarize_probability)
        ]

    def __repr__(self) -> str:
        swap = f", background_swap={self.background_swap}" if self.background_swap is not None else ""
        color = f", batched colour {self._color}" if self.batched_color else ""
        return f"TwoViewAugmentation(size={self.size}, scale={self.scale}, views={self.views}{swap}{color})"

    def _views(self, image: Image.Image) -> dict[str, torch.Tensor]:
        if self.batched_color:
            return self._crops(image)
        if self.background_swap is None:
            return {"view1": self.views[0](image), "view2": self.views[1](image)}
        swap = self.background_swap.for_image(image)  # each view its own background, drawn before its crop
        view1 = self.views[0](swap())
        view2 = self.views[1](swap())
        return {"view1": view1, "view2": view2}

    def _foreground_box(self, image: Image.Image) -> tuple[float, float, float, float] | None:
        """Bounding box (left, top, right, bottom, image pixels) of the swap's foreground mask, or None where the
        swap finds no usable foreground (then crops are placed as usual)."""
        swap = self.background_swap
        mask = swap.mask(image)
        if not swap.MIN_FOREGROUND <= mask.mean() <= swap.MAX_FOREGROUND:
            return None
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        sy, sx = image.height / mask.shape[0], image.width / mask.shape[1]
        return cols[0] * sx, rows[0] * sy, (cols[-1] + 1) * sx, (rows[-1] + 1) * sy

    def _crops(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """`batched_color`: per view the uint8 crop (flipped), the swap's alpha and background cut to the same box
        (alpha 255 / background 0 where nothing is swapped) and the colour parameters; `collate` does the rest."""
        swap = self.background_swap.for_crops(image) if self.background_swap is not None else None
        region = self._foreground_box(image) if self.object_centred_crops else None
        out = {}
        for i in (1, 2):
            left, top, width, height = random_resized_crop_box(image.width, image.height, self.scale)
            if self.object_centred_crops:
                u, v = torch.rand(2).tolist()  # drawn whether or not a box was found: a fixed number of draws
                if region is not None:
                    left, top = centre_in_region(width, height, region, (u, v), image.width, image.height)
            box = (left, top, left + width, top + height)
            flip = self.horizontal_flip and torch.rand(1).item() < 0.5
            parts = {"": np.asarray(image.resize((self.size, self.size), self._resample, box=box))}
            if swap is not None:
                cut = swap(box, self.size, self._resample)
                parts["_alpha"], parts["_background"] = cut if cut is not None else (
                    np.full((self.size, self.size), 255, np.uint8), np.zeros((self.size, self.size, 3), np.uint8))
            for suffix, array in parts.items():
                array = array[:, ::-1] if flip else array
                array = array[..., None] if array.ndim == 2 else array
                out[f"view{i}{suffix}"] = torch.from_numpy(np.array(array)).permute(2, 0, 1)  # a writable copy
            out[f"view{i}_color"] = draw_color_params(**self._color[i - 1])
        return out

    def __call__(self, image: Image.Image, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Both views of ``image`` (an RGB PIL image). With ``seed``, the result depends only on (seed, image)."""
        if seed is None:
            return self._views(image)
        with torch.random.fork_rng(devices=[]):  # the caller's generator is untouched; CUDA ones too
            torch.random.default_generator.manual_seed(seed)
            return self._views(image)


def _stack_views(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {"view1": torch.stack([s["view1"] for s in samples]), "view2": torch.stack([s["view2"] for s in samples])}


# The batch: `view1`, `view2` `[B, 3, H, W]` (image i's two views at row i), `batch_size`, `num_skipped`.
collate_two_views = SampleCollator(_stack_views)


class _BatchedViews:
    """Collate of `batched_color` samples: stack the uint8 crops, paste them on their swapped backgrounds (if
    any), run the photometric ops on the batch."""

    def __init__(self, color: BatchedColor) -> None:
        self.color = color

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = {}
        for name in ("view1", "view2"):
            x = torch.stack([s[name] for s in samples])
            if f"{name}_alpha" in samples[0]:
                alpha = torch.stack([s[f"{name}_alpha"] for s in samples]).float() / 255
                background = torch.stack([s[f"{name}_background"] for s in samples])
                x = (alpha * x + (1 - alpha) * background) / 255
            out[name] = self.color(x, torch.stack([s[f"{name}_color"] for s in samples]))
        return out


def centre_in_region(width: int, height: int, region: Sequence[float], uv: Sequence[float], image_width: int,
                     image_height: int) -> tuple[int, int]:
    """(left, top) of a ``width`` x ``height`` crop centred at the point ``uv`` (fractions) of ``region`` (left, top,
    right, bottom), moved the least needed to stay inside the image."""
    x0, y0, x1, y1 = region
    left = round(x0 + uv[0] * (x1 - x0) - width / 2)
    top = round(y0 + uv[1] * (y1 - y0) - height / 2)
    return min(max(left, 0), image_width - width), min(max(top, 0), image_height - height)


def random_resized_crop_box(width: int, height: int, scale: Sequence[float],
                            ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(left, top, width, height)``: torchvision's `RandomResizedCrop.get_params` (ten tries at an area in
    ``scale`` and an aspect ratio log-uniform in ``ratio``, else the largest centred crop of clamped ratio), its
    draws taken from torch's default generator in one call of fixed size — per-call overhead was most of a small
    image's crop time."""
    draws = torch.rand(10, 4).tolist()
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for u_area, u_ratio, u_top, u_left in draws:
        target = area * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = math.exp(log_low + u_ratio * (log_high - log_low))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u_left * (width - w + 1)), int(u_top * (height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def build_two_view_loader(
    dataset: datasets.Dataset | datasets.IterableDataset,
    augmentation: TwoViewAugmentation,
    batch_size: int,
    **loader_options: Any,
) -> DataLoader:
    """:func:`training.data.loader.build_loader` with the two-view augmentation and its collate (same options:
    `image_column`, `seed`, `num_replicas`, `rank`, `num_workers`, `shuffle_buffer_size`, ...)."""
    return build_loader(dataset, augmentation, augmentation.collate, batch_size, **loader_options)
