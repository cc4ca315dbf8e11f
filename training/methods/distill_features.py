"""Feature distillation (`method: distill_features`): the `teacher`, `students`, `loss` and `views` sections, the
model builder and the per-student learning rates. The model is `modeling.feature_distillation`; recipes:
configs/distill_features_*.yaml.

Data: the `two_views` pipeline. Feature distillation needs the teacher and the student to see the *same* image
("consistent teaching"), with strong augmentation as the only source of variety; it has no use for iBOT masks,
and local crops would cost a teacher forward each for targets of little value (a ViT teacher's features of a
small crop are poor). Both views of an image are distilled, so a batch of B images gives 2B training images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from modeling.feature_distillation import (
    STUDENT_KINDS,
    FeatureDistillConfig,
    FeatureDistillForPretraining,
    load_feature_teacher,
    patch_size_of,
    pooled_and_dense,
    timm_pretrained_cfg,
)
from modeling.two_view import sync_batch_norm

from ..build import backbone_config, load_backbone
from ..config import ConfigError, check
from ..data.two_views import ViewsConfig
from ..train_config import TrainConfig
from .distill import StudentBase, _student_names, evaluate_students, require_teacher_path
from .registry import Method, Schedule, register_method

logger = logging.getLogger(__name__)


@dataclass
class FeatureStudentConfig(StudentBase):
    """A student of any architecture. `arch: vit` — our ViT (the `model` keys: preset, sizes, `patch_size`,
    `init_from` a DINOv2 source); `arch: timm` — `timm_name` (e.g. resnet18, convnext_atto, efficientnet_b0) with
    `timm_kwargs` for `timm.create_model`, random init, or `init_from` any timm Hub repo / `TimmWrapperModel` folder;
    `arch: transformers` — `init_from` a Hub id / folder of a transformers vision model, or `hf_config` (a config
    dict with `model_type`, e.g. `{model_type: convnext, depths: [2, 2, 2, 2]}`) for a fresh one."""

    arch: str = field(default="vit", metadata=check(choices=STUDENT_KINDS))
    timm_name: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    hf_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class FeatureTeacherConfig:
    """Any vision backbone `AutoModel.from_pretrained` loads (stock DINOv2 / DINOv3, CLIP / SigLIP, timm Hub repos,
    our `backbone/` or `pretraining/` folders). `image_size`: the size the teacher sees (the views are resized to
    it; None: the view size, which must then be a multiple of its patch size)."""

    path: str | None = None
    image_size: int | None = field(default=None, metadata=check(ge=1))


@dataclass
class FeatureLossConfig:
    pooled_weight: float = field(default=1.0, metadata=check(ge=0))
    dense_weight: float = field(default=1.0, metadata=check(ge=0))
    kind: str = field(default="mse", metadata=check(choices=("mse", "cosine")))  # mse: LightlyTrain's


@dataclass
class DistillFeaturesTrainConfig(TrainConfig):
    """`distill.py` config of feature distillation: the shared sections + `teacher`, `students`, `loss`, `views`."""

    method: str = "distill_features"
    teacher: FeatureTeacherConfig = field(default_factory=FeatureTeacherConfig)
    students: list[FeatureStudentConfig] = field(default_factory=lambda: [FeatureStudentConfig()],
                                                 metadata=check(rule=_student_names))
    loss: FeatureLossConfig = field(default_factory=FeatureLossConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)


def _student(s: FeatureStudentConfig, view_size: int):
    """(kind, fresh-or-loaded backbone) of one student entry."""
    if s.arch == "vit":
        patch = s.patch_size or 14
        if view_size % patch:
            raise ConfigError(f"student {s.name!r}: the views are {view_size} px, not a multiple of its patch size "
                              f"{patch}: use crops.global_size={view_size // patch * patch} or "
                              f"{(view_size // patch + 1) * patch}, or set its patch_size")
        config = backbone_config(replace(s, patch_size=patch), s.image_size or view_size)
        if s.init_from:
            return load_backbone(s.init_from, s.drop_path_rate)
        from modeling import DinoVisionModel

        return DinoVisionModel(config)
    if s.arch == "timm":
        from transformers import AutoModel, TimmWrapperConfig, TimmWrapperModel

        if s.init_from:
            model = AutoModel.from_pretrained(s.init_from)
        elif s.timm_name:
            model = TimmWrapperModel(TimmWrapperConfig(architecture=s.timm_name, model_args=dict(s.timm_kwargs) or None))
        else:
            raise ConfigError(f"student {s.name!r}: arch=timm needs timm_name (e.g. resnet18) or init_from")
        # What AutoImageProcessor builds the export's TimmWrapperImageProcessor from (config.json).
        model.config.pretrained_cfg = timm_pretrained_cfg(view_size)
        return model
    from transformers import AutoConfig, AutoModel

    if s.init_from:
        return AutoModel.from_pretrained(s.init_from)
    if not s.hf_config.get("model_type"):
        raise ConfigError(f"student {s.name!r}: arch=transformers needs init_from (a Hub id / folder) or hf_config "
                          "with a model_type (e.g. {model_type: convnext})")
    values = {k: v for k, v in s.hf_config.items() if k != "model_type"}
    return AutoModel.from_config(AutoConfig.for_model(s.hf_config["model_type"], **values))


@torch.no_grad()
def _widths(model: torch.nn.Module, size: int, patch: int | None) -> tuple[int, int]:
    was_training = model.training
    model.eval()
    pooled, dense = pooled_and_dense(model, torch.zeros(2, 3, size, size), patch)
    model.train(was_training)
    return pooled.shape[1], dense.shape[1]


def build_distill_features(cfg: DistillFeaturesTrainConfig) -> FeatureDistillForPretraining:
    """Load the teacher, build (or load) the students, measure every width with one dry run, project."""
    try:
        teacher = load_feature_teacher(require_teacher_path(cfg))
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from e
    view = cfg.crops.global_size
    t_patch = patch_size_of(teacher)
    t_size = cfg.teacher.image_size or view
    if t_patch and t_size % t_patch:
        raise ConfigError(f"the teacher sees {t_size}x{t_size} px, not a multiple of its patch size {t_patch}: set "
                          f"teacher.image_size={t_size // t_patch * t_patch} or {(t_size // t_patch + 1) * t_patch} "
                          f"(the {view}-px views are resized to it) or crops.global_size")
    t_pooled, t_dense = _widths(teacher, t_size, t_patch)
    students, specs = {}, {}
    for s in cfg.students:
        backbone = _student(s, view)
        kind = "vit" if type(backbone).__name__ == "DinoVisionModel" else s.arch
        patch = patch_size_of(backbone)
        pooled, dense = _widths(backbone, view, patch)
        students[s.name] = backbone
        specs[s.name] = {"kind": kind, "config": backbone.config.to_dict(), "pooled_dim": pooled,
                         "dense_dim": dense, "patch_size": patch}
        logger.info("student %s: %s, %.2fM parameters, pooled width %d, dense width %d", s.name,
                    type(backbone).__name__, sum(p.numel() for p in backbone.parameters()) / 1e6, pooled, dense)
    model = FeatureDistillForPretraining(FeatureDistillConfig(
        teacher_path=cfg.teacher.path, teacher_pooled_dim=t_pooled, teacher_dense_dim=t_dense,
        teacher_patch_size=t_patch, teacher_image_size=cfg.teacher.image_size, students=specs,
        pooled_weight=cfg.loss.pooled_weight, dense_weight=cfg.loss.dense_weight, loss_kind=cfg.loss.kind,
        init_seed=cfg.train.seed,
    ))
    for s in cfg.students:
        if s.init_from:  # loaded weights replace the fresh ones the model built from the same config
            model.students[s.name].load_state_dict(students[s.name].state_dict())
            logger.info("student %s: weights from %s", s.name, s.init_from)
        if s.gradient_checkpointing:
            model.students[s.name].gradient_checkpointing_enable()
        if s.compile:
            model.students[s.name].compile()
    model.attach_teacher(teacher)
    logger.info("teacher %s: %s, pooled width %d, dense width %d, patch %s, input %d px (frozen, not saved in "
                "checkpoints)", cfg.teacher.path, type(teacher).__name__, t_pooled, t_dense, t_patch, t_size)
    return sync_batch_norm(model.train())  # CNN students: BatchNorm over the global batch, as one process


def feature_schedules(cfg: DistillFeaturesTrainConfig) -> dict[str, Schedule]:
    """Per student `lr_scale/<name>/<part>` (its base_lr relative to optim.base_lr; backbone 0 during
    `head_warmup_steps`, so fresh projections settle on a pretrained student first)."""
    schedules: dict[str, Schedule] = {}
    for s in cfg.students:
        scale = 1.0
        if s.base_lr is not None:
            if cfg.optim.base_lr == 0:
                raise ConfigError(f"student {s.name!r} sets base_lr but optim.base_lr is 0 (the lr it scales)")
            scale = s.base_lr / cfg.optim.base_lr
            schedules[f"lr_scale/{s.name}/projector"] = lambda step, v=scale: v
        if s.base_lr is not None or s.head_warmup_steps > 0:
            n = s.head_warmup_steps
            schedules[f"lr_scale/{s.name}/backbone"] = lambda step, v=scale, n=n: 0.0 if step < n else v
    return schedules


DISTILL_FEATURES = register_method(
    Method(
        name="distill_features",
        config_class=DistillFeaturesTrainConfig,
        build_model=build_distill_features,
        schedules=feature_schedules,
        evaluate=evaluate_students,
        description="feature distillation (a student of any architecture regresses a frozen teacher's pooled and "
        "dense features, LightlyTrain-style)",
    )
)
