"""An image-text dual encoder in the style of transformers' `VisionTextDualEncoderModel`, for what that class
cannot express: dino.txt's image embedding (Jose et al. 2025; dinov3 `eval/text/vision_tower.py`).

dino.txt keeps the DINO backbone frozen, adds a few trainable transformer blocks on top of its (final-normed)
output tokens, then a LayerNorm, and embeds an image as its CLS token concatenated with the mean of its patch
tokens. With no added blocks and `image_embedding="cls"` this model computes exactly what
`VisionTextDualEncoderModel` computes (the pooled output of each tower, a bias-free projection, cosine logits
times `exp(logit_scale)`); the parameter names are the same.

This file imports only transformers and torch: an exported folder carries it (`auto_map`), so it loads with
`AutoModel.from_pretrained(folder, trust_remote_code=True)` without dinoforge, and serves
`pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)` (the forward returns
`logits_per_image` like CLIP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, Dinov2Config, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer, Dinov2LayerScale
from transformers.utils import ModelOutput

IMAGE_EMBEDDINGS = ("cls", "cls_mean_patch")


def _sub_config(value: PretrainedConfig | dict | None, default_type: str) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    values = dict(value or {})
    return AutoConfig.for_model(values.pop("model_type", default_type), **values)


class DualEncoderConfig(PretrainedConfig):
    """A vision config and a text config (any `AutoModel` towers), the shared embedding size, and dino.txt's
    options: `image_embedding` ("cls" | "cls_mean_patch"), `num_head_blocks` trainable transformer blocks on top
    of the vision tower (DINOv2 blocks with LayerScale 1e-5 and SwiGLU when `head_swiglu`), their drop path."""

    model_type = "dinoforge_dual_encoder"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: PretrainedConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        projection_dim: int = 512,
        image_embedding: str = "cls",
        num_head_blocks: int = 0,
        head_drop_path_rate: float = 0.0,
        head_swiglu: bool = True,
        logit_scale_init_value: float = 2.6592,
        **kwargs,
    ):
        if image_embedding not in IMAGE_EMBEDDINGS:
            raise ValueError(f"image_embedding must be one of {IMAGE_EMBEDDINGS}, got {image_embedding!r}")
        if num_head_blocks < 0:
            raise ValueError(f"num_head_blocks must be >= 0, got {num_head_blocks}")
        self.vision_config = _sub_config(vision_config, "dinov2")
        self.text_config = _sub_config(text_config, "bert")
        self.projection_dim = projection_dim
        self.image_embedding = image_embedding
        self.num_head_blocks = num_head_blocks
        self.head_drop_path_rate = head_drop_path_rate
        self.head_swiglu = head_swiglu
        self.logit_scale_init_value = logit_scale_init_value
        super().__init__(**kwargs)

    @property
    def expressible_as_stock(self) -> bool:
        """True when `VisionTextDualEncoderModel` computes the same function (no added blocks, CLS embedding)."""
        return self.num_head_blocks == 0 and self.image_embedding == "cls"


@dataclass
class DualEncoderOutput(ModelOutput):
    """As transformers' `CLIPOutput`: `logits_per_image` `[images, texts]`, normalised embeddings."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None


class VisionHead(nn.Module):
    """dino.txt's `VisionHead`: transformer blocks over the vision tower's output tokens, then a LayerNorm."""

    def __init__(self, width: int, num_heads: int, num_blocks: int, drop_path_rate: float, swiglu: bool,
                 layer_norm_eps: float = 1e-6):
        super().__init__()
        block_config = Dinov2Config(hidden_size=width, num_attention_heads=num_heads, layerscale_value=1e-5,
                                    drop_path_rate=drop_path_rate, use_swiglu_ffn=swiglu, layer_norm_eps=layer_norm_eps)
        block_config._attn_implementation = "sdpa"
        self.blocks = nn.ModuleList(Dinov2Layer(block_config) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)


def prefix_tokens(vision_config: PretrainedConfig) -> int:
    """Tokens before the patches in a ViT's `last_hidden_state`: CLS + register tokens."""
    return 1 + int(getattr(vision_config, "num_register_tokens", 0) or 0)


