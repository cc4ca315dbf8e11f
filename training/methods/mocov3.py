"""MoCo v3 (`method: mocov3`): the `moco` section, the model builder and the momentum schedule. The model is
`modeling.mocov3.MoCoV3ForPretraining`; recipes: configs/mocov3_vits16.yaml, configs/mocov3_resnet50.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field

from modeling import MoCoV3Config, MoCoV3ForPretraining

from ..config import check
from .registry import Method, Schedule, register_method
from .two_view import TwoViewTrainConfig, backbone_config, backbone_warmup, build_two_view_model, momentum_schedule


@dataclass
class MoCoSection:
    """Defaults: the reference's ViT recipe (`MoCo_ViT`, `--moco-t=.2 --moco-m-cos --stop-grad-conv1`). Its
    ResNet recipe: `projector_layers: 2`, `predictor_last_bn: false`, `temperature: 1.0`."""

    projector_layers: int = field(default=3, metadata=check(ge=1))
    predictor_layers: int = field(default=2, metadata=check(ge=1))
    hidden_dim: int = field(default=4096, metadata=check(ge=1))
    out_dim: int = field(default=256, metadata=check(ge=1))
    predictor_last_bn: bool = True
    temperature: float = field(default=0.2, metadata=check(gt=0))
    momentum: float = field(default=0.99, metadata=check(ge=0, le=1))
    momentum_end: float = field(default=1.0, metadata=check(ge=0, le=1))  # cosine over the run; = momentum: fixed
    freeze_patch_embedding: bool = True  # ViT: the random patch projection is never trained
    sincos_position_embedding: bool = True  # ViT: fixed 2-D sin-cos position embedding
    zero_init_residual: bool = True  # ResNet: torchvision's zero_init_residual=True
    collapse_threshold: float = field(default=0.05, metadata=check(ge=0))  # health: key_std below this warns


@dataclass
class MoCoV3TrainConfig(TwoViewTrainConfig):
    """`train.py` config of MoCo v3: the shared sections + `model`, `views`, `moco`."""

    moco: MoCoSection = field(default_factory=MoCoSection)


def build_mocov3(cfg: MoCoV3TrainConfig) -> MoCoV3ForPretraining:
    m = cfg.moco
    config = MoCoV3Config(
        backbone_config=backbone_config(cfg.model, cfg.crops.global_size),
        projector_layers=m.projector_layers, predictor_layers=m.predictor_layers, hidden_dim=m.hidden_dim,
        out_dim=m.out_dim, predictor_last_bn=m.predictor_last_bn, loss_temperature=m.temperature,
        freeze_patch_embedding=m.freeze_patch_embedding, sincos_position_embedding=m.sincos_position_embedding,
        zero_init_residual=m.zero_init_residual, collapse_threshold=m.collapse_threshold,
    )
    return build_two_view_model(cfg, MoCoV3ForPretraining, config)


def mocov3_schedules(cfg: MoCoV3TrainConfig) -> dict[str, Schedule]:
    return {"momentum": momentum_schedule(cfg, cfg.moco.momentum, cfg.moco.momentum_end), **backbone_warmup(cfg)}


MOCOV3 = register_method(
    Method(
        name="mocov3",
        config_class=MoCoV3TrainConfig,
        build_model=build_mocov3,
        schedules=mocov3_schedules,
        description="MoCo v3 (symmetric InfoNCE between a query encoder with predictor and its momentum encoder, "
        "Chen, Xie & He 2021)",
    )
)
