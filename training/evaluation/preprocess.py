"""Image processors for evaluation: the DINOv2 default, size overrides, and the worker/device split of one.

The default is the DINOv2 evaluation preprocessing (resize the shortest edge to 256/224 of the crop, bicubic,
center crop, ImageNet mean/std). A model folder's own processor is used when it has one.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import Tensor

from modeling.convert import dinov2_image_processor


def default_image_processor(image_size: int = 224) -> Any:
    """DINOv2 evaluation preprocessing: resize shortest edge to 256/224·size (bicubic), center crop, ImageNet norm
    (the released models' processor, scaled to `image_size`)."""
    return dinov2_image_processor(crop_size=image_size, resize_size=int(round(image_size * 256 / 224)))


def with_image_size(processor: Any, image_size: int) -> Any:
    """Copy of `processor` producing `image_size` square crops (resize keeps the processor's resize/crop ratio)."""
    d = processor.to_dict()
    size = dict(d.get("size") or {})
    crop = dict(d.get("crop_size") or {})
    if d.get("do_center_crop") and crop.get("height"):
        ratio = (size.get("shortest_edge") or crop["height"]) / crop["height"]
        if "shortest_edge" in size and size["shortest_edge"]:
            d["size"] = {"shortest_edge": int(round(image_size * ratio))}
        else:
            d["size"] = {"height": image_size, "width": image_size}
        d["crop_size"] = {"height": image_size, "width": image_size}
    else:
        d["size"] = {"height": image_size, "width": image_size}
    try:
        return type(processor).from_dict(d)
    except Exception:
        out = copy.deepcopy(processor)
        out.size, out.crop_size = d["size"], d.get("crop_size")
        return out


def load_image_processor(model: str | os.PathLike | None, image_size: int | None = None) -> Any:
    """The model folder's image processor (AutoImageProcessor) if it has one, else `default_image_processor`.

    `image_size` overrides the crop size (for small models); it must be a multiple of the patch size.
    """
    processor = None
    if model is not None and not isinstance(model, torch.nn.Module):
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(str(model))
        except (OSError, ValueError, KeyError, TypeError):
            processor = None
    if processor is None:
        return default_image_processor(image_size or 224)
    return with_image_size(processor, image_size) if image_size else processor


def processor_output_size(processor: Any) -> tuple[int, int] | None:
    """(height, width) a processor produces when it crops or resizes to a fixed size, else None."""
    d = processor.to_dict() if hasattr(processor, "to_dict") else {}
    crop, size = d.get("crop_size") or {}, d.get("size") or {}
    if d.get("do_center_crop") and crop.get("height") and crop.get("width"):
        return int(crop["height"]), int(crop["width"])
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    return None


class SplitPreprocessing:
    """An image processor split in two: geometry in the DataLoader workers, rescale + normalise on the device.

    Workers call the processor with `do_rescale=False, do_normalize=False` (decode, RGB, resize, center crop →
    uint8 tensors: 4x less to pickle and copy), and `normalize(batch)` then applies the processor's own
    `rescale_factor` / `image_mean` / `image_std` on the device. `SplitPreprocessing.build(processor)` checks on
    a few random images that the two halves reproduce the processor's output (max |Δ| ≤ 1e-4) and returns None
    otherwise, in which case the workers run the whole processor.
    """

    def __init__(self, processor: Any):
        self.processor = processor
        rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else 1.0
        if getattr(processor, "do_normalize", False):
            mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        else:
            mean, std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
        # (x * rescale - mean) / std as one fused x * scale + shift
        self.scale, self.shift = rescale / std, -mean / std

    def geometry(self, images: list[Any]) -> Tensor:
        return self.processor(images=images, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]

    def normalize(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.float()
        return torch.addcmul(self.shift.to(x.device), x, self.scale.to(x.device))

    @classmethod
    def build(cls, processor: Any) -> SplitPreprocessing | None:
        needed = ("do_rescale", "do_normalize", "rescale_factor", "image_mean", "image_std")
        if not all(hasattr(processor, a) for a in needed):
            return None
        try:
            split = cls(processor)
            from PIL import Image

            g = torch.Generator().manual_seed(0)
            images = [
                Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
                for h, w in ((37, 53), (61, 40))
            ]
            full = processor(images=images, return_tensors="pt")["pixel_values"]
            raw = split.geometry(images)
            if raw.shape != full.shape or not torch.allclose(split.normalize(raw), full.float(), atol=1e-4, rtol=0):
                return None
            return split
        except Exception:  # any processor that does not take the overrides: run it whole in the workers
            return None
