"""Text alignment (`method: text_alignment`): LiT / dino.txt on a locked dinoforge (or any `AutoModel`) image tower.

Sections it adds to the shared ones: `image_tower` (where the tower comes from, the image embedding, dino.txt's
head blocks), `text_tower` (a pretrained text encoder with its tokenizer, or one built from config with a
tokenizer built from the captions), `alignment` (shared embedding size, logit scale), `captions` (where the text
comes from, the crop), `zero_shot` (the end-of-run evaluation). The model is
`modeling.text_alignment.TextAlignmentForPretraining`; recipes: configs/lit_quickstart.yaml, configs/lit_vitl14.yaml,
configs/lit_dinotxt_vitl14.yaml.

At the end of a run the `aligned/` export is scored zero-shot on `data.eval_dataset` (split `data.eval_split`,
class-name prompts) next to the same model before training — the frozen tower with a random-init text tower —
and both go into `aligned/README.md` and `summary.json`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modeling.dual_encoder import DualEncoderConfig
from modeling.text_alignment import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, TextAlignmentConfig, TextAlignmentForPretraining

from ..build import folder_model_type
from ..captions import caption_corpus
from ..config import ConfigError, check
from ..data import load_image_dataset
from ..text_tokenizer import build_wordpiece_tokenizer, saved_tokenizer
from ..train_config import TrainConfig
from .registry import Method, register_method

logger = logging.getLogger(__name__)


@dataclass
class ImageTowerSection:
    """The locked image tower: a dinoforge export (`backbone/`, `pretraining/`), an official DINOv2 state dict, or any
    `AutoModel` vision backbone (folder or Hub id) whose output has `pooler_output` and ViT tokens."""

    path: str | None = None  # required
    embedding: str = field(default="cls", metadata=check(choices=("cls", "cls_mean_patch")))  # dino.txt: cls_mean_patch
    head_blocks: int = field(default=0, metadata=check(ge=0))  # dino.txt: 2 trainable blocks on the frozen tokens
    head_drop_path: float = field(default=0.3, metadata=check(ge=0, lt=1))
    head_swiglu: bool = True
    freeze: bool = True  # false: the tower trains too (not LiT)


@dataclass
class TextTowerSection:
    """`pretrained`: a Hub id / folder of a text encoder (its tokenizer too, unless `tokenizer`). Else a fresh
    encoder of `model_type` with these sizes, and — unless `tokenizer` — a WordPiece tokenizer built from the
    captions (training/text_tokenizer.py), saved in `train.output_dir/tokenizer`."""

    pretrained: str | None = None
    tokenizer: str | None = None
    model_type: str = "bert"
    hidden_size: int = field(default=512, metadata=check(ge=1))
    num_hidden_layers: int = field(default=12, metadata=check(ge=1))
    num_attention_heads: int = field(default=8, metadata=check(ge=1))
    intermediate_size: int = field(default=2048, metadata=check(ge=1))
    max_length: int = field(default=64, metadata=check(ge=4))
    vocab_max_words: int = field(default=30000, metadata=check(ge=1))
    vocab_rows: int = field(default=100000, metadata=check(ge=1))  # captions read to build the vocabulary


@dataclass
class AlignmentSection:
    projection_dim: int = field(default=512, metadata=check(ge=1))
    logit_scale_init: float = field(default=LOGIT_SCALE_INIT, metadata=check(ge=0))  # ln(1/0.07) (CLIP, dino.txt)
    logit_scale_max: float = field(default=LOGIT_SCALE_MAX, metadata=check(ge=0))  # clamp at ln 100


@dataclass
class CaptionsSection:
    """`text_column`: a column holding a caption or a list of captions (one drawn per step). None: captions are
    made from the class names of `data.label_column` (training/captions.py), e.g. for `data.dataset=sample`."""

    text_column: str | None = None
    crop_scale: tuple[float, float] = field(default=(0.9, 1.0), metadata=check(gt=0, le=1, ordered=True))
    horizontal_flip: bool = False


@dataclass
class ZeroShotSection:
    templates: str = field(default="clip", metadata=check(choices=("clip", "simple")))
    batch_size: int = field(default=64, metadata=check(ge=1))


@dataclass
class TextAlignmentTrainConfig(TrainConfig):
    image_tower: ImageTowerSection = field(default_factory=ImageTowerSection)
    text_tower: TextTowerSection = field(default_factory=TextTowerSection)
    alignment: AlignmentSection = field(default_factory=AlignmentSection)
    captions: CaptionsSection = field(default_factory=CaptionsSection)
    zero_shot: ZeroShotSection = field(default_factory=ZeroShotSection)


# ---- the image tower -----------------------------------------------------------------------------------------


def load_image_tower(source: str):
    """A stock transformers vision model: dinoforge exports and official state dicts go through
    `modeling.convert.to_transformers`; anything else is `AutoModel.from_pretrained(source)`."""
    from transformers import AutoModel

    from modeling.convert import to_transformers

    from ..build import load_backbone

    path = Path(source).expanduser()
    if path.is_file() or (path.is_dir() and folder_model_type(path) in ("dinoforge_vit", "dinoforge_pretraining")):
        return to_transformers(load_backbone(str(path)))
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source):
        raise ConfigError(f"image_tower.path={source!r} does not exist. Train a backbone first, e.g. `python train.py "
                          "--config configs/quickstart.yaml data.dataset=sample data.eval_dataset=sample "
                          "train.output_dir=outputs/quickstart_sample`, then pass its backbone/ folder")
    tower = AutoModel.from_pretrained(str(path) if path.exists() else source)
    if getattr(tower.config, "vision_config", None) is not None and hasattr(tower, "vision_model"):
        tower = tower.vision_model  # e.g. a CLIPModel: its vision half
    return tower


def tower_image_processor(source: str, image_size: int):
    """The DINOv2 evaluation preprocessing at `image_size` (resize 256/224, center crop), with the tower's own
    normalisation when its folder has an image processor."""
    from transformers import AutoImageProcessor

    from ..evaluation.preprocess import default_image_processor

    processor = default_image_processor(image_size)
    try:
        own = AutoImageProcessor.from_pretrained(str(Path(source).expanduser()) if Path(source).expanduser().exists()
                                                 else source)
    except (OSError, ValueError, KeyError, TypeError):
        own = None
    if own is not None and getattr(own, "image_mean", None) and getattr(own, "image_std", None):
        processor.image_mean, processor.image_std = list(own.image_mean), list(own.image_std)
    return processor


# ---- text: tokenizer and captions ------------------------------------------------------------------------------


def class_label_names(dataset: Any, column: str) -> list[str]:
    """The class names of a ClassLabel column (captions from class names need them)."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    feature = features.get(column)
    if not isinstance(feature, datasets.ClassLabel):
        raise ConfigError(
            f"captions.text_column is null, so captions are made from class names, but data.label_column={column!r} "
            f"is not a ClassLabel column of data.dataset (features: {dict(features) or 'unknown'}). Set "
            "captions.text_column=<column with captions>, or data.label_column=<ClassLabel column>"
        )
    return list(feature.names)


