"""Data pipelines by name: a method's `data_pipeline()` names one, and the loop builds it here.

A pipeline turns a dataset (from `training.data.load_image_dataset`) into a sharded, resumable DataLoader whose
batches the method's `forward` takes. Every batch is a dict of model inputs plus two bookkeeping entries the
loop reads and removes: `batch_size` (images kept) and `num_skipped` (undecodable images dropped); an optional
`log` entry holds scalars to log (e.g. the crop size drawn for this batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.utils.data import DataLoader

from modeling.method import DataPipeline

from .augment import MultiCropAugmentation
from .config import to_dict
from .data import MultiCropCollator, build_dataloader
from .masking import BlockMaskGenerator
from .train_config import TrainConfig

PipelineBuilder = Callable[..., DataLoader]
_PIPELINES: dict[str, PipelineBuilder] = {}

# Entries of a batch that are not model inputs.
BOOKKEEPING_KEYS = ("batch_size", "num_skipped", "log")


def register_pipeline(name: str, builder: PipelineBuilder) -> None:
    """`builder(options, cfg, dataset, *, rank, world_size) -> DataLoader`."""
    _PIPELINES[name] = builder


def build_pipeline(spec: DataPipeline, cfg: TrainConfig, dataset: Any, *, rank: int, world_size: int) -> DataLoader:
    if spec.name not in _PIPELINES:
        raise ValueError(f"unknown data pipeline {spec.name!r}; registered: {sorted(_PIPELINES)}")
    return _PIPELINES[spec.name](spec.options, cfg, dataset, rank=rank, world_size=world_size)


# ---- multi-crop (DINO / iBOT) --------------------------------------------------------------------------------


def crop_pipelines(
    cfg: TrainConfig, patch: int, masks: bool
) -> tuple[list[MultiCropAugmentation], list[BlockMaskGenerator] | None, list[float] | None]:
    """Augmentation(s), iBOT mask generator(s) and resolution probabilities (None: one fixed resolution)."""
    crops = to_dict(cfg.crops)
    rows = crops.pop("resolutions")
    if not rows:
        rows, probabilities = [(cfg.crops.global_size, cfg.crops.local_size, 1.0)], None
    else:
        probabilities = [p for _, _, p in rows]
    augmentations, generators = [], []
    for global_size, local_size, _ in rows:
        for name, size in (("global", global_size), ("local", local_size)):
            if size % patch:
                raise ValueError(
                    f"{name} crop size {size} is not a multiple of the patch size {patch}: use "
                    f"{size // patch * patch} or {(size // patch + 1) * patch} (crops.{name}_size / crops.resolutions)"
                )
        augmentations.append(MultiCropAugmentation(**{**crops, "global_size": global_size, "local_size": local_size}))
        generators.append(BlockMaskGenerator.for_crop(global_size, patch))
    return augmentations, (generators if masks else None), probabilities


class _LogCropSize:
    """Collate wrapper (picklable, runs in the workers) that records the global crop size of each batch, so the
    multi-resolution phase logs which size every step drew."""

    def __init__(self, collate: MultiCropCollator) -> None:
        self.collate = collate

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        batch = self.collate(samples)
        if batch["global_crops"] is not None:
            batch["log"] = {"global_size": int(batch["global_crops"].shape[-1])}
        return batch


def _multicrop(options: dict[str, Any], cfg: TrainConfig, dataset: Any, *, rank: int, world_size: int) -> DataLoader:
    """Options: `patch_size` (crop sizes must be multiples of it), `masks` (draw iBOT block masks; the ratio and
    share of masked images come from the config's `masking` section)."""
    masks = bool(options.get("masks", False))
    augmentations, generators, probabilities = crop_pipelines(cfg, int(options["patch_size"]), masks)
    masking = getattr(cfg, "masking", None)
    if masks and masking is None:
        raise ValueError("the model asks for iBOT masks but this method's config has no `masking` section")
    loader = build_dataloader(
        dataset,
        augmentations,
        cfg.optim.batch_size,
        image_column=cfg.data.image_column,
        mask_generator=generators,
        resolution_probabilities=probabilities,
        mask_ratio_min_max=masking.ratio_min_max if masks else (0.1, 0.5),
        mask_sample_probability=masking.sample_probability if masks else 0.5,
        seed=cfg.train.seed,
        num_replicas=world_size,
        rank=rank,
        num_workers=cfg.data.num_workers,
    )
    if probabilities is not None:
        loader.collate_fn = _LogCropSize(loader.collate_fn)
    return loader


register_pipeline("multicrop", _multicrop)
