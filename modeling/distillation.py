"""The paper's distillation recipe (DINOv2 §5; DINOv3 `ssl_meta_arch.py` / `multidist_meta_arch.py`): one or several
students of our ViT learn the DINO + iBOT + KoLeo objectives against a large *frozen* teacher with its heads.

- The teacher is a `DinoForPretraining` (its EMA teacher tower: backbone, DINO head, iBOT head), in eval mode, no
  gradient, no EMA. It is *not* a registered submodule: it is absent from `state_dict()`, so checkpoints and
  `save_pretrained` never hold it; it is reloaded from `config.teacher_path` when a run starts or resumes, and
  `_apply` forwards `.to(device)` / dtype casts to it. A fingerprint buffer checks that a resumed run has the same
  teacher.
- Teacher targets are computed once per batch and shared by every student (Sinkhorn-Knopp over the batch of all
  processes by default): the teacher forward never runs per student.
- Each student (`students[name]`: backbone + fresh DINO head + iBOT head over the teacher's prototypes) sees the
  global crops *unmasked* and the local crops; iBOT is computed at the sampled mask positions (DINOv3:
  `masks if not is_distillation_enabled else None`), or on every patch of the global crops (`ibot_patches="all"`,
  the paper's variant). A student whose patch size differs sees crops resized so its patch grid is the teacher's.
- An EMA of each student's backbone (momentum 0.994 → 1) is what gets exported and evaluated.

The loss terms are DINOv2's (`modeling.losses`); DINOv3's normalisation (`dino_global_scale`, `koleo_scale`,
`ignore_diagonal`) gives the same numbers for two global crops (tests/test_distill.py checks both).
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .heads import DinoHead
from .losses import (
    dino_crop_losses_from_rows,
    dino_crop_targets,
    ibot_loss_from_rows,
    koleo_loss,
    soft_cross_entropy,
    teacher_targets,
)
from .method import DataPipeline, PretrainingMethod
from .pretraining import DinoForPretraining, DinoPretrainingConfig
from .vision_transformer import DinoVisionConfig, DinoVisionModel

logger = logging.getLogger(__name__)


class DistillDinoConfig(PretrainedConfig):
    """The teacher (`teacher_path` and its `DinoPretrainingConfig` as a dict), the students (`student_configs`:
    name → `DinoVisionConfig` dict, in order), the students' head sizes (None: the teacher's), the loss weights,
    the teacher centering, where iBOT applies (`ibot_patches`: "masked" = DINOv3, "all" = the paper) and the seed
    each student's initialisation derives from (`init_seed` + its name, so a student starts the same alone or with
    others)."""

    model_type = "dinoforge_distill_dino"

    def __init__(
        self,
        teacher_config: dict | None = None,
        teacher_path: str | None = None,
        student_configs: dict[str, dict] | None = None,
        head_hidden_dim: int | None = None,
        head_bottleneck_dim: int | None = None,
        head_nlayers: int | None = None,
        dino_weight: float = 1.0,
        ibot_weight: float = 1.0,
        koleo_weight: float = 0.1,
        centering: str = "sinkhorn_knopp",
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
        ibot_patches: str = "masked",
        init_seed: int = 0,
        **kwargs,
    ):
        if centering not in ("sinkhorn_knopp", "softmax"):
            raise ValueError(f"centering must be 'sinkhorn_knopp' or 'softmax', got {centering!r}")
        if ibot_patches not in ("masked", "all"):
            raise ValueError(f"ibot_patches must be 'masked' (DINOv3) or 'all' (the paper), got {ibot_patches!r}")
        if isinstance(teacher_config, PretrainedConfig):
            teacher_config = teacher_config.to_dict()
        self.teacher_config = teacher_config or DinoPretrainingConfig(separate_ibot_head=True).to_dict()
        self.teacher_path = teacher_path
        students = student_configs if student_configs is not None else {"student": DinoVisionConfig().to_dict()}
        self.student_configs = {n: c.to_dict() if isinstance(c, PretrainedConfig) else dict(c) for n, c in students.items()}
        if not self.student_configs:
            raise ValueError("student_configs is empty: distil into at least one student")
        self.head_hidden_dim = head_hidden_dim
        self.head_bottleneck_dim = head_bottleneck_dim
        self.head_nlayers = head_nlayers
        self.dino_weight = dino_weight
        self.ibot_weight = ibot_weight
        self.koleo_weight = koleo_weight
        self.centering = centering
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.ibot_patches = ibot_patches
        self.init_seed = init_seed
        super().__init__(**kwargs)

    @property
    def teacher(self) -> DinoPretrainingConfig:
        return DinoPretrainingConfig(**{k: v for k, v in self.teacher_config.items() if k != "model_type"})

    def student(self, name: str) -> DinoVisionConfig:
        return DinoVisionConfig(**{k: v for k, v in self.student_configs[name].items() if k != "model_type"})


@dataclass
class DistillDinoOutput(ModelOutput):
    """Loss terms summed over the students (each already weighted as it enters `loss`); with several students the
    output also holds `<name>/loss`, `<name>/dino_global_loss`, ... per student (logged under those names).
    `teacher_entropy` / `teacher_prototypes_used` describe the teacher's DINO targets (shared by all students)."""

    loss: torch.Tensor | None = None
    dino_global_loss: torch.Tensor | None = None
    dino_local_loss: torch.Tensor | None = None
    ibot_loss: torch.Tensor | None = None
    koleo_loss: torch.Tensor | None = None
    teacher_entropy: torch.Tensor | None = None
    teacher_prototypes_used: torch.Tensor | None = None


