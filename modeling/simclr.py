"""SimCLR pretraining model (Chen et al. 2020; google-research/simclr `objective.add_contrastive_loss`).

One backbone + projection head embeds both views; NT-Xent scores each of the 2B embeddings against every other
embedding of the global batch (both views of every process, gathered with gradient) and takes the other view of
the same image as its positive. No momentum encoder, no predictor: both views get gradients. On small data it
learned within a few hundred steps where MoCo v3 did not (docs/small_data.md, finding 7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .contrastive_losses import nt_xent_loss
from .method import PretrainingMethod
from .two_view import (
    BackboneConfig,
    TwoViewPreTrainedModel,
    TwoViewPretrainingConfig,
    backbone_dim,
    batchnorm_mlp,
    build_backbone,
    l2_normalized_std,
    mlp_dims,
    pooled_features,
)


class SimCLRConfig(TwoViewPretrainingConfig):
    """Backbone + projection head (`projector_layers` linears of width `hidden_dim`, BatchNorm + ReLU between
    them, BatchNorm on the output as SimCLR's head, unless `projector_last_bn` is False) + the NT-Xent temperature.

    Health: `embedding_std` below `collapse_threshold` (every image the same embedding)."""

    model_type = "dinoforge_simclr"

    def __init__(
        self,
        backbone_config: BackboneConfig | dict | None = None,
        projector_layers: int = 2,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        loss_temperature: float = 0.1,
        zero_init_residual: bool = False,
        collapse_threshold: float = 0.05,
        projector_last_bn: bool = True,
        **kwargs,
    ):
        self.projector_layers = projector_layers
        self.projector_last_bn = projector_last_bn
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        self.loss_temperature = loss_temperature
        self.collapse_threshold = collapse_threshold
        super().__init__(backbone_config=backbone_config, zero_init_residual=zero_init_residual, **kwargs)


@dataclass
class SimCLROutput(ModelOutput):
    """`positive_similarity`: mean cosine between the two views' embeddings of an image; `embedding_std`: spread
    of the embeddings over the batch (`l2_normalized_std`, 0 = collapsed)."""

    loss: torch.Tensor | None = None
    positive_similarity: torch.Tensor | None = None
    embedding_std: torch.Tensor | None = None


class SimCLRForPretraining(TwoViewPreTrainedModel, PretrainingMethod):
    """`backbone` → `projector` on both views, NT-Xent over the global batch (`modeling.losses.nt_xent_loss`)."""

    config_class = SimCLRConfig
    config: SimCLRConfig
    base_model_prefix = "simclr"

    def __init__(self, config: SimCLRConfig):
        super().__init__(config)
        self.backbone = build_backbone(config.backbone_config)
        dims = mlp_dims(backbone_dim(config.backbone_config), config.hidden_dim, config.out_dim,
                        config.projector_layers)
        self.projector = batchnorm_mlp(dims, last_bn=config.projector_last_bn)
        self.post_init()
        self._start_backbone_(self.backbone)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, **_: float) -> SimCLROutput:
        """`view1`, `view2` `[B, 3, H, W]`: the two augmented views of the same B images."""
        # One pass over both views, as google-research/simclr concatenates them: BatchNorm statistics are over the
        # 2B views together (per-view statistics would differ between the positives of a pair).
        z1, z2 = self.projector(pooled_features(self.backbone, torch.cat((view1, view2)))).chunk(2)
        loss = nt_xent_loss(z1, z2, self.config.loss_temperature)
        with torch.no_grad():
            positive = nn.functional.cosine_similarity(z1, z2).mean()
            spread = l2_normalized_std(torch.cat((z1, z2)))
        return SimCLROutput(loss=loss, positive_similarity=positive, embedding_std=spread)

    # ---- the method protocol (modeling/method.py)

    def trainable_parts(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "projector": self.projector}

    def health(self, metrics: dict[str, float]) -> list[str]:
        if metrics.get("embedding_std", 1.0) < self.config.collapse_threshold:
            return [f"collapse: the embeddings of all images are nearly the same vector (embedding_std "
                    f"{metrics['embedding_std']:.3g} < {self.config.collapse_threshold})"]
        return []

    def model_card_rows(self, config: dict[str, Any]) -> dict[str, str]:
        c = self.config
        rows = self._backbone_rows()
        rows["projector"] = f"{c.projector_layers} layers, hidden {c.hidden_dim}, out {c.out_dim} (BatchNorm)"
        rows["loss"] = f"NT-Xent over both views of the global batch, τ {c.loss_temperature}"
        return rows

    def load_backbone_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start the backbone from one backbone's weights (`model.init_from`)."""
        self.backbone.load_state_dict(state_dict)
