"""Detection batches with grounding prompts (Grounding DINO), reproducible per sample.

Rows in the COCO-style layout of Hub detection sets: an image and `objects = {"bbox": [[x, y, w, h], ...] (pixels,
top-left corner), "category": [class, ...]}` with `category` a ClassLabel. Per image (in the DataLoader workers):
the detector's own image processor (resize + normalise, so training and inference see the same pixels). Per batch
(the collate): a prompt of "."-separated phrases — every category name, in an order drawn from the sample's seed
(`shuffle_phrases`), so the model has to read the phrase rather than learn its position — the targets
(`class_labels` = each object's phrase index in that prompt, `boxes` normalised (cx, cy, w, h)), and a horizontal
flip drawn from the same seed. A resumed run therefore sees the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from .loader import SampleCollator, build_loader

__all__ = ["DetectionCollator", "DetectionTransform", "build_detection_loader", "phrase_prompt"]

OBJECTS_FIELD = "objects"


def phrase_prompt(phrases: Sequence[str]) -> str:
    """Grounding DINO's prompt form: lower-case phrases, each closed by " ." (`"circle . star ."`)."""
    return " ".join(f"{p.replace('_', ' ').strip().lower()} ." for p in phrases)


class DetectionTransform:
    """`image -> {"pixel_values": [3, H, W], "orig_size": (h, w)}` through the detector's image processor
    (deterministic: the randomness of this pipeline is in the collate)."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Image.Image, seed: int | None = None) -> dict[str, Any]:
        pixels = self.image_processor(images=image, return_tensors="pt", do_pad=False)["pixel_values"][0]
        return {"pixel_values": pixels, "orig_size": (image.height, image.width)}


class DetectionCollator:
    """Kept samples → `{"pixel_values", "pixel_mask", "input_ids", "attention_mask"(, "token_type_ids"), "labels"}`
    (see the module docstring); wrapped in `SampleCollator`, which drops and counts undecodable images."""

    def __init__(self, tokenizer: Any, class_names: Sequence[str], max_length: int = 256, *, shuffle_phrases: bool = True,
                 horizontal_flip: bool = True, bbox_key: str = "bbox", category_key: str = "category") -> None:
        self.tokenizer, self.class_names, self.max_length = tokenizer, list(class_names), max_length
        self.shuffle_phrases, self.horizontal_flip = shuffle_phrases, horizontal_flip
        self.bbox_key, self.category_key = bbox_key, category_key

    def _sample(self, sample: dict[str, Any]) -> tuple[torch.Tensor, str, dict[str, torch.Tensor]]:
        rng = np.random.default_rng(int(sample["sample_seed"]))
        n = len(self.class_names)
        order = rng.permutation(n) if self.shuffle_phrases else np.arange(n)
        position = np.empty(n, dtype=np.int64)
        position[order] = np.arange(n)  # class → its phrase index in this prompt
        objects = sample[OBJECTS_FIELD]
        h, w = sample["orig_size"]
        xywh = torch.tensor(objects[self.bbox_key], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.stack([(xywh[:, 0] + xywh[:, 2] / 2) / w, (xywh[:, 1] + xywh[:, 3] / 2) / h,
                             xywh[:, 2] / w, xywh[:, 3] / h], dim=1).clamp(0, 1)
        pixels = sample["pixel_values"]
        if self.horizontal_flip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
            boxes[:, 0] = 1 - boxes[:, 0]
        labels = torch.as_tensor(position[np.asarray(objects[self.category_key], dtype=np.int64)], dtype=torch.long)
        return pixels, phrase_prompt([self.class_names[i] for i in order]), {"class_labels": labels, "boxes": boxes}

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        pixels, prompts, labels = zip(*(self._sample(s) for s in samples))
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        pixel_values = torch.stack(pixels)
        batch = {"pixel_values": pixel_values,
                 "pixel_mask": torch.ones(pixel_values.shape[0], *pixel_values.shape[-2:], dtype=torch.long),
                 "labels": list(labels)}
        batch.update({k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
        return batch


def build_detection_loader(
    dataset: datasets.Dataset | datasets.IterableDataset,
    transform: DetectionTransform,
    collator: DetectionCollator,
    batch_size: int,
    *,
    objects_column: str = "objects",
    **loader_options: Any,
) -> DataLoader:
    """`training.data.loader.build_loader` with the detection transform and collate; `objects_column` holds the
    boxes and categories of each row."""
    return build_loader(dataset, transform, SampleCollator(collator), batch_size,
                        columns={objects_column: OBJECTS_FIELD}, **loader_options)