def caption_texts(cfg: TextAlignmentTrainConfig) -> list[str]:
    """The text a tokenizer is built from: every template caption of the class names, or the caption column."""
    d, c = cfg.data, cfg.captions
    ds = load_image_dataset(d.dataset, d.split, d.image_column, d.streaming)
    if c.text_column is None:
        return list(caption_corpus(class_label_names(ds, d.label_column)))
    if c.text_column not in (ds.column_names or [c.text_column]):
        raise ConfigError(f"captions.text_column={c.text_column!r} is not a column of data.dataset; columns: "
                          f"{ds.column_names}")
    texts: list[str] = []
    for i, row in enumerate(ds.select_columns([c.text_column])):
        if i >= cfg.text_tower.vocab_rows:
            break
        value = row[c.text_column]
        texts.extend([value] if isinstance(value, str) else list(value))
    return texts


def tokenizer_for(cfg: TextAlignmentTrainConfig) -> tuple[Any, str]:
    """(tokenizer, where it is saved): the configured / pretrained one, or one built from the captions and saved in
    `output_dir/tokenizer` (reused when there: a resumed run tokenizes as before)."""
    from transformers import AutoTokenizer

    t = cfg.text_tower
    source = t.tokenizer or t.pretrained
    if source:
        return AutoTokenizer.from_pretrained(source), source
    folder = Path(cfg.output_dir).absolute() / "tokenizer"
    build = lambda: build_wordpiece_tokenizer(caption_texts(cfg), max_words=t.vocab_max_words,  # noqa: E731
                                              model_max_length=t.max_length)
    return saved_tokenizer(folder, build), str(folder)


def text_config_for(cfg: TextAlignmentTrainConfig, tokenizer: Any):
    from transformers import AutoConfig

    t = cfg.text_tower
    if t.pretrained:
        return AutoConfig.from_pretrained(t.pretrained)
    return AutoConfig.for_model(
        t.model_type, vocab_size=len(tokenizer), hidden_size=t.hidden_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=max(t.max_length, 64), pad_token_id=tokenizer.pad_token_id,
    )


# ---- the model -----------------------------------------------------------------------------------------------


