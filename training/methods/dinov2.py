"""DINOv2 (`method: dinov2`, the default): the config sections it adds to the shared ones, the model builder and
the teacher schedules. The model itself is `modeling.pretraining.DinoForPretraining`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from modeling import DinoForPretraining, DinoPretrainingConfig, DinoVisionConfig

from ..build import ModelConfig, backbone_config, folder_model_type, load_backbone
from ..config import check
from ..schedules import cosine_schedule
from ..train_config import TrainConfig
from .registry import Method, Schedule, register_method

logger = logging.getLogger(__name__)


@dataclass
class HeadsConfig:
    num_prototypes: int = field(default=65536, metadata=check(ge=1))
    bottleneck_dim: int = field(default=256, metadata=check(ge=1))
    hidden_dim: int = field(default=2048, metadata=check(ge=1))
    nlayers: int = field(default=3, metadata=check(ge=1))
    separate_ibot_head: bool = False
    ibot_num_prototypes: int | None = field(default=None, metadata=check(ge=1))  # None: num_prototypes
    ibot_bottleneck_dim: int | None = field(default=None, metadata=check(ge=1))  # None: bottleneck_dim
    ibot_hidden_dim: int | None = field(default=None, metadata=check(ge=1))  # None: hidden_dim


@dataclass
class LossConfig:
    dino_weight: float = field(default=1.0, metadata=check(ge=0))
    ibot_weight: float = field(default=1.0, metadata=check(ge=0))
    koleo_weight: float = field(default=0.1, metadata=check(ge=0))
    # softmax (official default config) | sinkhorn_knopp (L/g recipes)
    centering: str = field(default="softmax", metadata=check(choices=("softmax", "sinkhorn_knopp")))
    student_temp: float = field(default=0.1, metadata=check(gt=0))
    center_momentum: float = field(default=0.9, metadata=check(ge=0, le=1))


@dataclass
class MaskingConfig:
    ratio_min_max: tuple[float, float] = field(default=(0.1, 0.5), metadata=check(ge=0, le=1, ordered=True))
    sample_probability: float = field(default=0.5, metadata=check(ge=0, le=1))


@dataclass
class TeacherConfig:
    momentum: float = field(default=0.992, metadata=check(ge=0, le=1))
    momentum_end: float = field(default=1.0, metadata=check(ge=0, le=1))
    temp: float = field(default=0.07, metadata=check(gt=0))
    temp_warmup: float = field(default=0.04, metadata=check(gt=0))
    temp_warmup_epochs: int = field(default=30, metadata=check(ge=0))
    # steps a collapse signal (near-uniform or one-prototype targets) must last before the warning
    collapse_patience: int = field(default=100, metadata=check(ge=0))
    # entropy of the targets, as a fraction of log(prototypes), above which they count as near-uniform. 0.98 is
    # safe for full-size runs (early warm-up is high-entropy); on small sets runs that learned nothing sat at
    # 0.90-0.97 while the learning quickstart ends at 0.84 (docs/small_data.md)
    collapse_entropy_fraction: float = field(default=0.98, metadata=check(gt=0, le=1))


@dataclass
class DinoV2TrainConfig(TrainConfig):
    """`train.py` config of the DINOv2 method: the shared sections + `model`, `heads`, `loss`, `masking`,
    `teacher`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)


def pretraining_config(cfg: DinoV2TrainConfig, backbone: DinoVisionConfig) -> DinoPretrainingConfig:
    h, loss = cfg.heads, cfg.loss
    return DinoPretrainingConfig(
        backbone_config=backbone,
        num_prototypes=h.num_prototypes,
        hidden_dim=h.hidden_dim,
        bottleneck_dim=h.bottleneck_dim,
        head_nlayers=h.nlayers,
        separate_ibot_head=h.separate_ibot_head,
        ibot_num_prototypes=h.ibot_num_prototypes,
        ibot_hidden_dim=h.ibot_hidden_dim,
        ibot_bottleneck_dim=h.ibot_bottleneck_dim,
        dino_weight=loss.dino_weight,
        ibot_weight=loss.ibot_weight,
        koleo_weight=loss.koleo_weight,
        centering=loss.centering,
        student_temp=loss.student_temp,
        center_momentum=loss.center_momentum,
        collapse_patience=cfg.teacher.collapse_patience,
        collapse_entropy_fraction=cfg.teacher.collapse_entropy_fraction,
    )


def build_pretraining_model(cfg: DinoV2TrainConfig) -> DinoForPretraining:
    """Fresh model from the recipe, or `init_from`: our `pretraining/` folder continues with heads and centers;
    any other backbone source initialises student and teacher backbones, with fresh heads."""
    source = cfg.model.init_from
    if not source:
        model = DinoForPretraining(pretraining_config(cfg, backbone_config(cfg.model, cfg.crops.global_size)))
    elif Path(source).is_dir() and folder_model_type(Path(source)) == "dinoforge_pretraining":
        logger.info("continuing from %s (backbones, heads and loss centers)", source)
        model = DinoForPretraining.from_pretrained(source)
    else:
        backbone = load_backbone(source, cfg.model.drop_path_rate)
        model = DinoForPretraining(pretraining_config(cfg, backbone.config))
        state = backbone.state_dict()
        model.student["backbone"].load_state_dict(state)
        model.teacher["backbone"].load_state_dict(state)
        logger.info("initialised student and teacher backbones from %s (fresh heads)", source)
    resample_position_embeddings(model, cfg.model.image_size)
    if cfg.model.gradient_checkpointing:
        model.student["backbone"].gradient_checkpointing_enable()
    if cfg.model.compile:
        for tower in (model.student, model.teacher):
            tower["backbone"].compile()
    return model


def resample_position_embeddings(model: DinoForPretraining, image_size: int | None) -> None:
    """High-res phase: resample both towers' position-embedding grids once to `image_size` (saved that way),
    instead of interpolating at every step. Nothing to do when `image_size` is unset or already the grid."""
    if image_size is None or image_size == model.student_backbone.config.image_size:
        return
    old = model.student_backbone.config.image_size
    for tower in (model.student, model.teacher):
        tower["backbone"].resize_position_embeddings(image_size)
    model.config.backbone_config.image_size = image_size
    logger.info("resampled position embeddings from %d px to %d px", old, image_size)


def teacher_schedules(cfg: DinoV2TrainConfig) -> dict[str, Schedule]:
    """EMA momentum (cosine to `momentum_end` over the run) and teacher temperature (linear warm-up, then
    constant), as the official `CosineScheduler`s; `lr_scale/backbone` freezes the backbone for
    `model.head_warmup_steps` steps."""
    t, epoch = cfg.teacher, cfg.optim.iters_per_epoch
    total, warmup = cfg.optim.epochs * epoch, t.temp_warmup_epochs * epoch
    schedules: dict[str, Schedule] = {
        "momentum": lambda step: cosine_schedule(step, total, t.momentum, t.momentum_end),
        "teacher_temp": lambda step: cosine_schedule(step, warmup, t.temp, t.temp, warmup, t.temp_warmup),
    }
    if cfg.model.head_warmup_steps > 0:
        frozen = cfg.model.head_warmup_steps
        schedules["lr_scale/backbone"] = lambda step: 0.0 if step < frozen else 1.0
    return schedules


DINOV2 = register_method(
    Method(
        name="dinov2",
        config_class=DinoV2TrainConfig,
        build_model=build_pretraining_model,
        schedules=teacher_schedules,
        description="DINO + iBOT + KoLeo with an EMA teacher (DINOv2)",
    )
)
