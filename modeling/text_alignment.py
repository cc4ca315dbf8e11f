"""Text alignment (`method: text_alignment`): a text tower trained against a locked image tower, CLIP-style.

Two published recipes, one model (`TextAlignmentForPretraining` around a `DualEncoderModel`):

* **LiT** (Zhai et al. 2022, big_vision `lit_coco.py`): the image tower is frozen; the image embedding is its pooled
  output (the final-normed CLS token of a DINOv2); only the text tower, the two projections and the temperature
  train. This is what transformers' `VisionTextDualEncoderModel` computes, so the export *is* that stock class.
* **dino.txt** (Jose et al. 2025, dinov3 `eval/text/`): the frozen DINO backbone gets `num_head_blocks` new trainable
  transformer blocks on its output tokens, and an image is embedded as CLS ‖ mean patch token. No stock class
  computes this, so the export is `DualEncoderModel` (registered with the Auto classes, `auto_map` in its config).

The loss is CLIP's symmetric cross-entropy over the *global* batch (`modeling.losses.clip_loss`: features gathered
with gradients across processes). The temperature is learnt as a log-scale, initialised at ln(1/0.07) = 2.659 and
clamped to [0, ln 100] after every optimizer step (CLIP, open_clip, dino.txt); it is never weight-decayed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .dual_encoder import DualEncoderConfig, DualEncoderModel
from .losses import clip_loss
from .method import DataPipeline, PretrainingMethod

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # 2.6593
LOGIT_SCALE_MAX = math.log(100)  # 4.6052


class TextAlignmentConfig(PretrainedConfig):
    """The dual encoder's config + what training needs besides: whether the image tower is frozen, the clamp of
    the log-scale, the text length, where the tokenizer lives and the image processor (as a dict), so a
    checkpoint alone can be exported."""

    model_type = "dinoforge_text_alignment"
    sub_configs = {"dual_encoder_config": DualEncoderConfig}

    def __init__(
        self,
        dual_encoder_config: DualEncoderConfig | dict | None = None,
        freeze_image_tower: bool = True,
        logit_scale_max: float = LOGIT_SCALE_MAX,
        max_text_length: int = 64,
        tokenizer_name_or_path: str | None = None,
        image_processor: dict[str, Any] | None = None,
        collapse_threshold: float = 0.05,
        **kwargs,
    ):
        if isinstance(dual_encoder_config, dict):
            dual_encoder_config = DualEncoderConfig(**dual_encoder_config)
        self.dual_encoder_config = dual_encoder_config or DualEncoderConfig()
        self.freeze_image_tower = freeze_image_tower
        self.logit_scale_max = logit_scale_max
        self.max_text_length = max_text_length
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.image_processor = image_processor
        self.collapse_threshold = collapse_threshold
        super().__init__(**kwargs)


@dataclass
class TextAlignmentOutput(ModelOutput):
    """`logit_scale`: the current multiplier exp(s); `image_to_text_accuracy`: share of this process's images
    whose own caption scores highest among this process's captions; `text_std`: spread of the normalised text
    embeddings over the batch (≈ 1 spread out, 0 when every caption maps to one vector)."""

    loss: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None
    image_to_text_accuracy: torch.Tensor | None = None
    text_std: torch.Tensor | None = None


def normalized_std(x: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalised rows, times sqrt(dim): ≈ 1 for spread-out rows, 0 for one vector."""
    x = F.normalize(x.detach().float(), dim=-1)
    return x.std(dim=0).mean() * math.sqrt(x.shape[-1]) if x.shape[0] > 1 else x.new_ones(())


