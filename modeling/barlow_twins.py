"""Barlow Twins pretraining model (Zbontar et al. 2021; facebookresearch/barlowtwins `main.py`).

One backbone + projector (8192-8192-8192: bias-free linears with BatchNorm + ReLU between them) embeds both
views; the loss pushes the cross-correlation of the two views' batch-normalised embeddings, over the global
batch, towards the identity (`modeling.losses.barlow_twins_loss`). No momentum encoder, no negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .losses import barlow_twins_cross_correlation, barlow_twins_loss_from_correlation, off_diagonal
from .method import PretrainingMethod
from .two_view import (
    BackboneConfig,
    TwoViewPreTrainedModel,
    TwoViewPretrainingConfig,
    backbone_dim,
    batchnorm_mlp,
    build_backbone,
    l2_normalized_std,
    pooled_two_views,
)


class BarlowTwinsConfig(TwoViewPretrainingConfig):
    """Backbone + projector sizes + λ. `normalize_embeddings=False` drops the BatchNorm of the embeddings before
    the correlation: with λ = 0 nothing then keeps the dimensions apart and the run collapses (the `health`
    signals report it) — it exists to show what the normalisation and the off-diagonal term prevent.

    Health: `embedding_std` below `collapse_threshold` (every image the same embedding), or `off_diagonal` (RMS
    of the off-diagonal correlations, ≤ 1 with normalised embeddings) above `redundancy_threshold` (the
    dimensions have become copies of each other)."""

    model_type = "dinoforge_barlow_twins"

    def __init__(
        self,
        backbone_config: BackboneConfig | dict | None = None,
        projector_dims: Sequence[int] = (8192, 8192, 8192),
        lambd: float = 0.0051,
        normalize_embeddings: bool = True,
        zero_init_residual: bool = True,
        collapse_threshold: float = 0.05,
        redundancy_threshold: float = 0.75,
        **kwargs,
    ):
        if not projector_dims:
            raise ValueError("projector_dims must list at least the output size, e.g. [8192, 8192, 8192]")
        self.projector_dims = list(projector_dims)
        self.lambd = lambd
        self.normalize_embeddings = normalize_embeddings
        self.collapse_threshold = collapse_threshold
        self.redundancy_threshold = redundancy_threshold
        super().__init__(backbone_config=backbone_config, zero_init_residual=zero_init_residual, **kwargs)


@dataclass
class BarlowTwinsOutput(ModelOutput):
    """`on_diagonal`: mean of the correlation's diagonal (→ 1); `off_diagonal`: root mean square of the rest
    (→ 0); `embedding_std`: spread of the embeddings over the batch (`l2_normalized_std`, 0 = collapsed)."""

    loss: torch.Tensor | None = None
    on_diagonal: torch.Tensor | None = None
    off_diagonal: torch.Tensor | None = None
    embedding_std: torch.Tensor | None = None


class BarlowTwinsForPretraining(TwoViewPreTrainedModel, PretrainingMethod):
    """`backbone` → `projector` on both views; the loss batch-normalises the embeddings itself (the reference's
    `self.bn`, no affine, so it holds no parameters; its running statistics are never used)."""

    config_class = BarlowTwinsConfig
    config: BarlowTwinsConfig
    base_model_prefix = "barlow_twins"

    def __init__(self, config: BarlowTwinsConfig):
        super().__init__(config)
        self.backbone = build_backbone(config.backbone_config)
        # The reference's `sizes = [2048] + projector`: BatchNorm + ReLU after every linear but the last.
        self.projector = batchnorm_mlp([backbone_dim(config.backbone_config), *config.projector_dims], last_bn=False)
        self.post_init()
        self._start_backbone_(self.backbone)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, **_: float) -> BarlowTwinsOutput:
        """`view1`, `view2` `[B, 3, H, W]`: the two augmented views of the same B images."""
        h1, h2 = pooled_two_views(self.backbone, view1, view2)
        z1, z2 = self.projector(h1), self.projector(h2)
        c = barlow_twins_cross_correlation(z1, z2, normalize=self.config.normalize_embeddings)
        loss = barlow_twins_loss_from_correlation(c, self.config.lambd)
        with torch.no_grad():
            on = torch.diagonal(c).mean()
            off = off_diagonal(c).pow(2).mean().sqrt()
            spread = l2_normalized_std(torch.cat((z1, z2)))
        return BarlowTwinsOutput(loss=loss, on_diagonal=on, off_diagonal=off, embedding_std=spread)

    # ---- the method protocol (modeling/method.py)

    def trainable_parts(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "projector": self.projector}

    def health(self, metrics: dict[str, float]) -> list[str]:
        c = self.config
        if metrics.get("embedding_std", 1.0) < c.collapse_threshold:
            return [f"collapse: the embeddings of all images are nearly the same vector (embedding_std "
                    f"{metrics['embedding_std']:.3g} < {c.collapse_threshold})"]
        if metrics.get("off_diagonal", 0.0) > c.redundancy_threshold:
            return [f"dimensional collapse: the embedding's dimensions are nearly copies of each other (off-diagonal "
                    f"correlation RMS {metrics['off_diagonal']:.3g} > {c.redundancy_threshold})"]
        return []

    def model_card_rows(self, config: dict[str, Any]) -> dict[str, str]:
        c = self.config
        rows = self._backbone_rows()
        rows["projector"] = "-".join(str(d) for d in c.projector_dims) + " (BatchNorm + ReLU between layers)"
        rows["loss"] = (f"cross-correlation of {'batch-normalised ' if c.normalize_embeddings else ''}embeddings over "
                        f"the global batch → identity, λ {c.lambd}")
        return rows

    def load_backbone_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start the backbone from one backbone's weights (`model.init_from`)."""
        self.backbone.load_state_dict(state_dict)