@dataclass
class TeacherTargets:
    """What the frozen teacher gives every student for one batch."""

    dino: torch.Tensor  # [2B, K] probabilities, crop-major
    ibot: torch.Tensor | None  # [n_masked, K_ibot] probabilities at masks (x[masks] order)
    masks: torch.Tensor | None  # [2B, N] bool: where iBOT applies (teacher grid)
    n_masked_global: int  # masked patches over all processes


def card_name(path: str | None) -> str:
    """How a model card names the teacher: a Hub id as is; a local folder by its last two components (a run's
    `pretraining/` says little alone), never the full path."""
    if not path:
        return "?"
    local = Path(path)
    if not local.exists() and path.count("/") == 1 and not path.startswith((".", "/", "~")):
        return f"`{path}`"
    return f"`{'/'.join(local.resolve().parts[-2:])}` (local)"


def student_seed(init_seed: int, name: str) -> int:
    """The seed a student's initialisation draws from: the run seed and the student's name (stable across runs
    and independent of the other students)."""
    return (int(init_seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _all_reduce_count(n: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return n
    t = torch.tensor([n], device=device, dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


@torch.no_grad()
def teacher_fingerprint(teacher: nn.Module) -> torch.Tensor:
    """Two float64 numbers summarising the teacher's weights (Σ|w|, Σw²; no cancellation): a resumed run checks
    that its teacher is the run's teacher."""
    stats = torch.zeros(2, dtype=torch.float64)
    for p in teacher.parameters():
        x = p.detach().double().cpu()
        stats += torch.stack((x.abs().sum(), x.pow(2).sum()))
    return stats


class FrozenTeacherMixin:
    """A frozen teacher held *outside* the module tree of a `PreTrainedModel`: absent from `state_dict()`, so
    checkpoints and `save_pretrained` never contain it (it is reloaded from its path when a run starts or resumes),
    while `.to(device)` / `.half()` still reach it (`_apply`). A fingerprint buffer of its weights *is*
    checkpointed: a resumed run checks that it got the same teacher. Subclasses call `_init_frozen_teacher()` in
    `__init__` and implement `load_teacher()`."""

    def _init_frozen_teacher(self) -> None:
        # float64 bits in an int64 buffer: `.to(dtype)` / `.half()` leave integer buffers alone
        self.register_buffer("teacher_fingerprint", torch.zeros(2, dtype=torch.int64))
        object.__setattr__(self, "_teacher", None)  # object.__setattr__: not registered as a submodule
        object.__setattr__(self, "_fingerprint_checked", False)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    def _set_teacher(self, module: nn.Module) -> None:
        module.requires_grad_(False)
        module.eval()
        param = next(self.parameters(), None)
        if param is not None:
            module.to(param.device)
        object.__setattr__(self, "_teacher", module)
        object.__setattr__(self, "_fingerprint_checked", False)
        with torch.no_grad():
            self.teacher_fingerprint.copy_(teacher_fingerprint(module).view(torch.int64))

    def load_teacher(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse: bool = True):
        # .to(device) / .half() / .cuda() reach the teacher although it is not a submodule.
        super()._apply(fn, recurse)
        if self._teacher is not None:
            self._teacher._apply(fn, recurse)
        return self

    def _require_teacher(self) -> nn.Module:
        """The teacher (loaded on first use if needed), in eval mode, checked once against the fingerprint."""
        if self._teacher is None:
            self.load_teacher()
        if not self._fingerprint_checked:
            live = teacher_fingerprint(self._teacher)
            saved = self.teacher_fingerprint.detach().cpu().view(torch.float64)
            if not torch.allclose(live, saved, rtol=1e-4, atol=0.0):  # loose enough for a cast teacher
                raise ValueError(
                    f"the teacher at {self.config.teacher_path!r} is not the teacher this run started with (weight "
                    f"fingerprint {live.tolist()} vs {saved.tolist()} in the checkpoint): resume with the original "
                    "teacher.path, or start a new run (train.resume=never / another train.output_dir)"
                )
            object.__setattr__(self, "_fingerprint_checked", True)
        self._teacher.eval()
        return self._teacher


class DistillDinoForPretraining(FrozenTeacherMixin, PreTrainedModel, PretrainingMethod):
    """Students `{name: {backbone, dino_head, ibot_head}}`, their EMA backbones `ema[name]`, and a frozen teacher held
    outside the module tree (see the module docstring). `attach_teacher` / `load_teacher` give it its teacher."""

    config_class = DistillDinoConfig
    config: DistillDinoConfig
    base_model_prefix = "dinoforge_distill_dino"
    main_input_name = "global_crops"
    input_modalities = ("image",)
    _no_split_modules = ["Embeddings", "Block", "DinoHead"]

    def __init__(self, config: DistillDinoConfig):
        super().__init__(config)
        t = config.teacher
        self.separate_ibot_head = t.separate_ibot_head
        students, ema = {}, {}
        for name in config.student_configs:
            bc = config.student(name)
            # Seeded per student: a student starts from the same weights alone or beside others.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(student_seed(config.init_seed, name))
                students[name] = self._student_tower(bc, t)
                ema_config = copy.deepcopy(bc)
                ema_config.drop_path_rate = 0.0  # the EMA only averages weights; it is never trained
                ema[name] = DinoVisionModel(ema_config)
            ema[name].load_state_dict(students[name]["backbone"].state_dict())
            ema[name].requires_grad_(False)
        self.students = nn.ModuleDict(students)
        self.ema = nn.ModuleDict(ema)
        # Softmax centering only (Sinkhorn-Knopp has no state); one center per head, shared by the students.
        self.register_buffer("dino_center", torch.zeros(1, t.num_prototypes))
        self.register_buffer("ibot_center", torch.zeros(1, t.ibot_num_prototypes))
        self._init_frozen_teacher()
        self.post_init()

    def _student_tower(self, bc: DinoVisionConfig, t: DinoPretrainingConfig) -> nn.ModuleDict:
        c = self.config
        hidden = c.head_hidden_dim or t.hidden_dim
        bottleneck = c.head_bottleneck_dim or t.bottleneck_dim
        nlayers = c.head_nlayers or t.head_nlayers
        backbone = DinoVisionModel(bc)
        # Students never see masked inputs (iBOT reads the unmasked crops at the mask positions): a mask token that
        # gets no gradient would also stall DDP, which expects a gradient for every trainable parameter.
        backbone.embeddings.mask_token.requires_grad_(False)
        tower = {"backbone": backbone, "dino_head": DinoHead(bc.hidden_size, t.num_prototypes, hidden,
                                                                       bottleneck, nlayers)}
        if t.separate_ibot_head:
            tower["ibot_head"] = DinoHead(bc.hidden_size, t.ibot_num_prototypes, c.head_hidden_dim or t.ibot_hidden_dim,
                                          c.head_bottleneck_dim or t.ibot_bottleneck_dim, nlayers)
        return nn.ModuleDict(tower)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> DistillDinoForPretraining:
        # transformers 5 recreates parameters while loading, which drops requires_grad=False: freeze again
        model = super().from_pretrained(*args, **kwargs)
        model._freeze_()
        return model

    def _freeze_(self) -> None:
        self.ema.requires_grad_(False)
        for tower in self.students.values():
            tower["backbone"].embeddings.mask_token.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Every part initialises itself when it is built (the ViTs in their own `post_init`, heads in their
        constructor), seeded per student: nothing to redo here."""

    # ---- the teacher (outside the module tree) ---------------------------------------------------------------

    def attach_teacher(self, teacher: DinoForPretraining) -> None:
        """Use `teacher`'s EMA teacher tower (backbone + heads) as the frozen teacher. Its sizes must be the ones in
        `config.teacher_config` (the students' heads were built for them)."""
        expected, got = self.config.teacher, teacher.config
        keys = ("num_prototypes", "ibot_num_prototypes", "separate_ibot_head")
        mismatch = {k: (getattr(expected, k), getattr(got, k)) for k in keys if getattr(expected, k) != getattr(got, k)}
        for k in ("hidden_size", "patch_size", "num_register_tokens"):
            a, b = getattr(expected.backbone_config, k), getattr(got.backbone_config, k)
            if a != b:
                mismatch[k] = (a, b)
        if mismatch:
            raise ValueError("the teacher does not match the one this model was built for (expected, got): "
                             + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in mismatch.items()))
        self._set_teacher(teacher.teacher)

    def frozen_teacher_backbone(self) -> DinoVisionModel:
        return self._require_teacher()["backbone"]

    def load_teacher(self, path: str | None = None) -> None:
        """Load and attach the teacher from `path` (default `config.teacher_path`): see `load_dino_teacher`."""
        path = path or self.config.teacher_path
        if not path:
            raise ValueError("this distillation model has no teacher: set teacher.path (a DinoForPretraining folder)")
        self.attach_teacher(load_dino_teacher(path))

    # ---- forward -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def compute_teacher_targets(self, global_crops: torch.Tensor, masks: torch.Tensor | None, teacher_temp: float,
                        update_centers: bool) -> TeacherTargets:
        """The teacher's DINO targets of the global crops and iBOT targets at `masks` — once per batch."""
        c, t = self.config, self._require_teacher()
        tc = c.teacher
        out = t["backbone"](global_crops).last_hidden_state
        dino_probs, center = teacher_targets(t["dino_head"](out[:, 0]), teacher_temp, c.centering, self.dino_center,
                                             c.center_momentum, c.sinkhorn_iterations)
        ibot_probs, n_masked = None, 0
        if masks is not None:
            n_masked = _all_reduce_count(int(masks.sum()), masks.device)
            patches = out[:, 1 + tc.backbone_config.num_register_tokens :][masks]
            head = t["ibot_head"] if tc.separate_ibot_head else t["dino_head"]
            ibot_probs, ibot_center = teacher_targets(head(patches), teacher_temp, c.centering, self.ibot_center,
                                                      c.center_momentum, c.sinkhorn_iterations)
            if update_centers:
                self.ibot_center.copy_(ibot_center)
        if update_centers:
            self.dino_center.copy_(center)
        return TeacherTargets(dino_probs, ibot_probs, masks, n_masked)

    def _student_crops(self, name: str, crops: torch.Tensor) -> torch.Tensor:
        """`crops` resized so the student's patch grid is the teacher's (unchanged when the patch sizes agree)."""
        pt = self.config.teacher.backbone_config.patch_size
        ps = self.config.student_configs[name]["patch_size"]
        if ps == pt or crops.numel() == 0:
            return crops
        h, w = crops.shape[-2:]
        if h % pt or w % pt:
            raise ValueError(f"crops of {h}x{w} px do not tile into the teacher's {pt}-px patches: student {name!r} "
                             f"(patch {ps}) cannot match the teacher's grid; use crop sizes that are multiples of {pt}")
        size = (h // pt * ps, w // pt * ps)
        return F.interpolate(crops, size=size, mode="bilinear", antialias=True, align_corners=False)

    def student_losses(self, name: str, targets: TeacherTargets, global_crops: torch.Tensor,
                       local_crops: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One student's weighted loss terms against the teacher's targets (global crops unmasked)."""
        c, tower = self.config, self.students[name]
        n_reg = c.student_configs[name]["num_register_tokens"]
        g = tower["backbone"](self._student_crops(name, global_crops)).last_hidden_state
        cls = g[:, 0]
        has_local = local_crops is not None and local_crops.numel() > 0 and c.dino_weight > 0
        local_cls = tower["backbone"](self._student_crops(name, local_crops)).pooler_output if has_local else None
        batch = global_crops.shape[0] // 2
        n_local = 0 if local_cls is None else local_cls.shape[0] // batch
        zero = cls.new_zeros((), dtype=torch.float32)
        terms = dict(dino_global_loss=zero, dino_local_loss=zero, ibot_loss=zero, koleo_loss=zero)

        masked = g[:, 1 + n_reg :][targets.masks] if targets.masks is not None else None
        dino_rows = (cls if local_cls is None else torch.cat((cls, local_cls))) if c.dino_weight > 0 else cls[:0]
        dino_t = dino_crop_targets(targets.dino, 2, n_local) if c.dino_weight > 0 else []
        ibot_rows = masked if masked is not None else cls[:0]
        ibot_t = [targets.ibot] if masked is not None else []
        if self.separate_ibot_head:
            dino_ce = soft_cross_entropy(tower["dino_head"](dino_rows), dino_t, c.student_temp)
            ibot_ce = soft_cross_entropy(tower["ibot_head"](ibot_rows), ibot_t, c.student_temp)
        else:  # one shared head: one pass over all rows (as DinoForPretraining does)
            per_row = soft_cross_entropy(tower["dino_head"](torch.cat((dino_rows, ibot_rows))), dino_t + ibot_t,
                                         c.student_temp)
            dino_ce, ibot_ce = per_row.split([dino_rows.shape[0], ibot_rows.shape[0]])
        if c.dino_weight > 0:
            dino_global, dino_local = dino_crop_losses_from_rows(dino_ce, batch, 2, n_local)
            terms["dino_global_loss"], terms["dino_local_loss"] = c.dino_weight * dino_global, c.dino_weight * dino_local
        if masked is not None:
            if targets.n_masked_global > 0:
                terms["ibot_loss"] = c.ibot_weight * ibot_loss_from_rows(ibot_ce, targets.masks)
            else:  # no masked patch anywhere: keep the head in the graph so DDP sees its (zero) gradients
                terms["ibot_loss"] = 0.0 * ibot_ce.sum()
        if c.koleo_weight > 0:
            terms["koleo_loss"] = c.koleo_weight * sum(koleo_loss(x) for x in cls.chunk(2))
        terms["loss"] = sum(terms.values())
        return terms

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                masks: torch.Tensor | None = None, teacher_temp: float = 0.07, **_: Any) -> DistillDinoOutput:
        """`global_crops` [2·B,3,H,W] and `local_crops` [n_local·B,3,h,w] (crop-major, at the teacher's patch
        size), `masks` bool [2·B, N] on the teacher's grid: where iBOT applies (`ibot_patches="masked"`; ignored
        and replaced by every patch with "all")."""
        c = self.config
        if global_crops.ndim != 4 or global_crops.shape[0] % 2:
            raise ValueError(f"global_crops must be [2*batch, 3, H, W] (crop-major), got {tuple(global_crops.shape)}")
        if c.ibot_weight > 0:
            if c.ibot_patches == "all":
                p = c.teacher.backbone_config.patch_size
                n = (global_crops.shape[-2] // p) * (global_crops.shape[-1] // p)
                masks = torch.ones(global_crops.shape[0], n, dtype=torch.bool, device=global_crops.device)
            elif masks is None:
                raise ValueError("iBOT is on (ibot_weight > 0) with ibot_patches='masked': pass masks")
        else:
            masks = None
        targets = self.compute_teacher_targets(global_crops, masks, teacher_temp, update_centers=self.training)
        out = DistillDinoOutput()
        totals: dict[str, torch.Tensor] = {}
        several = len(self.students) > 1
        for name in self.students:
            terms = self.student_losses(name, targets, global_crops, local_crops)
            for key, value in terms.items():
                totals[key] = value if key not in totals else totals[key] + value
                if several:
                    out[f"{name}/{key}"] = value
        for key, value in totals.items():
            out[key] = value
        with torch.no_grad():
            p = targets.dino
            out["teacher_entropy"] = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
            out["teacher_prototypes_used"] = torch.tensor(torch.unique(p.argmax(-1)).numel())
        return out

    # ---- the method protocol (modeling/method.py) ------------------------------------------------------------

    def data_pipeline(self) -> DataPipeline:
        """Multi-crop at the teacher's patch size; iBOT masks from the pipeline unless iBOT covers every patch."""
        c = self.config
        masks = c.ibot_weight > 0 and c.ibot_patches == "masked"
        return DataPipeline("multicrop", {"patch_size": c.teacher.backbone_config.patch_size, "masks": masks})

    def trainable_parts(self) -> dict[str, nn.Module]:
        """`<student>/backbone`, `<student>/dino_head`, `<student>/ibot_head`: a clipping group each, and the names
        `lr_scale/<student>/<part>` schedules address (each student's own learning rate)."""
        return {f"{name}/{part}": module for name, tower in self.students.items() for part, module in tower.items()}

    @torch.no_grad()
    def after_optimizer_step(self, momentum: float = 0.994, **values: float) -> None:
        """EMA of each student's backbone; `ema_momentum/<student>` (a schedule value) overrides `momentum`."""
        for name, tower in self.students.items():
            m = values.get(f"ema_momentum/{name}", momentum)
            torch._foreach_lerp_(list(self.ema[name].parameters()), list(tower["backbone"].parameters()), 1.0 - m)

    def step_state(self) -> list[torch.Tensor]:
        return [self.dino_center, self.ibot_center]

    def exports(self) -> dict[str, nn.Module]:
        """The EMA students: `backbone` for one, `backbone/<name>` for several."""
        if len(self.ema) == 1:
            return {"backbone": next(iter(self.ema.values()))}
        return {f"backbone/{name}": module for name, module in self.ema.items()}

    def health(self, metrics: dict[str, float]) -> list[str]:
        """Teacher targets that carry no signal (near-uniform: a teacher temperature too high for this teacher; one
        prototype for the whole batch: a broken teacher). The teacher is frozen, so each is reported once."""
        uniform = math.log(self.config.teacher.num_prototypes)
        signals = {
            "uniform": (metrics.get("teacher_entropy", 0.0) > 0.98 * uniform,
                        f"teacher targets are near-uniform (entropy {metrics.get('teacher_entropy', 0.0):.2f} of max "
                        f"{uniform:.2f}): the students learn little from them; lower teacher.temp"),
            "one_prototype": (metrics.get("teacher_prototypes_used", 2) <= 1,
                              "every image of the batch maps to one teacher prototype: check the teacher "
                              "(teacher.path) and teacher.temp"),
        }
        reported = self.__dict__.setdefault("_health_reported", set())  # plain attribute: not state, not saved
        warnings = [text for name, (on, text) in signals.items() if on and name not in reported]
        reported.update(name for name, (on, _) in signals.items() if on)
        return warnings

    def model_card_rows(self, config: dict[str, Any]) -> dict[str, str]:
        c, t = self.config, self.config.teacher
        tb = t.backbone_config
        teacher = card_name(c.teacher_path)
        rows = {
            "teacher": f"{teacher} (frozen): ViT width {tb.hidden_size}, depth {tb.num_hidden_layers}, patch "
                       f"{tb.patch_size}, {t.num_prototypes} prototypes",
            "distillation": "DINOv2 §5: DINO + iBOT + KoLeo against the frozen teacher's heads, students' global "
                      "crops unmasked, EMA of the student exported",
            "losses": f"DINO {c.dino_weight} · iBOT {c.ibot_weight} ({'sampled mask positions' if c.ibot_patches == 'masked' else 'all patches'}) "
                      f"· KoLeo {c.koleo_weight}, teacher centering `{c.centering}`",
        }
        ema = config.get("ema") or {}
        if ema:
            rows["student EMA momentum"] = f"{ema.get('momentum')} → {ema.get('momentum_end')} (cosine)"
        if len(c.student_configs) > 1:
            rows["students"] = ", ".join(f"{n} (width {s['hidden_size']}, depth {s['num_hidden_layers']})"
                                         for n, s in c.student_configs.items())
        return rows


# ---- loading a teacher ---------------------------------------------------------------------------------------


def load_dino_teacher(path: str | Path) -> DinoForPretraining:
    """A frozen teacher with heads for `distill_dino`: a `DinoForPretraining` folder or Hub repo (a run's
    `pretraining/`), or an official DINOv2 training checkpoint file (`.pth` / `.safetensors`, converted by
    `modeling.convert.from_official_pretraining_state_dict`). Only its teacher tower is kept.

    A backbone without heads (a `backbone/` export, a stock DINOv2 / DINOv3, CLIP, ...) raises a `ValueError` that
    points to feature distillation; a DINOv3 model one that says why it cannot be used here (RoPE, patch 16)."""
    from transformers import AutoConfig

    from .official import from_official_pretraining_state_dict

    source = Path(path)
    if source.is_file():
        if source.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(source)
        else:
            state = torch.load(source, map_location="cpu", weights_only=True)
        model = from_official_pretraining_state_dict(state)
    else:
        if source.is_dir() and not (source / "config.json").is_file():
            raise ValueError(f"teacher.path={str(path)!r} is a folder without config.json: pass a run's pretraining/ "
                             "folder, a Hub repo of one, or an official DINOv2 training checkpoint file")
        model_type = AutoConfig.from_pretrained(str(path)).model_type
        if model_type != DinoPretrainingConfig.model_type:
            raise ValueError(_no_heads_message(str(path), model_type))
        model = DinoForPretraining.from_pretrained(str(path))
    del model.student  # only the EMA teacher tower is used
    model.teacher.requires_grad_(False)
    return model.eval()


def _no_heads_message(path: str, model_type: str) -> str:
    why = ""
    if model_type.startswith("dinov3"):
        why = (" (DINOv3 backbones also use RoPE position embeddings and patch 16, which dinoforge's ViT does not "
               "implement, so a DINOv3 training checkpoint with heads cannot serve either)")
    return (f"teacher.path={path!r} is a {model_type!r} model without DINO/iBOT heads{why}. The paper recipe "
            "(method: distill_dino) matches the teacher's prototype outputs, so it needs a DinoForPretraining with "
            "heads: a run's pretraining/ folder, or an official DINOv2 training checkpoint. To distil a backbone "
            "alone, use feature distillation: `python distill.py --config configs/distill_features_quickstart.yaml "
            f"teacher.path={path}` (method: distill_features).")