class DualEncoderPreTrainedModel(PreTrainedModel):
    config_class = DualEncoderConfig
    base_model_prefix = "dual_encoder"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The towers keep their own init (PreTrainedModels init their own modules). Projections: normal with std
        # in_features^-0.5 (dino.txt's projection); head blocks as dinov3's `init_weights_vit` (trunc-normal 0.02,
        # zero biases, LayerScale 1e-5); the log-scale at its configured start.
        if isinstance(module, nn.Linear) and module.bias is None:
            init.normal_(module.weight, std=module.in_features**-0.5)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, Dinov2LayerScale):
            init.constant_(module.lambda1, 1e-5)
        elif isinstance(module, DualEncoderModel):
            init.constant_(module.logit_scale, float(self.config.logit_scale_init_value))


class DualEncoderModel(DualEncoderPreTrainedModel):
    """`vision_model` → (`vision_head`) → image embedding → `visual_projection`; `text_model` pooled output →
    `text_projection`; logits = cosine × `exp(logit_scale)`. Names as in `VisionTextDualEncoderModel`."""

    def __init__(self, config: DualEncoderConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config)
        self.text_model = AutoModel.from_config(config.text_config)
        width = config.vision_config.hidden_size
        self.vision_head = (
            VisionHead(width, config.vision_config.num_attention_heads, config.num_head_blocks,
                       config.head_drop_path_rate, config.head_swiglu)
            if config.num_head_blocks else None
        )
        image_dim = width * (2 if config.image_embedding == "cls_mean_patch" else 1)
        self.visual_projection = nn.Linear(image_dim, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    def image_features_before_projection(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image embedding before the projection (see `pool_image`)."""
        return self.pool_image(self.vision_model(pixel_values=pixel_values, return_dict=True))

    def pool_image(self, vision_outputs: ModelOutput) -> torch.Tensor:
        """The vision tower's pooled output ("cls" without head blocks, as `VisionTextDualEncoderModel`), or the
        CLS token (‖ mean patch token) of its output tokens after the head blocks."""
        if self.vision_head is None and self.config.image_embedding == "cls":
            return vision_outputs.pooler_output
        return self.embed_tokens(vision_outputs.last_hidden_state)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Head blocks (if any) over the tower's output tokens, then the configured embedding of the result."""
        if self.vision_head is not None:
            tokens = self.vision_head(tokens)
        cls = tokens[:, 0]
        if self.config.image_embedding == "cls":
            return cls
        return torch.cat((cls, tokens[:, prefix_tokens(self.config.vision_config):].mean(dim=1)), dim=-1)

    def no_weight_decay(self) -> set[str]:
        """Parameters no optimizer should weight-decay (CLIP / dino.txt rule): gains, biases, the log-scale."""
        return {name for name, p in self.named_parameters() if p.ndim < 2}

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected (not normalised) image embeddings `[B, projection_dim]`."""
        return self.visual_projection(self.image_features_before_projection(pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """Projected (not normalised) text embeddings `[B, projection_dim]` from the text tower's pooled output."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        return self.text_projection(out.pooler_output)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_loss: bool = False,
        **_,
    ) -> DualEncoderOutput:
        image_embeds = self.get_image_features(pixel_values)
        text_embeds = self.get_text_features(input_ids, attention_mask, token_type_ids, position_ids)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        logits_per_text = text_embeds @ image_embeds.T * self.logit_scale.exp()
        loss = None
        if return_loss:  # this batch only (training uses the global-batch loss in dinoforge's modeling.losses)
            labels = torch.arange(len(logits_per_text), device=logits_per_text.device)
            ce = nn.functional.cross_entropy
            loss = (ce(logits_per_text, labels) + ce(logits_per_text.T, labels)) / 2
        return DualEncoderOutput(loss=loss, logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                                 text_embeds=text_embeds, image_embeds=image_embeds)


__all__ = ["DualEncoderConfig", "DualEncoderModel", "DualEncoderOutput", "DualEncoderPreTrainedModel", "VisionHead"]
