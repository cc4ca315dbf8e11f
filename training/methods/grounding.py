"""Grounding (`method: grounding`): Grounding DINO with a dinoforge backbone, trained on a COCO-style detection set.

Sections it adds: `backbone` (which backbone, which blocks give the feature levels, frozen or fine-tuned),
`detector` (Grounding DINO's sizes and its text tower), `grounding` (image size, columns, prompts, evaluation).
The model is `modeling.grounding.GroundingForPretraining`; recipes: configs/grounding_quickstart.yaml,
configs/grounding_vitl14.yaml. At the end of a run the `detector/` export's box recall (IoU ≥ 0.5) on the held-out
split is reported next to the same model before training, in `detector/README.md` and `summary.json`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modeling.grounding import GroundingConfig, GroundingForPretraining

from ..config import ConfigError, check
from ..data import load_image_dataset
from ..text_tokenizer import build_wordpiece_tokenizer, saved_tokenizer
from ..train_config import TrainConfig
from .registry import Method, Schedule, register_method
from .text_alignment import load_image_tower, tower_image_processor

logger = logging.getLogger(__name__)


@dataclass
class GroundingBackboneSection:
    path: str | None = None  # required: a dinoforge export, an official state dict, a stock DINOv2 folder / Hub id
    # blocks whose outputs are the feature levels (1-based, as Dinov2Config.out_indices); empty: depth/3, 2·depth/3, depth
    out_indices: list[int] = field(default_factory=list, metadata=check(ge=1))
    freeze: bool = True
    lr_mult: float = field(default=0.1, metadata=check(ge=0))  # fine-tuning: the backbone's lr multiplier


@dataclass
class DetectorSection:
    """Grounding DINO's sizes (defaults: IDEA-Research/grounding-dino-tiny) and its text tower: `text_pretrained`
    (a BERT Hub id / folder, with its tokenizer) or a BERT from these sizes with a tokenizer built from the
    category names."""

    d_model: int = field(default=256, metadata=check(ge=1))
    encoder_layers: int = field(default=6, metadata=check(ge=1))
    decoder_layers: int = field(default=6, metadata=check(ge=2))  # >= 2: transformers ties bbox_embed.{1..} to 0
    num_queries: int = field(default=900, metadata=check(ge=1))
    ffn_dim: int = field(default=2048, metadata=check(ge=1))
    attention_heads: int = field(default=8, metadata=check(ge=1))
    extra_levels: int = field(default=1, metadata=check(ge=0))  # stride-2 levels on top of the block levels
    max_text_len: int = field(default=256, metadata=check(ge=8))
    auxiliary_loss: bool = True  # the loss on every decoder layer (Grounding DINO trains so)
    text_pretrained: str | None = None
    text_hidden_size: int = field(default=768, metadata=check(ge=1))
    text_layers: int = field(default=12, metadata=check(ge=1))
    text_heads: int = field(default=12, metadata=check(ge=1))
    text_intermediate_size: int = field(default=3072, metadata=check(ge=1))


@dataclass
class GroundingSection:
    image_size: int = field(default=812, metadata=check(ge=14))  # square input; a multiple of the patch size
    objects_column: str = "objects"
    bbox_key: str = "bbox"  # [x, y, w, h] in pixels (COCO)
    category_key: str = "category"  # a ClassLabel: its names are the phrases
    shuffle_phrases: bool = True
    horizontal_flip: bool = True
    eval_split: str = "test"  # of data.eval_dataset, else of data.dataset
    recall_iou: float = field(default=0.5, metadata=check(gt=0, le=1))
    recall_top_k: int = field(default=1, metadata=check(ge=1))
    eval_batch_size: int = field(default=16, metadata=check(ge=1))


@dataclass
class GroundingTrainConfig(TrainConfig):
    backbone: GroundingBackboneSection = field(default_factory=GroundingBackboneSection)
    detector: DetectorSection = field(default_factory=DetectorSection)
    grounding: GroundingSection = field(default_factory=GroundingSection)


def category_names(dataset: Any, cfg: GroundingTrainConfig) -> list[str]:
    """The ClassLabel names of the objects' categories (the prompt phrases)."""
    import datasets

    g = cfg.grounding
    features = getattr(dataset, "features", None) or {}
    objects = features.get(g.objects_column)
    category = objects.get(g.category_key) if isinstance(objects, dict) else None
    feature = getattr(category, "feature", category)  # List(ClassLabel) or ClassLabel
    if not isinstance(feature, datasets.ClassLabel):
        raise ConfigError(f"grounding needs a COCO-style column {g.objects_column!r} with {g.category_key!r} a "
                          f"ClassLabel (its names are the prompt phrases); data.dataset has {dict(features)}. Set "
                          "grounding.objects_column / grounding.category_key")
    return list(feature.names)


