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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torchvision import transforms

from modeling.convert import IMAGENET_MEAN, IMAGENET_STD

from ..config import check
from .background_swap import BackgroundSwap
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
        to_tensor = [transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)]
        self.views = [
            transforms.Compose([*common, RandomPILGaussianBlur(blur, blur_sigma),
                                transforms.RandomSolarize(threshold=128, p=solarize), *to_tensor])
            for blur, solarize in zip(blur_probability, solarize_probability)
        ]

    def __repr__(self) -> str:
        swap = f", background_swap={self.background_swap}" if self.background_swap is not None else ""
        return f"TwoViewAugmentation(size={self.size}, scale={self.scale}, views={self.views}{swap})"

    def _views(self, image: Image.Image) -> dict[str, torch.Tensor]:
        if self.background_swap is None:
            return {"view1": self.views[0](image), "view2": self.views[1](image)}
        swap = self.background_swap.for_image(image)  # each view its own background, drawn before its crop
        view1 = self.views[0](swap())
        view2 = self.views[1](swap())
        return {"view1": view1, "view2": view2}

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


def build_two_view_loader(
    dataset: datasets.Dataset | datasets.IterableDataset,
    augmentation: TwoViewAugmentation,
    batch_size: int,
    **loader_options: Any,
) -> DataLoader:
    """:func:`training.data.loader.build_loader` with the two-view augmentation and collate (same options:
    `image_column`, `seed`, `num_replicas`, `rank`, `num_workers`, `shuffle_buffer_size`, ...)."""
    return build_loader(dataset, augmentation, collate_two_views, batch_size, **loader_options)
