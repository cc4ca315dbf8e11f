"""MoCo v3 pretraining model (Chen, Xie & He 2021; facebookresearch/moco-v3 `moco/builder.py`, `vits.py`).

A query encoder (backbone + BatchNorm MLP projector + predictor) and a momentum encoder (EMA of backbone +
projector) see the two views of every image; the loss is the symmetric InfoNCE of each view's query against the
other view's momentum keys, gathered from every process (`modeling.losses.moco_v3_loss`).

The reference builds two variants, both here: `MoCo_ViT` (3-layer projector, predictor with a last BatchNorm,
τ 0.2, a frozen random patch projection and fixed 2-D sin-cos position embeddings — the paper's stability trick)
and `MoCo_ResNet` (2-layer projector, predictor without a last BatchNorm, τ 1.0, zero-initialised residuals);
`MoCoV3Config` says which through `projector_layers`, `predictor_last_bn`, `loss_temperature` and the ViT switches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .losses import moco_v3_loss
from .method import PretrainingMethod
from .two_view import (
    BackboneConfig,
    TwoViewPreTrainedModel,
    TwoViewPretrainingConfig,
    backbone_dim,
    batchnorm_mlp,
    build_backbone,
    copy_weights_,
    freeze_patch_embedding_,
    freeze_position_embedding_,
    is_convnet,
    l2_normalized_std,
    mlp_dims,
    momentum_update_,
    pooled_two_views,
    sincos_position_embedding_,
)


class MoCoV3Config(TwoViewPretrainingConfig):
    """Backbone + projector / predictor sizes + temperature. Defaults are the reference's ViT settings
    (`MoCo_ViT`, `--moco-t=.2 --stop-grad-conv1`); for a ResNet use `projector_layers=2`,
    `predictor_last_bn=False`, `loss_temperature=1.0` (`MoCo_ResNet`, the default `--moco-t`)."""

    model_type = "dinoforge_mocov3"

    def __init__(
        self,
        backbone_config: BackboneConfig | dict | None = None,
        projector_layers: int = 3,
        predictor_layers: int = 2,
        hidden_dim: int = 4096,
        out_dim: int = 256,
        predictor_last_bn: bool = True,
        loss_temperature: float = 0.2,
        freeze_patch_embedding: bool = True,
        sincos_position_embedding: bool = True,
        zero_init_residual: bool = True,
        collapse_threshold: float = 0.05,
        **kwargs,
    ):
        if projector_layers < 1 or predictor_layers < 1:
            raise ValueError(f"projector_layers and predictor_layers must be >= 1, got {projector_layers}, "
                             f"{predictor_layers}")
        if loss_temperature <= 0:
            raise ValueError(f"loss_temperature must be > 0, got {loss_temperature}")
        self.projector_layers = projector_layers
        self.predictor_layers = predictor_layers
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        self.predictor_last_bn = predictor_last_bn
        self.loss_temperature = loss_temperature
        self.freeze_patch_embedding = freeze_patch_embedding
        self.sincos_position_embedding = sincos_position_embedding
        self.collapse_threshold = collapse_threshold
        super().__init__(backbone_config=backbone_config, zero_init_residual=zero_init_residual, **kwargs)


@dataclass
class MoCoV3Output(ModelOutput):
    """`key_std`: spread of the momentum keys over the batch (`l2_normalized_std`, ≈ 1 spread out, 0 collapsed);
    `positive_similarity`: mean cosine between each query and its positive key."""

    loss: torch.Tensor | None = None
    positive_similarity: torch.Tensor | None = None
    key_std: torch.Tensor | None = None


class MoCoV3ForPretraining(TwoViewPreTrainedModel, PretrainingMethod):
    """`backbone` → `projector` → `predictor` (queries, trained) and `momentum_backbone` → `momentum_projector`
    (keys, EMA of the first two, no gradient). `save_pretrained` keeps both encoders."""

    config_class = MoCoV3Config
    config: MoCoV3Config
    base_model_prefix = "mocov3"

    def __init__(self, config: MoCoV3Config):
        super().__init__(config)
        dim = backbone_dim(config.backbone_config)
        self.backbone = build_backbone(config.backbone_config)
        projector = mlp_dims(dim, config.hidden_dim, config.out_dim, config.projector_layers)
        predictor = mlp_dims(config.out_dim, config.hidden_dim, config.out_dim, config.predictor_layers)
        self.projector = batchnorm_mlp(projector, last_bn=True)
        self.predictor = batchnorm_mlp(predictor, last_bn=config.predictor_last_bn)
        self.momentum_backbone = build_backbone(config.backbone_config)
        self.momentum_projector = batchnorm_mlp(projector, last_bn=True)
        self.post_init()
        self._start_backbone_(self.backbone)
        if not is_convnet(config.backbone_config) and config.sincos_position_embedding:
            sincos_position_embedding_(self.backbone)
        copy_weights_(self.momentum_backbone, self.backbone)
        copy_weights_(self.momentum_projector, self.projector)
        self._freeze_()

    def _freeze_(self) -> None:
        self.momentum_backbone.requires_grad_(False)
        self.momentum_projector.requires_grad_(False)
        if not is_convnet(self.config.backbone_config):
            if self.config.sincos_position_embedding:
                freeze_position_embedding_(self.backbone)
            if self.config.freeze_patch_embedding:
                freeze_patch_embedding_(self.backbone)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, **_: float) -> MoCoV3Output:
        """`view1`, `view2` `[B, 3, H, W]`: the two augmented views of the same B images."""
        h1, h2 = pooled_two_views(self.backbone, view1, view2)
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))
        with torch.no_grad():
            g1, g2 = pooled_two_views(self.momentum_backbone, view1, view2)
            k1, k2 = self.momentum_projector(g1), self.momentum_projector(g2)
        loss = moco_v3_loss(q1, q2, k1, k2, self.config.loss_temperature)
        with torch.no_grad():
            positive = 0.5 * (F.cosine_similarity(q1, k2).mean() + F.cosine_similarity(q2, k1).mean())
            key_std = l2_normalized_std(torch.cat((k1, k2)))
        return MoCoV3Output(loss=loss, positive_similarity=positive, key_std=key_std)

    # ---- the method protocol (modeling/method.py)

    def trainable_parts(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "projector": self.projector, "predictor": self.predictor}

    @torch.no_grad()
    def after_optimizer_step(self, momentum: float = 0.99, **_: float) -> None:
        """The momentum encoder follows the query encoder. The reference updates it at the start of the next
        iteration's forward with that iteration's momentum; doing it here with the same value is identical
        (the method's `momentum` schedule gives the value of the next iteration)."""
        momentum_update_(self.momentum_backbone, self.backbone, momentum)
        momentum_update_(self.momentum_projector, self.projector, momentum)

    def health(self, metrics: dict[str, float]) -> list[str]:
        if metrics.get("key_std", 1.0) < self.config.collapse_threshold:
            return [f"collapse: the momentum keys of all images are nearly the same vector (key_std "
                    f"{metrics['key_std']:.3g} < {self.config.collapse_threshold})"]
        return []

    def model_card_rows(self, config: dict[str, Any]) -> dict[str, str]:
        c = self.config
        rows = self._backbone_rows()
        rows["projector / predictor"] = (f"{c.projector_layers} / {c.predictor_layers} layers, hidden {c.hidden_dim}, "
                                         f"out {c.out_dim} (BatchNorm)")
        rows["loss"] = f"symmetric InfoNCE against momentum keys of the global batch, τ {c.loss_temperature}"
        section = config.get("moco") or {}
        if section:
            rows["momentum"] = f"{section.get('momentum')} → {section.get('momentum_end')} (cosine)"
        if not is_convnet(c.backbone_config):
            rows["ViT stability"] = (f"frozen random patch projection: {c.freeze_patch_embedding}; fixed 2-D sin-cos "
                                     f"position embedding: {c.sincos_position_embedding}")
        return rows

    def load_backbone_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start both encoders' backbones from one backbone's weights (`model.init_from`)."""
        self.backbone.load_state_dict(state_dict)
        self.momentum_backbone.load_state_dict(state_dict)