def build_text_alignment(cfg: TextAlignmentTrainConfig) -> TextAlignmentForPretraining:
    """The dual encoder: the loaded (frozen) image tower, a fresh or pretrained text tower, fresh projections."""
    from transformers import AutoModel

    if not cfg.image_tower.path:
        raise ConfigError("image_tower.path is required: a backbone folder (e.g. outputs/quickstart_sample/backbone) "
                          "or a Hub id of a vision backbone")
    tower = load_image_tower(cfg.image_tower.path)
    patch = getattr(tower.config, "patch_size", None)
    if isinstance(patch, int) and cfg.crops.global_size % patch:
        raise ConfigError(f"crops.global_size={cfg.crops.global_size} (the image size) is not a multiple of the image "
                          f"tower's patch size {patch}")
    processor = tower_image_processor(cfg.image_tower.path, cfg.crops.global_size)
    tokenizer, tokenizer_path = tokenizer_for(cfg)
    text_config = text_config_for(cfg, tokenizer)
    it, a = cfg.image_tower, cfg.alignment
    dual = DualEncoderConfig(
        vision_config=tower.config, text_config=text_config, projection_dim=a.projection_dim,
        image_embedding=it.embedding, num_head_blocks=it.head_blocks, head_drop_path_rate=it.head_drop_path,
        head_swiglu=it.head_swiglu, logit_scale_init_value=a.logit_scale_init,
    )
    processor_dict = {**processor.to_dict(), "image_processor_type": type(processor).__name__}
    processor_dict.pop("_processor_class", None)
    config = TextAlignmentConfig(
        dual_encoder_config=dual, freeze_image_tower=it.freeze, logit_scale_max=a.logit_scale_max,
        max_text_length=cfg.text_tower.max_length, tokenizer_name_or_path=tokenizer_path,
        image_processor=processor_dict,
    )
    model = TextAlignmentForPretraining(config)
    model.model.vision_model.load_state_dict(tower.state_dict())
    if cfg.text_tower.pretrained:
        model.model.text_model.load_state_dict(AutoModel.from_pretrained(cfg.text_tower.pretrained).state_dict())
    model.tokenizer, model.image_processor = tokenizer, processor
    return model


# ---- end-of-run evaluation -------------------------------------------------------------------------------------


def evaluate_text_alignment(cfg: TextAlignmentTrainConfig, model: TextAlignmentForPretraining, accelerator,
                            paths: dict[str, Path]) -> dict | None:
    """Zero-shot top-1/top-5 of the trained model and of the same model before training (frozen tower + random-init
    text tower, same seed), on `data.eval_dataset`; written into `aligned/README.md`. Main process only."""
    from ..aligned_card import write_aligned_card
    from ..evaluation.splits import check_image_column, load_split, resolve_labels
    from ..evaluation.zero_shot import zero_shot_classify

    if not accelerator.is_main_process:
        return None
    results = None
    if cfg.data.eval_dataset:
        d = cfg.data
        test = check_image_column(load_split(d.eval_dataset, d.eval_split, image_column=d.image_column),
                                  d.image_column, f"the {d.eval_split!r} split")
        class_names, label_to_index = resolve_labels(test, {}, d.label_column)
        common = dict(templates=cfg.zero_shot.templates, image_column=d.image_column, label_column=d.label_column,
                      label_to_index=label_to_index, batch_size=cfg.zero_shot.batch_size, device=accelerator.device)
        trained = zero_shot_classify(model.model, model.get_tokenizer(), model.get_image_processor(), test,
                                     class_names, **common)
        torch.manual_seed(cfg.train.seed)  # the model as it was before the first step
        baseline_model = build_text_alignment(cfg)
        baseline = zero_shot_classify(baseline_model.model, baseline_model.get_tokenizer(),
                                      baseline_model.get_image_processor(), test, class_names, **common)
        chance = 100.0 / len(class_names)
        accelerator.print(
            f"zero-shot top-1 on {d.eval_dataset}/{d.eval_split} ({len(class_names)} classes, chance {chance:.1f}%, "
            f"{trained['num_templates']} prompt templates): trained {trained['top1']:.1f}%  vs  before training "
            f"(random-init text tower) {baseline['top1']:.1f}%"
        )
        results = {"dataset": d.eval_dataset, "split": d.eval_split, "zero_shot": trained,
                   "before_training": baseline, "chance": chance}
    if "aligned" in paths:
        write_aligned_card(paths["aligned"], model, cfg, results, step=_last_step(Path(cfg.output_dir)))
    return results


def _last_step(output_dir: Path) -> int | str:
    import json

    metrics = output_dir / "metrics.jsonl"
    steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.is_file() else []
    return next((s for s in reversed(steps) if s is not None), "?")


TEXT_ALIGNMENT = register_method(
    Method(
        name="text_alignment",
        config_class=TextAlignmentTrainConfig,
        build_model=build_text_alignment,
        evaluate=evaluate_text_alignment,
        description="image-text contrastive alignment of a text tower to a locked image tower (LiT / dino.txt)",
    )
)
