"""Data pipelines by name: a method's `data_pipeline()` names one, and the loop builds it here.

A pipeline turns a dataset (from `training.data.load_image_dataset`) into a sharded, resumable DataLoader whose
batches the method's `forward` takes. Every batch is a dict of model inputs plus two bookkeeping entries the
loop reads and removes: `batch_size` (images kept) and `num_skipped` (undecodable images dropped); optional ones
are `skipped` (what was dropped and why) and `log` (scalars to log, e.g. the crop size drawn for this batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

from modeling.method import DataPipeline

from .augment import MultiCropAugmentation
from .config import ConfigError, to_dict
from .data import build_dataloader
from .masking import BlockMaskGenerator
from .train_config import CropsConfig, TrainConfig

PipelineBuilder = Callable[..., DataLoader]
_PIPELINES: dict[str, PipelineBuilder] = {}

# Entries of a batch that are not model inputs.
BOOKKEEPING_KEYS = ("batch_size", "num_skipped", "skipped", "log")


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
                raise ConfigError(
                    f"{name} crop size {size} is not a multiple of the patch size {patch}: use "
                    f"{size // patch * patch} or {(size // patch + 1) * patch} (crops.{name}_size / crops.resolutions)"
                )
        augmentations.append(MultiCropAugmentation(**{**crops, "global_size": global_size, "local_size": local_size}))
        generators.append(BlockMaskGenerator.for_crop(global_size, patch))
    return augmentations, (generators if masks else None), probabilities


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
        # Streams only: shard + buffer shuffle from (seed, epoch), so replaying an epoch on resume is exact.
        shuffle_buffer_size=cfg.data.shuffle_buffer,
        decoded_cache_mb=cfg.data.decoded_cache_mb,
        # Rows that are only paths: inside the local image folder pointed at (None), or anywhere if trusted.
        allow_paths=True if cfg.data.allow_local_paths else None,
    )
    return loader


register_pipeline("multicrop", _multicrop)


# ---- two views (MoCo v3, Barlow Twins, DenseCL) ---------------------------------------------------------------


def _two_views(options: dict[str, Any], cfg: TrainConfig, dataset: Any, *, rank: int, world_size: int) -> DataLoader:
    """Two augmented views per image: batches `{"view1", "view2"}` `[B, 3, S, S]` (`training/data/two_views.py`).

    Geometry from the shared `crops` section — `global_size` is the view size S, `global_scale` the crop scale,
    `horizontal_flip` — and the photometric settings from the method's `views` section. Option: `patch_size` (a
    ViT's; S must be a multiple of it; None for a ConvNet)."""
    from dataclasses import asdict

    from .data.background_swap import BackgroundSwap
    from .data.two_views import TwoViewAugmentation, ViewsConfig, build_two_view_loader

    crops = cfg.crops
    if crops.resolutions:
        raise ValueError("crops.resolutions (multi-resolution) is a multi-crop setting; the two_views pipeline uses "
                         "one view size, crops.global_size")
    if crops.hue != CropsConfig.hue:
        raise ConfigError(f"crops.hue={crops.hue} is the multi-crop pipeline's setting; the two-view methods take "
                          f"the hue range from views.color_jitter (its 4th value), e.g. "
                          f"views.color_jitter=[0.4,0.4,0.2,{crops.hue}]")
    patch = options.get("patch_size")
    if patch and crops.global_size % patch:
        raise ValueError(f"crops.global_size={crops.global_size} (the view size) is not a multiple of the patch size "
                         f"{patch}: use {crops.global_size // patch * patch} or {(crops.global_size // patch + 1) * patch}")
    views = asdict(getattr(cfg, "views", None) or ViewsConfig())
    swap_probability = views.pop("background_swap")
    allow_paths = True if cfg.data.allow_local_paths else None
    swap = (BackgroundSwap.from_dataset(dataset, swap_probability, image_column=cfg.data.image_column,
                                        seed=cfg.train.seed, allow_paths=allow_paths)
            if swap_probability > 0 else None)
    augmentation = TwoViewAugmentation(crops.global_size, crops.global_scale, crops.horizontal_flip, **views,
                                       background_swap=swap)
    return build_two_view_loader(
        dataset, augmentation, cfg.optim.batch_size, image_column=cfg.data.image_column, seed=cfg.train.seed,
        num_replicas=world_size, rank=rank, num_workers=cfg.data.num_workers,
        shuffle_buffer_size=cfg.data.shuffle_buffer,
        decoded_cache_mb=cfg.data.decoded_cache_mb, allow_paths=allow_paths,
    )


register_pipeline("two_views", _two_views)


# ---- copy edits (copy detection) --------------------------------------------------------------------------------


