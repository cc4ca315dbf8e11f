"""Image + text batches (text alignment: LiT, dino.txt), reproducible per sample.

Per image (in the DataLoader workers): a random resized crop (open_clip's training transform: scale 0.9–1.0,
bicubic, no flip by default) normalised with the image tower's mean/std, and whether the image is black and white.
Per batch (the collate, also in the workers): one caption per image — a random one of the row's captions (a string
or a list), or one generated from the row's class label (`training.captions`) — then the tokenizer, padded to the
longest caption of the batch. Every random choice comes from the sample's seed, `derive_seed(seed, epoch, index)`,
so a resumed run sees the same crops and the same captions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import datasets
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from ..captions import caption_for
from .loader import SampleCollator, build_loader

__all__ = ["CaptionCollator", "ImageTextTransform", "build_image_text_loader", "choose_caption", "is_grayscale"]

# Sample fields the loader copies from the row (`columns=`): a caption column, or a class label.
TEXT_FIELD = "text"
LABEL_FIELD = "label"


def is_grayscale(image: Image.Image, tolerance: int = 8) -> bool:
    """Whether an RGB image is black and white: its channels differ by at most `tolerance` on a small thumbnail."""
    small = image.convert("RGB").resize((16, 16))
    pixels = torch.tensor(list(small.getdata()), dtype=torch.int16)
    return bool((pixels.max(dim=1).values - pixels.min(dim=1).values).max() <= tolerance)


class ImageTextTransform:
    """`image -> {"pixel_values": [3, size, size], "grayscale": bool}`; with `seed` the crop depends only on
    (seed, image)."""

    def __init__(self, size: int, scale: Sequence[float] = (0.9, 1.0), mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), horizontal_flip: bool = False) -> None:
        self.size, self.scale = size, tuple(scale)
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=self.scale, interpolation=transforms.InterpolationMode.BICUBIC),
            *([transforms.RandomHorizontalFlip()] if horizontal_flip else []),
            transforms.ToTensor(),
            transforms.Normalize(mean=list(mean), std=list(std)),
        ])

    def __repr__(self) -> str:
        return f"ImageTextTransform(size={self.size}, scale={self.scale})"

    def __call__(self, image: Image.Image, seed: int | None = None) -> dict[str, Any]:
        if seed is None:
            pixels = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(seed)
                pixels = self.transform(image)
        return {"pixel_values": pixels, "grayscale": is_grayscale(image)}


def choose_caption(value: Any, seed: int) -> str:
    """One caption of a row's text value (a string, or a list of strings: one drawn with `seed`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[random.Random(seed).randrange(len(value))]
    raise ValueError(f"a caption must be a string or a non-empty list of strings, got {type(value).__name__}: "
                     f"{str(value)[:80]!r} (data: captions.text_column)")


class CaptionCollator:
    """Kept samples → `{"pixel_values", "input_ids", "attention_mask"(, "token_type_ids")}` (wrapped in
    `SampleCollator`, which drops and counts undecodable images). Captions come from the `text` field, or from the
    `label` field through `class_names` and `training.captions` when `class_names` is given."""

    def __init__(self, tokenizer: Any, max_length: int = 64, class_names: Sequence[str] | None = None) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.class_names = list(class_names) if class_names is not None else None

    def caption(self, sample: dict[str, Any]) -> str:
        seed = int(sample["sample_seed"])
        if self.class_names is None:
            return choose_caption(sample[TEXT_FIELD], seed)
        return caption_for(self.class_names[int(sample[LABEL_FIELD])], seed, sample.get("grayscale"))

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [self.caption(s) for s in samples]
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {"pixel_values": torch.stack([s["pixel_values"] for s in samples])}
        batch.update({k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
        return batch


def build_image_text_loader(
    dataset: datasets.Dataset | datasets.IterableDataset,
    transform: ImageTextTransform,
    collator: CaptionCollator,
    batch_size: int,
    *,
    text_column: str | None,
    label_column: str | None = None,
    **loader_options: Any,
) -> DataLoader:
    """`training.data.loader.build_loader` with the image-text transform and collate. Exactly one of `text_column`
    (captions) and `label_column` (class labels, with `collator.class_names`) names the row column to pass on."""
    if (text_column is None) == (label_column is None):
        raise ValueError("pass exactly one of text_column (captions) and label_column (captions from class names)")
    columns = {text_column: TEXT_FIELD} if text_column is not None else {label_column: LABEL_FIELD}
    return build_loader(dataset, transform, SampleCollator(collator), batch_size, columns=columns, **loader_options)