def _out_indices(section: GroundingBackboneSection, depth: int) -> list[int]:
    out = list(section.out_indices) or sorted({max(1, depth // 3), max(1, 2 * depth // 3), depth})
    if max(out) > depth:
        raise ConfigError(f"backbone.out_indices={out}: the backbone has {depth} blocks")
    return out


def build_grounding(cfg: GroundingTrainConfig) -> GroundingForPretraining:
    """The detector: its Dinov2 backbone with our weights, a fresh (or pretrained) text tower and fresh neck/heads."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, GroundingDinoConfig, GroundingDinoImageProcessor

    b, d, g = cfg.backbone, cfg.detector, cfg.grounding
    if not b.path:
        raise ConfigError("backbone.path is required: a backbone folder (e.g. outputs/quickstart_sample/backbone)")
    tower = load_image_tower(b.path)
    patch = tower.config.patch_size
    if g.image_size % patch:
        raise ConfigError(f"grounding.image_size={g.image_size} is not a multiple of the patch size {patch}")
    out = _out_indices(b, tower.config.num_hidden_layers)
    backbone_config = type(tower.config).from_dict({**tower.config.to_dict(), "out_indices": out,
                                                    "out_features": None})
    if d.text_pretrained:
        tokenizer, tokenizer_path = AutoTokenizer.from_pretrained(d.text_pretrained), d.text_pretrained
        text_config = AutoModel.from_pretrained(d.text_pretrained).config
    else:
        data = load_image_dataset(cfg.data.dataset, cfg.data.split, cfg.data.image_column, cfg.data.streaming)
        names = category_names(data, cfg)
        folder = Path(cfg.output_dir).absolute() / "tokenizer"
        tokenizer = saved_tokenizer(folder, lambda: build_wordpiece_tokenizer(
            [" . ".join(names), "a an the of and with"], model_max_length=d.max_text_len))
        tokenizer_path = str(folder)
        text_config = BertConfig(vocab_size=len(tokenizer), hidden_size=d.text_hidden_size,
                                 num_hidden_layers=d.text_layers, num_attention_heads=d.text_heads,
                                 intermediate_size=d.text_intermediate_size,
                                 max_position_embeddings=max(d.max_text_len, 64), pad_token_id=tokenizer.pad_token_id)
    detector_config = GroundingDinoConfig(
        backbone_config=backbone_config, text_config=text_config, d_model=d.d_model, encoder_layers=d.encoder_layers,
        decoder_layers=d.decoder_layers, num_queries=d.num_queries, encoder_ffn_dim=d.ffn_dim,
        decoder_ffn_dim=d.ffn_dim, encoder_attention_heads=d.attention_heads, decoder_attention_heads=d.attention_heads,
        num_feature_levels=len(out) + d.extra_levels, max_text_len=d.max_text_len, auxiliary_loss=d.auxiliary_loss,
    )
    own = tower_image_processor(b.path, g.image_size)  # the backbone's normalisation
    processor = GroundingDinoImageProcessor(size={"height": g.image_size, "width": g.image_size}, do_pad=False,
                                            image_mean=list(own.image_mean), image_std=list(own.image_std))
    config = GroundingConfig(
        detector_config=detector_config, freeze_backbone=b.freeze, max_text_length=d.max_text_len,
        tokenizer_name_or_path=tokenizer_path, image_processor=processor.to_dict(),
    )
    model = GroundingForPretraining(config)
    model.load_backbone_weights(tower.state_dict())
    if d.text_pretrained:
        model.detector.model.text_backbone.load_state_dict(AutoModel.from_pretrained(d.text_pretrained).state_dict())
    model.tokenizer, model.image_processor = tokenizer, processor
    return model


def grounding_schedules(cfg: GroundingTrainConfig) -> dict[str, Schedule]:
    if cfg.backbone.freeze:
        return {}
    mult = cfg.backbone.lr_mult
    return {"lr_scale/backbone": lambda step: mult}


def evaluate_grounding(cfg: GroundingTrainConfig, model: GroundingForPretraining, accelerator,
                       paths: dict[str, Path]) -> dict | None:
    """Box recall at IoU ≥ `grounding.recall_iou` on the held-out split, trained vs the same model before training
    (same seed: fresh neck, heads and text tower on the same backbone); main process only."""
    from ..detector_card import write_detector_card
    from ..evaluation.box_recall import box_recall

    if not accelerator.is_main_process:
        return None
    d, g = cfg.data, cfg.grounding
    source = d.eval_dataset or d.dataset
    test = load_image_dataset(source, g.eval_split, d.image_column)
    names = category_names(test, cfg)
    common = dict(iou=g.recall_iou, top_k=g.recall_top_k, image_column=d.image_column, objects_column=g.objects_column,
                  bbox_key=g.bbox_key, category_key=g.category_key, batch_size=g.eval_batch_size,
                  device=accelerator.device)
    trained = box_recall(model.detector, model.get_tokenizer(), model.get_image_processor(), test, names, **common)
    torch.manual_seed(cfg.train.seed)
    untrained_model = build_grounding(cfg)
    untrained = box_recall(untrained_model.detector, untrained_model.get_tokenizer(),
                           untrained_model.get_image_processor(), test, names, **common)
    accelerator.print(
        f"box recall (IoU >= {g.recall_iou}, top-{g.recall_top_k} per phrase) on {source}/{g.eval_split} "
        f"({trained['num_objects']} objects): trained {trained['recall']:.1f}%  vs  untrained {untrained['recall']:.1f}%"
    )
    results = {"dataset": source, "split": g.eval_split, "box_recall": trained, "before_training": untrained}
    if "detector" in paths:
        write_detector_card(paths["detector"], model, cfg, results, step=_last_step(Path(cfg.output_dir)))
    return results


def _last_step(output_dir: Path) -> int | str:
    metrics = output_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    steps = [json.loads(line).get("step") for line in lines if line.strip()]
    return next((s for s in reversed(steps) if s is not None), "?")


GROUNDING = register_method(
    Method(
        name="grounding",
        config_class=GroundingTrainConfig,
        build_model=build_grounding,
        schedules=grounding_schedules,
        evaluate=evaluate_grounding,
        description="open-vocabulary detection: Grounding DINO on a dinoforge backbone",
    )
)
