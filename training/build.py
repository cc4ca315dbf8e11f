"""Build the pretraining model from a `TrainConfig`, optionally starting from existing weights (`model.init_from`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from modeling import DinoForPretraining, DinoPretrainingConfig, DinoVisionConfig, DinoVisionModel

from .train_config import TrainConfig

logger = logging.getLogger(__name__)


def backbone_config(cfg: TrainConfig) -> DinoVisionConfig:
    m = cfg.model
    overrides = {
        k: v
        for k, v in dict(
            hidden_size=m.hidden_size,
            num_hidden_layers=m.num_hidden_layers,
            num_attention_heads=m.num_attention_heads,
            ffn=m.ffn,
            drop_path_rate=m.drop_path_rate,
            layerscale_init=m.layerscale_init,
        ).items()
        if v is not None
    }
    image_size = m.image_size or cfg.crops.global_size
    return DinoVisionConfig.from_preset(m.preset, image_size=image_size, num_register_tokens=m.num_register_tokens, **overrides)


def pretraining_config(cfg: TrainConfig, backbone: DinoVisionConfig) -> DinoPretrainingConfig:
    h, loss = cfg.heads, cfg.loss
    return DinoPretrainingConfig(
        backbone_config=backbone,
        num_prototypes=h.num_prototypes,
        hidden_dim=h.hidden_dim,
        bottleneck_dim=h.bottleneck_dim,
        head_nlayers=h.nlayers,
        separate_ibot_head=h.separate_ibot_head,
        ibot_num_prototypes=h.ibot_num_prototypes,
        ibot_hidden_dim=h.ibot_hidden_dim,
        ibot_bottleneck_dim=h.ibot_bottleneck_dim,
        dino_weight=loss.dino_weight,
        ibot_weight=loss.ibot_weight,
        koleo_weight=loss.koleo_weight,
        centering=loss.centering,
        student_temp=loss.student_temp,
        center_momentum=loss.center_momentum,
    )


def _model_type(path: Path) -> str | None:
    config = path / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    return None


def load_backbone(source: str, drop_path_rate: float | None = None) -> DinoVisionModel:
    """A `DinoVisionModel` from a Hub id / folder (stock transformers DINOv2, our backbone or pretraining export)
    or an official-format state-dict file (`.pth`, `.pt`, `.safetensors`)."""
    from transformers import AutoConfig, AutoModel

    from modeling.convert import from_official_state_dict, from_transformers

    path = Path(source)
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        backbone = from_official_state_dict(state_dict, None)
    else:
        model_type = _model_type(path) if path.is_dir() else AutoConfig.from_pretrained(source).model_type
        if model_type == "dinoforge_pretraining":
            backbone = DinoForPretraining.from_pretrained(source).teacher_backbone
        elif model_type == "dinoforge_vit":
            backbone = DinoVisionModel.from_pretrained(source)
        elif model_type in ("dinov2", "dinov2_with_registers"):
            backbone = from_transformers(AutoModel.from_pretrained(source))
        else:
            raise ValueError(
                f"model.init_from={source!r} is a {model_type!r} model; pass a DINOv2 (transformers Dinov2Model / "
                "Dinov2WithRegistersModel), a dinoforge export, or an official DINOv2 state-dict file"
            )
    if drop_path_rate is not None:
        backbone.config.drop_path_rate = drop_path_rate
        for block in backbone.blocks:
            block.drop_path_rate = drop_path_rate
    return backbone


def build_pretraining_model(cfg: TrainConfig) -> DinoForPretraining:
    """Fresh model from the recipe, or `init_from`: our `pretraining/` folder continues with heads and centers;
    any other backbone source initialises student and teacher backbones, with fresh heads."""
    source = cfg.model.init_from
    if not source:
        return DinoForPretraining(pretraining_config(cfg, backbone_config(cfg)))
    if Path(source).is_dir() and _model_type(Path(source)) == "dinoforge_pretraining":
        logger.info("continuing from %s (backbones, heads and loss centers)", source)
        model = DinoForPretraining.from_pretrained(source)
    else:
        backbone = load_backbone(source, cfg.model.drop_path_rate)
        model = DinoForPretraining(pretraining_config(cfg, backbone.config))
        state = backbone.state_dict()
        model.student["backbone"].load_state_dict(state)
        model.teacher["backbone"].load_state_dict(state)
        logger.info("initialised student and teacher backbones from %s (fresh heads)", source)
    resample_position_embeddings(model, cfg.model.image_size)
    return model


def resample_position_embeddings(model: DinoForPretraining, image_size: int | None) -> None:
    """High-res phase: resample both towers' position-embedding grids once to `image_size` (saved that way),
    instead of interpolating at every step. Nothing to do when `image_size` is unset or already the grid."""
    if image_size is None or image_size == model.student_backbone.config.image_size:
        return
    old = model.student_backbone.config.image_size
    for tower in (model.student, model.teacher):
        tower["backbone"].resize_position_embeddings(image_size)
    model.config.backbone_config.image_size = image_size
    logger.info("resampled position embeddings from %d px to %d px", old, image_size)
