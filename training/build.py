"""Our ViT backbone from a config section: the `model` section, its `DinoVisionConfig`, starting weights from any
DINOv2 source (`model.init_from`) and the high-res phase's one-time position-embedding resampling. Shared by the
methods that train our ViT (DINOv2, distillation, ...)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modeling import DinoVisionConfig, DinoVisionModel

from .config import check

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    preset: str = field(default="vits14", metadata=check(choices=("vits14", "vitb14", "vitl14", "vitg14")))
    num_register_tokens: int = field(default=0, metadata=check(ge=0))
    # None: the preset's (0.3 S/B, 0.4 L/g)
    drop_path_rate: float | None = field(default=None, metadata=check(ge=0, lt=1))
    # Size overrides (None: the preset's) - the quickstart uses a tiny ViT.
    hidden_size: int | None = field(default=None, metadata=check(ge=1))
    num_hidden_layers: int | None = field(default=None, metadata=check(ge=1))
    num_attention_heads: int | None = field(default=None, metadata=check(ge=1))
    ffn: str | None = field(default=None, metadata=check(choices=("mlp", "swiglu")))
    layerscale_init: float | None = field(default=None, metadata=check(gt=0))  # None: the official 1e-5
    # None: the preset's 14 (e.g. 8 for 64 px images: 8x8 patches)
    patch_size: int | None = field(default=None, metadata=check(ge=1))
    # position-embedding grid; None: crops.global_size
    image_size: int | None = field(default=None, metadata=check(ge=1))
    # Start from existing weights: a Hub id or folder of a stock transformers DINOv2, one of our exports,
    # an official-format state dict file (.pth/.safetensors), or our `pretraining/` folder (keeps heads+centers).
    init_from: str | None = None
    # with init_from: train only the heads (backbone frozen) for this many steps
    head_warmup_steps: int = field(default=0, metadata=check(ge=0))
    gradient_checkpointing: bool = False
    compile: bool = False


def backbone_config(model: ModelConfig, global_size: int) -> DinoVisionConfig:
    """`DinoVisionConfig` of the `model` section; the position-embedding grid defaults to the global crop size."""
    m = model
    overrides = {
        k: v
        for k, v in dict(
            hidden_size=m.hidden_size,
            num_hidden_layers=m.num_hidden_layers,
            num_attention_heads=m.num_attention_heads,
            ffn=m.ffn,
            drop_path_rate=m.drop_path_rate,
            layerscale_init=m.layerscale_init,
            patch_size=m.patch_size,
        ).items()
        if v is not None
    }
    image_size = m.image_size or global_size
    return DinoVisionConfig.from_preset(m.preset, image_size=image_size, num_register_tokens=m.num_register_tokens, **overrides)


def folder_model_type(path: Path) -> str | None:
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
        model_type = folder_model_type(path) if path.is_dir() else AutoConfig.from_pretrained(source).model_type
        if model_type == "dinoforge_pretraining":
            from modeling import DinoForPretraining

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
