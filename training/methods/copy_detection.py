"""Copy detection (`method: copy_detection`), the SSCD recipe: the `copy_detection` section (descriptor and loss)
and `edits` (the copy edits of `training/data/copy_edits.py`) on top of the two-view `model` section (ResNet or
ViT). The model is `modeling.copy_detection.CopyDetectionForPretraining`; recipes:
configs/copy_detection_quickstart.yaml (CPU minutes), configs/copy_detection.yaml (ResNet-50, 512-d)."""

from __future__ import annotations

from dataclasses import dataclass, field

from modeling import CopyDetectionConfig, CopyDetectionForPretraining

from ..config import check
from ..data.copy_edits import CopyEditsConfig
from .registry import Method, register_method
from .two_view import TwoViewTrainConfig, backbone_config, backbone_warmup, build_two_view_model


@dataclass
class CopyDetectionSection:
    """Defaults: the paper's (512-d descriptor, GeM p = 3 on a ConvNet, τ 0.05, KoLeo weight 30)."""

    descriptor_dim: int = field(default=512, metadata=check(ge=1))
    gem_p: float = field(default=3.0, metadata=check(gt=0))
    pooling: str | None = field(default=None, metadata=check(choices=(None, "gem", "cls")))  # None: by backbone
    temperature: float = field(default=0.05, metadata=check(gt=0))
    koleo_weight: float = field(default=30.0, metadata=check(ge=0))
    zero_init_residual: bool = False
    collapse_threshold: float = field(default=0.05, metadata=check(ge=0))  # health: descriptor_std below warns


@dataclass
class CopyDetectionTrainConfig(TwoViewTrainConfig):
    """`train.py` config of copy detection: the shared sections + `model`, `copy_detection`, `edits` (the `views`
    section of the two-view methods is unused: the edits replace it)."""

    copy_detection: CopyDetectionSection = field(default_factory=CopyDetectionSection)
    edits: CopyEditsConfig = field(default_factory=CopyEditsConfig)


def build_copy_detection(cfg: CopyDetectionTrainConfig) -> CopyDetectionForPretraining:
    c = cfg.copy_detection
    config = CopyDetectionConfig(
        backbone_config=backbone_config(cfg.model, cfg.crops.global_size), descriptor_dim=c.descriptor_dim,
        pooling=c.pooling, gem_p=c.gem_p, loss_temperature=c.temperature, koleo_weight=c.koleo_weight,
        image_size=cfg.crops.global_size, zero_init_residual=c.zero_init_residual,
        collapse_threshold=c.collapse_threshold,
    )
    return build_two_view_model(cfg, CopyDetectionForPretraining, config)


COPY_DETECTION = register_method(
    Method(
        name="copy_detection",
        config_class=CopyDetectionTrainConfig,
        build_model=build_copy_detection,
        schedules=backbone_warmup,  # fresh heads on a loaded backbone: the only schedule
        description="copy-detection descriptor (SSCD: GeM + projection, InfoNCE between edited copies + KoLeo, "
        "Pizzi et al. 2022)",
    )
)
