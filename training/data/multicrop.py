"""The multi-crop pipeline (DINO / iBOT): ``MultiCropAugmentation`` as the per-sample transform and
:class:`MultiCropCollator` as the collate, on the generic loader (:mod:`training.data.loader`).

* a sample is ``{"global_crops": [...], "local_crops": [...], "sample_seed": int}`` (plus ``"resolution"`` with one
  augmentation per resolution), or a ``SkippedSample`` ``(name, reason)`` for an unusable image;
* :class:`MultiCropCollator` stacks the crops crop-major and draws the iBOT masks for the global crops from a
  ``random.Random`` seeded by the seeds of the samples in the batch (identical on resume);
* :func:`build_dataloader` is the convenience that builds the whole training DataLoader.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from training.augment import derive_seed
from training.masking import BlockMaskGenerator, sample_batch_masks

from .files import AllowPaths
from .loader import ImageDataset, ImageStream, Sample, build_loader, drop_missing, skipped_entries

__all__ = ["MultiCropCollator", "MultiCropDataset", "MultiCropStream", "build_dataloader", "collate_multicrop"]

# Mixed into seeds so the mask stream is unrelated to the augmentation streams of the same samples.
_MASK_STREAM = 0x6D61736B

Augmentation = Callable[..., dict[str, list[torch.Tensor]]]


class MultiCropDataset(ImageDataset):
    """Map-style multi-crop view of a ``datasets.Dataset``: :class:`ImageDataset` whose transform is a
    ``MultiCropAugmentation`` (or a list of them, one per resolution). ``ds[(epoch, index)]`` -> crops of image
    ``index`` or ``None``."""


class MultiCropStream(ImageStream):
    """Streaming multi-crop view of a ``datasets.IterableDataset``: :class:`ImageStream` whose transform is a
    ``MultiCropAugmentation`` (or a list of them, one per resolution)."""


class MultiCropCollator:
    """Collate multi-crop samples into the batch ``DinoForPretraining`` takes (picklable, runs in the workers).

    Output:

    * ``global_crops`` ``[2·B, 3, H, W]`` and ``local_crops`` ``[n_local·B, 3, h, w]`` (``None`` without local
      crops), both crop-major: all images' first crop, then all images' second crop, ... (as the official collate);
    * ``masks`` bool ``[2·B, num_patches]`` for the global crops, drawn over all 2·B global crops at once as in the
      official collate (``None`` when ``mask_generator`` is ``None``). Multi-resolution: pass one generator per
      resolution (a list); samples say which one applies in ``"resolution"``;
    * ``batch_size`` (B, images kept), ``num_skipped`` (samples dropped: unusable images) and ``skipped`` (their
      ``(image path or row id, reason code)``, e.g. ``("/data/x.jpg", "truncated")``);
    * multi-resolution only: ``log`` = ``{"global_size": H}``, so the loop logs which size each step drew.

    When every sample of a batch was dropped, the tensors are ``None`` and ``batch_size`` is 0: the loop must not
    step on it (and, with several processes, must agree on that with the others).
    """

    def __init__(
        self,
        mask_generator: BlockMaskGenerator | Sequence[BlockMaskGenerator] | None = None,
        mask_ratio_min_max: Sequence[float] = (0.1, 0.5),
        mask_sample_probability: float = 0.5,
    ) -> None:
        self.mask_generator = mask_generator
        self.mask_ratio_min_max = (float(mask_ratio_min_max[0]), float(mask_ratio_min_max[1]))
        self.mask_sample_probability = mask_sample_probability

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        kept, num_skipped = drop_missing(samples)
        batch: dict[str, Any] = {
            "global_crops": None,
            "local_crops": None,
            "masks": None,
            "batch_size": len(kept),
            "num_skipped": num_skipped,
            "skipped": skipped_entries(samples),
        }
        if not kept:
            return batch
        n_global = len(kept[0]["global_crops"])
        n_local = len(kept[0]["local_crops"])
        # Crop-major: index c * B + b holds crop c of image b.
        batch["global_crops"] = torch.stack([s["global_crops"][c] for c in range(n_global) for s in kept])
        if n_local:
            batch["local_crops"] = torch.stack([s["local_crops"][c] for c in range(n_local) for s in kept])
        if "resolution" in kept[0]:
            batch["log"] = {"global_size": int(batch["global_crops"].shape[-1])}
        if self.mask_generator is not None:
            generator = self.mask_generator
            if isinstance(generator, (list, tuple)):
                generator = generator[kept[0].get("resolution", 0)]
            # The mask RNG depends only on which samples (and epoch) are in the batch -> identical on resume.
            rng = random.Random(derive_seed(_MASK_STREAM, *(s["sample_seed"] for s in kept)))
            batch["masks"] = sample_batch_masks(
                generator,
                len(batch["global_crops"]),
                self.mask_ratio_min_max,
                self.mask_sample_probability,
                rng,
            )
        return batch


def collate_multicrop(
    samples: Sequence[Sample],
    mask_generator: BlockMaskGenerator | Sequence[BlockMaskGenerator] | None = None,
    mask_ratio_min_max: Sequence[float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
) -> dict[str, Any]:
    """Function form of :class:`MultiCropCollator` (use the class as a DataLoader ``collate_fn``)."""
    return MultiCropCollator(mask_generator, mask_ratio_min_max, mask_sample_probability)(samples)


def build_dataloader(
    dataset: datasets.Dataset | datasets.IterableDataset,
    augmentation: Augmentation | Sequence[Augmentation],
    batch_size: int,
    *,
    image_column: str = "image",
    mask_generator: BlockMaskGenerator | Sequence[BlockMaskGenerator] | None = None,
    mask_ratio_min_max: Sequence[float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    persistent_workers: bool | None = None,
    pin_memory: bool | None = None,
    prefetch_factor: int | None = None,
    shuffle_buffer_size: int = 0,
    resolution_probabilities: Sequence[float] | None = None,
    allow_paths: AllowPaths = None,
    decoded_cache_mb: float = 0.0,
) -> DataLoader:
    """The multi-crop training DataLoader: per-process batches of ``batch_size`` images, crops + masks in the workers.

    :func:`training.data.loader.build_loader` with the augmentation(s) as transform and a
    :class:`MultiCropCollator` as collate; see there for sharding, streams (``shuffle_buffer_size``), epochs,
    workers, resume and ``allow_paths`` (which local paths rows holding only a path may open).

    Multi-resolution (DINOv3 high-res adaptation): pass one augmentation and one mask generator per resolution
    (lists) and ``resolution_probabilities``; each batch draws one resolution (see ``choose_resolution``).
    """
    n_resolutions = len(augmentation) if isinstance(augmentation, (list, tuple)) else 1
    if isinstance(mask_generator, (list, tuple)) and len(mask_generator) != n_resolutions:
        raise ValueError(f"got {len(mask_generator)} mask generators for {n_resolutions} resolutions")
    return build_loader(
        dataset,
        augmentation,
        MultiCropCollator(mask_generator, mask_ratio_min_max, mask_sample_probability),
        batch_size,
        image_column=image_column,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
        num_workers=num_workers,
        persistent_workers=persistent_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        shuffle_buffer_size=shuffle_buffer_size,
        resolution_probabilities=resolution_probabilities,
        allow_paths=allow_paths,
        decoded_cache_mb=decoded_cache_mb,
    )
