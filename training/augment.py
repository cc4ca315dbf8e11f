"""DINOv2 multi-crop augmentation, reproducible per sample.

The pipeline is the official one (``dinov2/data/augmentations.py``), built from the same torchvision (v1)
transforms in the same order, so for one torch seed it draws the same random numbers and returns the same crops:

* 2 global crops: ``RandomResizedCrop(global_size, scale=global_scale, bicubic)`` + horizontal flip p 0.5
  (``horizontal_flip=False`` leaves the flips out, as DINOv3's high-resolution adaptation does);
  n local crops: the same with ``local_size`` / ``local_scale``.
* every crop: colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 = ``hue``) with p 0.8, grayscale p 0.2,
  Gaussian blur (kernel 9, sigma 0.1..2.0) with a per-crop probability (below); global crop 2 also gets
  solarize (threshold 128) p 0.2; then ``ToTensor`` and ImageNet mean/std normalisation.

Blur probabilities (``blur=``):

* ``"intended"`` (default): 1.0 / 0.1 / 0.5 for global 1 / global 2 / locals, the values of the DINO and DINOv2
  papers and of the original DINO code.
* ``"official"``: 0.0 / 0.9 / 0.5, what the official DINOv2 code actually applies. Its ``GaussianBlur(p)`` is a
  ``transforms.RandomApply`` subclass that passes ``1 - p`` on as RandomApply's ``p`` (its comment says
  torchvision uses "1 - probability to return the original image"). But RandomApply's ``p`` is the probability
  of *applying* the transform (``forward`` returns the input untouched when ``p < torch.rand(1)``), so
  ``GaussianBlur(p=1.0)`` on global crop 1 never blurs, ``GaussianBlur(p=0.1)`` on global crop 2 blurs 90 % of
  the time, and the locals' 0.5 is unaffected. Use this to reproduce official runs exactly.

Reproducibility: ``augmentation(image, seed=s)`` runs the transforms under a forked torch CPU RNG seeded with
``s``, so the crops depend only on ``s`` and the image, not on which DataLoader worker runs them or on what ran
before. The datasets in ``training.data`` derive ``s = derive_seed(seed, epoch, sample_index)``, which is what
makes a resumed run see exactly the crops of the original one. (torchvision's v1 transforms draw only from
torch's default CPU generator, never from Python's ``random`` or NumPy, so forking that one generator suffices.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from modeling.convert import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "BLUR_PROBABILITIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MultiCropAugmentation",
    "derive_seed",
]


# (global crop 1, global crop 2, local crops): probability that the crop is blurred. See the module docstring.
BLUR_PROBABILITIES: dict[str, tuple[float, float, float]] = {
    "intended": (1.0, 0.1, 0.5),
    "official": (0.0, 0.9, 0.5),
}


def derive_seed(*values: int) -> int:
    """A well-mixed 64-bit seed from a few integers, e.g. ``derive_seed(seed, epoch, index)``.

    ``np.random.SeedSequence`` hashes its inputs, so neighbouring indices or epochs give unrelated streams (a plain
    ``seed + index`` would make sample i of epoch e+1 repeat sample i+1 of epoch e). Negative values wrap mod 2**64.
    """
    entropy = [int(v) % 2**64 for v in values]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def _blur(probability: float) -> transforms.RandomApply:
    # Always a RandomApply, even at p 0 or 1: it draws one number either way, which keeps the random stream
    # aligned with the official pipeline in both blur modes.
    return transforms.RandomApply([transforms.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=probability)


class MultiCropAugmentation:
    """DINOv2 multi-crop: ``image -> {"global_crops": [t1, t2], "local_crops": [t, ...]}`` (normalised tensors).

    Global crops are ``[3, global_size, global_size]``, local crops ``[3, local_size, local_size]``. The keyword
    names match the ``crops`` config section, so ``MultiCropAugmentation(**dataclasses.asdict(cfg.crops))`` works.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 98,
        local_number: int = 8,
        global_scale: Sequence[float] = (0.32, 1.0),
        local_scale: Sequence[float] = (0.05, 0.32),
        blur: Literal["intended", "official"] = "intended",
        horizontal_flip: bool = True,
        hue: float = 0.1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if blur not in BLUR_PROBABILITIES:
            raise ValueError(f"crops.blur must be one of {sorted(BLUR_PROBABILITIES)}, got {blur!r}")
        if local_number < 0:
            raise ValueError(f"crops.local_number must be >= 0, got {local_number}")
        self.global_size = global_size
        self.local_size = local_size
        self.local_number = local_number
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.blur = blur
        self.horizontal_flip = horizontal_flip
        self.hue = hue
        blur_global1, blur_global2, blur_local = BLUR_PROBABILITIES[blur]

        bicubic = transforms.InterpolationMode.BICUBIC
        # DINOv3's high-resolution adaptation turns flips off (`crops.horizontal_flips: false`).
        flip = [transforms.RandomHorizontalFlip(p=0.5)] if horizontal_flip else []
        self.geometric_global = transforms.Compose(
            [transforms.RandomResizedCrop(global_size, scale=self.global_scale, interpolation=bicubic), *flip]
        )
        self.geometric_local = transforms.Compose(
            [transforms.RandomResizedCrop(local_size, scale=self.local_scale, interpolation=bicubic), *flip]
        )
        colour = transforms.Compose(
            [
                transforms.RandomApply(
                    [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=hue)], p=0.8
                ),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)])
        self.global1 = transforms.Compose([colour, _blur(blur_global1), to_tensor])
        self.global2 = transforms.Compose(
            [colour, _blur(blur_global2), transforms.RandomSolarize(threshold=128, p=0.2), to_tensor]
        )
        self.local = transforms.Compose([colour, _blur(blur_local), to_tensor])

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(global 2x{self.global_size} scale={self.global_scale}, "
            f"local {self.local_number}x{self.local_size} scale={self.local_scale}, blur={self.blur!r} "
            f"{BLUR_PROBABILITIES[self.blur]}, horizontal_flip={self.horizontal_flip})"
        )

    def _crops(self, image: Image.Image) -> dict[str, list[torch.Tensor]]:
        # Order of draws = official order: global 1, global 2, then the locals one after another.
        global1 = self.global1(self.geometric_global(image))
        global2 = self.global2(self.geometric_global(image))
        local = [self.local(self.geometric_local(image)) for _ in range(self.local_number)]
        return {"global_crops": [global1, global2], "local_crops": local}

    def __call__(self, image: Image.Image, seed: int | None = None) -> dict[str, list[torch.Tensor]]:
        """Crop ``image`` (an RGB PIL image). With ``seed``, the result depends only on (seed, image)."""
        if seed is None:
            return self._crops(image)
        # fork_rng restores the caller's CPU RNG afterwards; devices=[] leaves CUDA RNGs alone (seeding the
        # default CPU generator directly, not torch.manual_seed, so CUDA generators are never touched either).
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return self._crops(image)