class TextAlignmentForPretraining(PreTrainedModel, PretrainingMethod):
    """`model`: the `DualEncoderModel` being trained. `tokenizer` / `image_processor` are attached by the builder
    (`training.methods.text_alignment`) or loaded from the config when the model comes from a checkpoint."""

    config_class = TextAlignmentConfig
    config: TextAlignmentConfig
    base_model_prefix = "text_alignment"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")

    def __init__(self, config: TextAlignmentConfig):
        super().__init__(config)
        self.model = DualEncoderModel(config.dual_encoder_config)
        self.tokenizer: Any = None
        self.image_processor: Any = None
        self.post_init()
        self._freeze_()

    def _init_weights(self, module: nn.Module) -> None:
        """The dual encoder initialises its own modules."""

    def _freeze_(self) -> None:
        if self.config.freeze_image_tower:
            self.model.vision_model.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model._freeze_()  # transformers re-creates parameters while loading, which drops requires_grad=False
        return model

    def train(self, mode: bool = True) -> TextAlignmentForPretraining:
        super().train(mode)
        if self.config.freeze_image_tower:  # a locked tower runs as at inference (no dropout / drop path)
            self.model.vision_model.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **_: float,
    ) -> TextAlignmentOutput:
        """`pixel_values` `[B, 3, H, W]` and the tokenized captions `[B, L]` of the same B images."""
        m = self.model
        frozen = self.config.freeze_image_tower
        with torch.no_grad() if frozen else torch.enable_grad():
            tower = m.vision_model(pixel_values=pixel_values, return_dict=True)
        image_embeds = m.visual_projection(m.pool_image(tower))  # head blocks (dino.txt) train on frozen tokens
        text_embeds = m.get_text_features(input_ids, attention_mask, token_type_ids)
        image_embeds = F.normalize(image_embeds.float(), dim=-1)
        text_embeds = F.normalize(text_embeds.float(), dim=-1)
        scale = m.logit_scale.exp()
        loss = clip_loss(image_embeds, text_embeds, scale)
        with torch.no_grad():
            local = image_embeds @ text_embeds.T
            accuracy = (local.argmax(dim=1) == torch.arange(len(local), device=local.device)).float().mean()
        return TextAlignmentOutput(loss=loss, logit_scale=scale.detach(), image_to_text_accuracy=accuracy,
                                   text_std=normalized_std(text_embeds))

    # ---- the method protocol (modeling/method.py)

    def data_pipeline(self) -> DataPipeline:
        return DataPipeline("image_text", {"tokenizer": self.get_tokenizer(), "image_processor": self.get_image_processor(),
                                           "max_length": self.config.max_text_length})

    def trainable_parts(self) -> dict[str, nn.Module]:
        # One part: the text tower, the projections, the log-scale and the head blocks (the frozen tower's
        # parameters do not require grad, so no optimizer group holds them). `no_weight_decay()` names the gains,
        # biases and log-scale.
        return {"dual_encoder": self.model}

    def step_state(self) -> list[torch.Tensor]:
        return []  # forward changes nothing outside autograd

    @torch.no_grad()
    def after_optimizer_step(self, **_: float) -> None:
        self.model.logit_scale.clamp_(0, self.config.logit_scale_max)

    def exports(self) -> dict[str, Any]:
        return {"aligned": AlignedExport(self.model, self.get_tokenizer(), self.get_image_processor())}

    def health(self, metrics: dict[str, float]) -> list[str]:
        if metrics.get("text_std", 1.0) < self.config.collapse_threshold:
            return [f"collapse: the text embeddings of all captions are nearly one vector (text_std "
                    f"{metrics['text_std']:.3g} < {self.config.collapse_threshold})"]
        return []

    def model_card_rows(self, config: dict[str, Any]) -> dict[str, str]:
        c = self.model.config
        variant = "LiT (locked image tower)" if c.expressible_as_stock else "dino.txt (locked tower + head blocks)"
        rows = {
            "variant": variant,
            "image tower": f"{c.vision_config.model_type}, width {c.vision_config.hidden_size}, "
                           f"{'frozen' if self.config.freeze_image_tower else 'trained'}",
            "image embedding": {"cls": "CLS token", "cls_mean_patch": "CLS ‖ mean patch token"}[c.image_embedding],
            "text tower": f"{c.text_config.model_type}, {getattr(c.text_config, 'num_hidden_layers', '?')} layers, "
                          f"width {c.text_config.hidden_size}",
            "shared embedding": str(c.projection_dim),
            "loss": f"CLIP contrastive over the global batch; logit scale init {c.logit_scale_init_value:.4g}, "
                    f"clamped at {self.config.logit_scale_max:.4g}",
        }
        if c.num_head_blocks:
            rows["head blocks"] = f"{c.num_head_blocks} (drop path {c.head_drop_path_rate})"
        return rows

    # ---- tokenizer / image processor

    def get_tokenizer(self) -> Any:
        if self.tokenizer is None and self.config.tokenizer_name_or_path:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer_name_or_path)
        if self.tokenizer is None:
            raise ValueError("this text-alignment model has no tokenizer: attach one (model.tokenizer = ...) or set "
                             "config.tokenizer_name_or_path")
        return self.tokenizer

    def get_image_processor(self) -> Any:
        if self.image_processor is None and self.config.image_processor:
            import transformers

            values = dict(self.config.image_processor)
            processor_class = getattr(transformers, values.pop("image_processor_type", "BitImageProcessor"))
            self.image_processor = processor_class(**values)
        if self.image_processor is None:
            raise ValueError("this text-alignment model has no image processor: attach one or set "
                             "config.image_processor")
        return self.image_processor


def to_vision_text_dual_encoder(model: DualEncoderModel):
    """The stock `VisionTextDualEncoderModel` with `model`'s weights (only for `config.expressible_as_stock`)."""
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    c = model.config
    if not c.expressible_as_stock:
        raise ValueError("VisionTextDualEncoderModel embeds images by the tower's pooled output only: a model with "
                         "head blocks or a CLS ‖ mean-patch embedding exports as DualEncoderModel")
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        c.vision_config, c.text_config, projection_dim=c.projection_dim, logit_scale_init_value=c.logit_scale_init_value
    )
    stock = VisionTextDualEncoderModel(config)
    stock.load_state_dict(model.state_dict(), strict=True)
    return stock.eval()


class AlignedExport:
    """The `aligned/` export: the model (stock `VisionTextDualEncoderModel` when it can be, else `DualEncoderModel`
    with `auto_map`), its tokenizer and image processor — one folder that `pipeline("zero-shot-image-classification",
    model=folder)` serves. `save_pretrained` is what `training.export.export_run` calls for non-backbone exports."""

    def __init__(self, model: DualEncoderModel, tokenizer: Any, image_processor: Any):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor

    @property
    def stock(self) -> bool:
        return self.model.config.expressible_as_stock

    def save_pretrained(self, folder) -> None:
        if self.stock:
            from transformers import VisionTextDualEncoderProcessor

            to_vision_text_dual_encoder(self.model).save_pretrained(folder)
            VisionTextDualEncoderProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer
                                           ).save_pretrained(folder)
        else:
            # auto_map (AutoConfig / AutoModel are added on save; the zero-shot pipeline looks up this one): the folder
            # loads with trust_remote_code=True, no dinoforge.
            self.model.config.auto_map = {**(getattr(self.model.config, "auto_map", None) or {}),
                                          "AutoModelForZeroShotImageClassification": "dual_encoder.DualEncoderModel"}
            self.model.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            self.image_processor.save_pretrained(folder)


__all__ = [
    "LOGIT_SCALE_INIT",
    "LOGIT_SCALE_MAX",
    "AlignedExport",
    "TextAlignmentConfig",
    "TextAlignmentForPretraining",
    "TextAlignmentOutput",
    "to_vision_text_dual_encoder",
]
