"""SimCLR (`method: simclr`): the `simclr` section and the model builder. The model is
`modeling.simclr.SimCLRForPretraining`; recipe: configs/small_data.yaml (a plain CNN on the `objects` set)."""

from __future__ import annotations

from dataclasses import dataclass, field

from modeling import SimCLRConfig, SimCLRForPretraining

from ..config import check
from .registry import Method, register_method
from .two_view import TwoViewTrainConfig, backbone_config, backbone_warmup, build_two_view_model


@dataclass
class SimCLRSection:
    """Defaults: SimCLR v1's head (2 layers, out 128) at hidden 2048, τ 0.1 (the reference's default flag)."""

    projector_layers: int = field(default=2, metadata=check(ge=1))
    hidden_dim: int = field(default=2048, metadata=check(ge=1))
    out_dim: int = field(default=128, metadata=check(ge=1))
    temperature: float = field(default=0.1, metadata=check(gt=0))
    zero_init_residual: bool = False
    last_bn: bool = True  # BatchNorm (no shift) on the projector's output, as the reference's head
    collapse_threshold: float = field(default=0.05, metadata=check(ge=0))  # health: embedding_std below this warns


@dataclass
class SimCLRTrainConfig(TwoViewTrainConfig):
    """`train.py` config of SimCLR: the shared sections + `model`, `views`, `simclr`."""

    simclr: SimCLRSection = field(default_factory=SimCLRSection)


def build_simclr(cfg: SimCLRTrainConfig) -> SimCLRForPretraining:
    s = cfg.simclr
    config = SimCLRConfig(
        backbone_config=backbone_config(cfg.model, cfg.crops.global_size), projector_layers=s.projector_layers,
        hidden_dim=s.hidden_dim, out_dim=s.out_dim, loss_temperature=s.temperature,
        zero_init_residual=s.zero_init_residual, collapse_threshold=s.collapse_threshold, projector_last_bn=s.last_bn,
    )
    return build_two_view_model(cfg, SimCLRForPretraining, config)


SIMCLR = register_method(
    Method(
        name="simclr",
        config_class=SimCLRTrainConfig,
        build_model=build_simclr,
        schedules=backbone_warmup,  # fresh heads on a loaded backbone: the only schedule
        description="SimCLR (NT-Xent between two views over the global batch, Chen et al. 2020)",
    )
)