def _copy_edits(options: dict[str, Any], cfg: TrainConfig, dataset: Any, *, rank: int, world_size: int) -> DataLoader:
    """Two strongly edited copies per image: batches `{"view1", "view2"}` `[B, 3, S, S]` (`training/data/copy_edits.py`),
    S = `crops.global_size`, the edits from the method's `edits` section. Option: `patch_size` (a ViT's)."""
    from .data.copy_edits import CopyEditAugmentation, CopyEditsConfig, build_copy_edit_loader

    size, patch = cfg.crops.global_size, options.get("patch_size")
    if patch and size % patch:
        raise ValueError(f"crops.global_size={size} (the view size) is not a multiple of the patch size {patch}: use "
                         f"{size // patch * patch} or {(size // patch + 1) * patch}")
    edits = getattr(cfg, "edits", None) or CopyEditsConfig()
    return build_copy_edit_loader(
        dataset, CopyEditAugmentation(size, edits), cfg.optim.batch_size, edits.mix_probability,
        image_column=cfg.data.image_column, seed=cfg.train.seed, num_replicas=world_size, rank=rank,
        num_workers=cfg.data.num_workers, shuffle_buffer_size=cfg.data.shuffle_buffer,
        decoded_cache_mb=cfg.data.decoded_cache_mb,
        allow_paths=True if cfg.data.allow_local_paths else None,
    )


register_pipeline("copy_edits", _copy_edits)


# ---- image + text (text alignment: LiT, dino.txt) ---------------------------------------------------------------


def _image_text(options: dict[str, Any], cfg: TrainConfig, dataset: Any, *, rank: int, world_size: int) -> DataLoader:
    """Batches `{"pixel_values", "input_ids", "attention_mask"}` (`training/data/image_text.py`): one random resized
    crop per image and one caption per image per step — drawn from `captions.text_column` (a caption or a list), or
    made from the class name of `data.label_column` when that is null. Options (from the model): `tokenizer`,
    `image_processor` (crop size and normalisation), `max_length`."""
    from .data.image_text import CaptionCollator, ImageTextTransform, build_image_text_loader
    from .methods.text_alignment import CaptionsSection, class_label_names

    captions = getattr(cfg, "captions", None) or CaptionsSection(text_column="text")
    processor = options["image_processor"]
    crop = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    size = int(crop["height"]) if "height" in crop else cfg.crops.global_size
    transform = ImageTextTransform(size, captions.crop_scale, processor.image_mean, processor.image_std,
                                   captions.horizontal_flip)
    from_labels = captions.text_column is None
    class_names = class_label_names(dataset, cfg.data.label_column) if from_labels else None
    collator = CaptionCollator(options["tokenizer"], int(options.get("max_length", 64)), class_names)
    return build_image_text_loader(
        dataset, transform, collator, cfg.optim.batch_size,
        text_column=None if from_labels else captions.text_column,
        label_column=cfg.data.label_column if from_labels else None,
        image_column=cfg.data.image_column, seed=cfg.train.seed, num_replicas=world_size, rank=rank,
        num_workers=cfg.data.num_workers, shuffle_buffer_size=cfg.data.shuffle_buffer,
        decoded_cache_mb=cfg.data.decoded_cache_mb,
        allow_paths=True if cfg.data.allow_local_paths else None,
    )


register_pipeline("image_text", _image_text)


# ---- detection with grounding prompts (Grounding DINO) ----------------------------------------------------------


def _detection(options: dict[str, Any], cfg: TrainConfig, dataset: Any, *, rank: int, world_size: int) -> DataLoader:
    """Batches `{"pixel_values", "pixel_mask", "input_ids", "attention_mask", "labels"}` (`training/data/detection.py`)
    from a COCO-style detection set: the image through the detector's image processor, a prompt of every category
    name (order drawn per sample) and the targets. Columns from the method's `grounding` section; options (from the
    model): `tokenizer`, `image_processor`, `max_length`."""
    from .data.detection import DetectionCollator, DetectionTransform, build_detection_loader
    from .methods.grounding import GroundingSection, category_names

    g = getattr(cfg, "grounding", None) or GroundingSection()
    collator = DetectionCollator(
        options["tokenizer"], category_names(dataset, cfg), int(options.get("max_length", 256)),
        shuffle_phrases=g.shuffle_phrases, horizontal_flip=g.horizontal_flip, bbox_key=g.bbox_key,
        category_key=g.category_key,
    )
    return build_detection_loader(
        dataset, DetectionTransform(options["image_processor"]), collator, cfg.optim.batch_size,
        objects_column=g.objects_column, image_column=cfg.data.image_column, seed=cfg.train.seed,
        num_replicas=world_size, rank=rank, num_workers=cfg.data.num_workers,
        shuffle_buffer_size=cfg.data.shuffle_buffer,
        decoded_cache_mb=cfg.data.decoded_cache_mb, allow_paths=True if cfg.data.allow_local_paths else None,
    )


register_pipeline("detection", _detection)
