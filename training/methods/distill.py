"""The paper's distillation recipe (`method: distill_dino`, the default of `distill.py`): the `teacher`, `students`,
`heads`, `loss`, `masking` and `ema` sections, the model builder and the schedules. The model is
`modeling.distillation.DistillDinoForPretraining`; recipes: configs/distill_*.yaml.

Several students train from one teacher forward per batch. Each has its own parameter groups (its parts are
`<name>/backbone`, `<name>/dino_head`, `<name>/ibot_head`), its own EMA and export (`backbone/<name>/`). What
"its own optimizer and schedules" means here: one AdamW holds every student's groups — AdamW's state is
per parameter, so that is the same as one optimizer per student — and a student's `base_lr` becomes the
schedule value `lr_scale/<name>/<part>` (= base_lr / optim.base_lr), which scales the shared warm-up + cosine
shape; `ema_momentum` likewise becomes `ema_momentum/<name>`. Gradient clipping is per part, hence per student.
Shared by all students: the lr/weight-decay schedule shapes, the optimizer type and betas, the batch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from modeling.distillation import DistillDinoConfig, DistillDinoForPretraining, load_dino_teacher

from ..build import ModelConfig, backbone_config, load_backbone
from ..config import ConfigError, check
from ..schedules import cosine_schedule
from ..train_config import TrainConfig
from .dinov2 import MaskingConfig
from .registry import Method, Schedule, register_method

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _student_names(students: list) -> str | None:
    names = [s.name for s in students]
    if not names:
        return "empty: list at least one student"
    bad = [n for n in names if not _NAME.fullmatch(n)]
    if bad:
        return f"invalid: student names {bad} may only use letters, digits, '_', '.', '-' (they name folders)"
    if len(set(names)) != len(names):
        return f"invalid: student names must be unique, got {names}"
    return None


@dataclass
class StudentBase(ModelConfig):
    """What every distillation student has: the `model` keys of train.py (preset, sizes, registers, `patch_size`,
    `init_from`, `gradient_checkpointing`, ...), its name (its export folder `backbone/<name>/` when there are
    several) and its own learning rate. No stochastic depth by default (the paper's distillation)."""

    name: str = "student"
    drop_path_rate: float | None = field(default=0.0, metadata=check(ge=0, lt=1))
    base_lr: float | None = field(default=None, metadata=check(ge=0))  # None: optim.base_lr


@dataclass
class StudentConfig(StudentBase):
    """A `distill_dino` student: our ViT (patch size default: the teacher's), with its own EMA momentum."""

    ema_momentum: float | None = field(default=None, metadata=check(ge=0, le=1))  # None: ema.momentum


@dataclass
class DistillTeacherConfig:
    """The frozen teacher with heads: a run's `pretraining/` folder, a Hub repo of one, or an official DINOv2
    training checkpoint file. Its temperature schedule is DINOv2's (linear warm-up, then constant)."""

    path: str | None = None
    temp: float = field(default=0.07, metadata=check(gt=0))
    temp_warmup: float = field(default=0.04, metadata=check(gt=0))
    temp_warmup_epochs: int = field(default=30, metadata=check(ge=0))


@dataclass
class DistillHeadsConfig:
    """The students' fresh heads; their prototype counts are always the teacher's. None: the teacher's size."""

    hidden_dim: int | None = field(default=None, metadata=check(ge=1))
    bottleneck_dim: int | None = field(default=None, metadata=check(ge=1))
    nlayers: int | None = field(default=None, metadata=check(ge=1))


@dataclass
class DistillLossConfig:
    dino_weight: float = field(default=1.0, metadata=check(ge=0))
    ibot_weight: float = field(default=1.0, metadata=check(ge=0))
    koleo_weight: float = field(default=0.1, metadata=check(ge=0))
    centering: str = field(default="sinkhorn_knopp", metadata=check(choices=("sinkhorn_knopp", "softmax")))
    student_temp: float = field(default=0.1, metadata=check(gt=0))
    center_momentum: float = field(default=0.9, metadata=check(ge=0, le=1))  # softmax centering only
    # softmax: the teacher's own centers, updated as DINOv2 does (for a teacher trained with softmax centering)
    # masked: iBOT at the sampled mask positions of the unmasked crops (DINOv3); all: every patch (the paper)
    ibot_patches: str = field(default="masked", metadata=check(choices=("masked", "all")))


@dataclass
class EmaConfig:
    """The students' EMA (what is exported): cosine from `momentum` to `momentum_end` over the run."""

    momentum: float = field(default=0.994, metadata=check(ge=0, le=1))
    momentum_end: float = field(default=1.0, metadata=check(ge=0, le=1))


@dataclass
class DistillDinoTrainConfig(TrainConfig):
    """`distill.py` config of the paper recipe: the shared sections + `teacher`, `students`, `heads`, `loss`,
    `masking`, `ema`."""

    method: str = "distill_dino"
    teacher: DistillTeacherConfig = field(default_factory=DistillTeacherConfig)
    students: list[StudentConfig] = field(default_factory=lambda: [StudentConfig()],
                                          metadata=check(rule=_student_names))
    heads: DistillHeadsConfig = field(default_factory=DistillHeadsConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)


def require_teacher_path(cfg: TrainConfig) -> str:
    path = cfg.teacher.path
    if not path:
        raise ConfigError("teacher.path is required: the model to distil (e.g. teacher.path=outputs/quickstart/pretraining"
                          " after `accelerate launch train.py`)")
    local = Path(path)
    if not local.exists() and (local.is_absolute() or path.startswith(".") or path.count("/") != 1):
        raise ConfigError(f"teacher.path={path!r} does not exist (not a local folder or file, nor a Hub id "
                          "'org/name'). Train a teacher first — `accelerate launch train.py` writes "
                          "outputs/quickstart/pretraining — or point teacher.path at one")
    return path


def student_vit_config(student: StudentConfig, global_size: int, teacher_patch: int):
    """A student's `DinoVisionConfig`: patch size default the teacher's; position-embedding grid = the teacher's
    grid of the global crops (the crops it sees are resized to that grid times its own patch)."""
    patch = student.patch_size or teacher_patch
    if global_size % teacher_patch:
        raise ConfigError(f"crops.global_size={global_size} is not a multiple of the teacher's patch size "
                          f"{teacher_patch}: use {global_size // teacher_patch * teacher_patch}")
    image_size = student.image_size or global_size // teacher_patch * patch
    if image_size % patch:
        raise ConfigError(f"student {student.name!r}: model image_size {image_size} is not a multiple of its patch "
                          f"size {patch}")
    return backbone_config(replace(student, patch_size=patch), image_size)


def build_distill_dino(cfg: DistillDinoTrainConfig) -> DistillDinoForPretraining:
    """Load the teacher, build the students (fresh, or `init_from` a DINOv2 backbone), attach the teacher."""
    try:
        teacher = load_dino_teacher(require_teacher_path(cfg))
    except (ValueError, OSError) as e:  # no heads, a DINOv3 checkpoint, a bad path: the message says what to do
        raise ConfigError(str(e)) from e
    tc = teacher.config
    patch = tc.backbone_config.patch_size
    students = {s.name: student_vit_config(s, cfg.crops.global_size, patch) for s in cfg.students}
    h, loss = cfg.heads, cfg.loss
    model = DistillDinoForPretraining(DistillDinoConfig(
        teacher_config=tc, teacher_path=cfg.teacher.path, student_configs=students, head_hidden_dim=h.hidden_dim,
        head_bottleneck_dim=h.bottleneck_dim, head_nlayers=h.nlayers, dino_weight=loss.dino_weight,
        ibot_weight=loss.ibot_weight, koleo_weight=loss.koleo_weight, centering=loss.centering,
        student_temp=loss.student_temp, center_momentum=loss.center_momentum, ibot_patches=loss.ibot_patches,
        init_seed=cfg.train.seed,
    ))
    for s in cfg.students:
        backbone = model.students[s.name]["backbone"]
        if s.init_from:
            source = load_backbone(s.init_from, s.drop_path_rate)
            backbone.load_state_dict(source.state_dict())
            model.ema[s.name].load_state_dict(source.state_dict())
            logger.info("student %s: backbone from %s (fresh heads)", s.name, s.init_from)
        if s.gradient_checkpointing:
            backbone.gradient_checkpointing_enable()
        if s.compile:
            backbone.compile()
        ps = backbone.config.patch_size
        if ps != patch:
            g, lo = cfg.crops.global_size, cfg.crops.local_size
            logger.info("student %s has patch %d, the teacher %d: its crops are resized %d→%d px (global), %d→%d px "
                        "(local) so its patch grid is the teacher's", s.name, ps, patch, g, g // patch * ps, lo,
                        lo // patch * ps)
    model.attach_teacher(teacher)
    if loss.centering == "softmax":  # start from the teacher's own centers (a resumed run restores its own)
        with torch.no_grad():
            model.dino_center.copy_(teacher.dino_center)
            model.ibot_center.copy_(teacher.ibot_center)
    t = tc.backbone_config
    logger.info("teacher %s: ViT width %d, depth %d, patch %d, %d prototypes (frozen, not saved in checkpoints)",
                cfg.teacher.path, t.hidden_size, t.num_hidden_layers, t.patch_size, tc.num_prototypes)
    return model.train()


def distill_schedules(cfg: DistillDinoTrainConfig) -> dict[str, Schedule]:
    """Teacher temperature (DINOv2's warm-up), the students' EMA momentum (cosine over the run), and per student
    `lr_scale/<name>/<part>` (its base_lr relative to optim.base_lr; 0 for the backbone during
    `head_warmup_steps`) and `ema_momentum/<name>` when it sets its own."""
    t, e, epoch = cfg.teacher, cfg.ema, cfg.optim.iters_per_epoch
    total, warmup = cfg.optim.epochs * epoch, t.temp_warmup_epochs * epoch
    schedules: dict[str, Schedule] = {
        "teacher_temp": lambda step: cosine_schedule(step, warmup, t.temp, t.temp, warmup, t.temp_warmup),
        "momentum": lambda step: cosine_schedule(step, total, e.momentum, e.momentum_end),
    }
    parts = ("backbone", "dino_head", "ibot_head")
    for s in cfg.students:
        if s.base_lr is not None:
            if cfg.optim.base_lr == 0:
                raise ConfigError(f"student {s.name!r} sets base_lr but optim.base_lr is 0 (the lr it scales)")
            scale = s.base_lr / cfg.optim.base_lr
            for part in parts:
                schedules[f"lr_scale/{s.name}/{part}"] = lambda step, v=scale: v
        if s.head_warmup_steps > 0:
            base = schedules.get(f"lr_scale/{s.name}/backbone", lambda step: 1.0)
            schedules[f"lr_scale/{s.name}/backbone"] = (
                lambda step, b=base, n=s.head_warmup_steps: 0.0 if step < n else b(step))
        if s.ema_momentum is not None:
            schedules[f"ema_momentum/{s.name}"] = (
                lambda step, m=s.ema_momentum: cosine_schedule(step, total, m, e.momentum_end))
    return schedules


def evaluate_students(cfg: TrainConfig, model, accelerator, paths: dict[str, Path]) -> dict | None:
    """End-of-run kNN (the loop's protocol, k = 20) of *every* exported student, each next to a random-init one of
    its architecture and to the teacher, written into each student's model card. Runs on every process (the
    features are extracted data-parallel); cards are written by the main process."""
    from ..export import is_backbone_export
    from ..loop import knn_top1, load_eval_sets
    from ..model_card import update_model_card

    if not cfg.data.eval_dataset:
        return None
    eval_sets = load_eval_sets(cfg)
    exports = {name: module for name, module in model.exports().items() if is_backbone_export(name)}
    results: dict[str, dict] = {}
    for name, backbone in exports.items():
        trained = knn_top1(backbone, eval_sets, cfg, accelerator)
        torch.manual_seed(cfg.train.seed)
        baseline = knn_top1(type(backbone)(backbone.config).to(accelerator.device), eval_sets, cfg, accelerator)
        results[name] = {"trained": trained, "random_init": baseline,
                         "parameters": sum(p.numel() for p in backbone.parameters())}
    teacher = None
    try:  # any backbone with a CLS token / feature map; a teacher the kNN cannot read is reported, not fatal
        teacher = knn_top1(model.frozen_teacher_backbone(), eval_sets, cfg, accelerator)
    except Exception as e:  # noqa: BLE001
        logger.warning("the teacher's kNN could not be computed: %s", e)
    where = f"{cfg.data.eval_dataset}/{cfg.data.eval_split}"
    for name, r in results.items():
        line = (f"kNN (k=20) top-1 on {where}: {name} {r['trained']['knn/top1']:.1f}% ({r['parameters'] / 1e6:.2f}M "
                f"parameters) vs random-init {r['random_init']['knn/top1']:.1f}%")
        if teacher is not None:
            share = 100 * r["trained"]["knn/top1"] / max(teacher["knn/top1"], 1e-9)
            line += f" vs teacher {teacher['knn/top1']:.1f}% ({share:.0f}% of the teacher's)"
        accelerator.print(line)
    if accelerator.is_main_process:
        model_name = cfg.hub.model_id or f"dinoforge-{cfg.config_name}"
        for name, r in results.items():
            if name not in paths:
                continue
            card = update_model_card(paths[name], {"dataset": cfg.data.eval_dataset, "split": cfg.data.eval_split,
                                                   "knn": r["trained"], "random_init": r["random_init"]},
                                     model_name=model_name)
            if teacher is not None:  # after the Evaluation markers: a later probe --update_model_card keeps it
                card.write_text(card.read_text().rstrip() + (
                    f"\n\nThe frozen teacher, evaluated the same way: k-NN top-1 {teacher['knn/top1']:.2f} % (k=20); "
                    f"this student reaches {100 * r['trained']['knn/top1'] / max(teacher['knn/top1'], 1e-9):.0f} % of "
                    "it.\n"))
    return {"dataset": cfg.data.eval_dataset, "split": cfg.data.eval_split, "knn": results, "teacher_knn": teacher}


DISTILL_DINO = register_method(
    Method(
        name="distill_dino",
        config_class=DistillDinoTrainConfig,
        build_model=build_distill_dino,
        schedules=distill_schedules,
        evaluate=evaluate_students,
        description="DINOv2 distillation (DINO + iBOT + KoLeo against a frozen teacher with heads, EMA student)",
    )
)
