"""Barlow Twins (`method: barlow_twins`): the `barlow` section and the model builder. The model is
`modeling.barlow_twins.BarlowTwinsForPretraining`; recipes: configs/barlow_twins_resnet50.yaml (LARS, the paper's
setting), configs/barlow_twins_vits16.yaml (AdamW: LARS collapses on ViTs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from modeling import BarlowTwinsConfig, BarlowTwinsForPretraining

from ..config import check
from .registry import Method, register_method
from .two_view import TwoViewTrainConfig, backbone_config, backbone_warmup, build_two_view_model


@dataclass
class BarlowSection:
    """Defaults: the reference (`--projector 8192-8192-8192 --lambd 0.0051`, zero-initialised ResNet residuals).
    `normalize_embeddings: false` drops the embeddings' BatchNorm (with `lambd: 0` the run collapses; the
    `health` signals say so)."""

    projector_dims: list[int] = field(default_factory=lambda: [8192, 8192, 8192], metadata=check(ge=1))
    lambd: float = field(default=0.0051, metadata=check(ge=0))
    normalize_embeddings: bool = True
    zero_init_residual: bool = True
    collapse_threshold: float = field(default=0.05, metadata=check(ge=0))  # health: embedding_std below this warns
    redundancy_threshold: float = field(default=0.75, metadata=check(ge=0))  # health: off_diagonal above this warns


@dataclass
class BarlowTwinsTrainConfig(TwoViewTrainConfig):
    """`train.py` config of Barlow Twins: the shared sections + `model`, `views`, `barlow`."""

    barlow: BarlowSection = field(default_factory=BarlowSection)


def build_barlow_twins(cfg: BarlowTwinsTrainConfig) -> BarlowTwinsForPretraining:
    b = cfg.barlow
    config = BarlowTwinsConfig(
        backbone_config=backbone_config(cfg.model, cfg.crops.global_size), projector_dims=b.projector_dims,
        lambd=b.lambd, normalize_embeddings=b.normalize_embeddings, zero_init_residual=b.zero_init_residual,
        collapse_threshold=b.collapse_threshold, redundancy_threshold=b.redundancy_threshold,
    )
    return build_two_view_model(cfg, BarlowTwinsForPretraining, config)


BARLOW_TWINS = register_method(
    Method(
        name="barlow_twins",
        config_class=BarlowTwinsTrainConfig,
        build_model=build_barlow_twins,
        schedules=backbone_warmup,  # fresh heads on a loaded backbone: the only schedule
        description="Barlow Twins (the cross-correlation of two views' embeddings driven to the identity, "
        "Zbontar et al. 2021)",
    )
)
