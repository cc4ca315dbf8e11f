"""DenseCL (`method: densecl`): the `densecl` section, the model builder and its schedules (key-encoder momentum,
dense loss weight). The model is `modeling.densecl.DenseCLForPretraining`; recipes:
configs/densecl_resnet50.yaml (the reference's ImageNet setting), configs/densecl_vits16.yaml (patch tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field

from modeling import DenseCLConfig, DenseCLForPretraining

from ..config import check
from .registry import Method, Schedule, register_method
from .two_view import TwoViewTrainConfig, backbone_config, backbone_warmup, build_two_view_model, momentum_schedule


@dataclass
class DenseCLSection:
    """Defaults: the reference's `densecl_imagenet_200ep.py` (neck 2048 → 2048 → 128, 65,536 keys per queue,
    τ 0.2, λ 0.5, momentum 0.999). `dense_warmup_steps` > 0 trains the global term alone first (the reference's
    `DenseCLWarmupHook`, unused by its ImageNet config)."""

    hidden_dim: int = field(default=2048, metadata=check(ge=1))
    out_dim: int = field(default=128, metadata=check(ge=1))
    queue_size: int = field(default=65536, metadata=check(ge=1))
    temperature: float = field(default=0.2, metadata=check(gt=0))
    dense_weight: float = field(default=0.5, metadata=check(ge=0, le=1))
    dense_warmup_steps: int = field(default=0, metadata=check(ge=0))
    momentum: float = field(default=0.999, metadata=check(ge=0, le=1))
    momentum_end: float = field(default=0.999, metadata=check(ge=0, le=1))  # = momentum: fixed, as the reference
    zero_init_residual: bool = False
    collapse_threshold: float = field(default=0.05, metadata=check(ge=0))  # health: key_std below this warns


@dataclass
class DenseCLTrainConfig(TwoViewTrainConfig):
    """`train.py` config of DenseCL: the shared sections + `model`, `views`, `densecl`."""

    densecl: DenseCLSection = field(default_factory=DenseCLSection)


def build_densecl(cfg: DenseCLTrainConfig) -> DenseCLForPretraining:
    d = cfg.densecl
    config = DenseCLConfig(
        backbone_config=backbone_config(cfg.model, cfg.crops.global_size), hidden_dim=d.hidden_dim,
        out_dim=d.out_dim, queue_size=d.queue_size, loss_temperature=d.temperature, dense_weight=d.dense_weight,
        zero_init_residual=d.zero_init_residual, collapse_threshold=d.collapse_threshold,
    )
    # Per-process BatchNorm, as the reference (plain BN + shuffle BN for the key encoder).
    return build_two_view_model(cfg, DenseCLForPretraining, config, global_batch_norm=False)


def densecl_schedules(cfg: DenseCLTrainConfig) -> dict[str, Schedule]:
    d = cfg.densecl
    return {
        "momentum": momentum_schedule(cfg, d.momentum, d.momentum_end),
        "dense_weight": lambda step: 0.0 if step < d.dense_warmup_steps else d.dense_weight,
        **backbone_warmup(cfg),
    }


DENSECL = register_method(
    Method(
        name="densecl",
        config_class=DenseCLTrainConfig,
        build_model=build_densecl,
        schedules=densecl_schedules,
        description="DenseCL (global and dense, per-location, contrastive learning against momentum-encoder "
        "queues, Wang et al. 2021)",
    )
)
