"""DINOv2 pretraining model: student and EMA teacher towers (backbone + DINO head + iBOT head) and the losses.

`DinoForPretraining.forward` is one official `SSLMetaArch.forward_backward` minus the backward: the teacher sees
the two global crops, the student all crops (global ones with the iBOT masks), and the loss is
DINO (global + local) + iBOT (masked global patches) + KoLeo (student global CLS before the head).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import ModelOutput

from .heads import DinoHead, WeightNormLinear
from .losses import (
    dino_crop_losses_from_rows,
    dino_crop_targets,
    ibot_loss_from_rows,
    koleo_loss,
    soft_cross_entropy,
    teacher_targets,
)
from .method import DataPipeline, PretrainingMethod
from .vision_transformer import DinoVisionConfig, DinoVisionModel, DinoVisionPreTrainedModel


class DinoPretrainingConfig(PretrainedConfig):
    """Backbone config + head sizes + loss switches/weights + teacher centering.

    A loss is on when its weight is > 0. Defaults follow the official default config (one head shared by DINO and
    iBOT, 65,536 prototypes, softmax centering); the L/g recipes use a separate iBOT head and Sinkhorn-Knopp.
    """

    model_type = "dinoforge_pretraining"
    sub_configs = {"backbone_config": DinoVisionConfig}

    def __init__(
        self,
        backbone_config: DinoVisionConfig | dict | None = None,
        num_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_nlayers: int = 3,
        separate_ibot_head: bool = False,
        ibot_num_prototypes: int | None = None,
        ibot_hidden_dim: int | None = None,
        ibot_bottleneck_dim: int | None = None,
        dino_weight: float = 1.0,
        ibot_weight: float = 1.0,
        koleo_weight: float = 0.1,
        centering: str = "softmax",
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
        collapse_patience: int = 100,
        collapse_entropy_fraction: float = 0.98,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        if backbone_config is None:
            backbone_config = DinoVisionConfig()
        elif isinstance(backbone_config, dict):
            backbone_config = DinoVisionConfig(**backbone_config)
        if centering not in ("sinkhorn_knopp", "softmax"):
            raise ValueError(f"centering must be 'sinkhorn_knopp' or 'softmax', got {centering!r}")
        self.backbone_config = backbone_config
        self.num_prototypes = num_prototypes
        self.hidden_dim = hidden_dim
        self.bottleneck_dim = bottleneck_dim
        self.head_nlayers = head_nlayers
        self.separate_ibot_head = separate_ibot_head
        self.ibot_num_prototypes = ibot_num_prototypes if ibot_num_prototypes is not None else num_prototypes
        self.ibot_hidden_dim = ibot_hidden_dim if ibot_hidden_dim is not None else hidden_dim
        self.ibot_bottleneck_dim = ibot_bottleneck_dim if ibot_bottleneck_dim is not None else bottleneck_dim
        self.dino_weight = dino_weight
        self.ibot_weight = ibot_weight
        self.koleo_weight = koleo_weight
        self.centering = centering
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.collapse_patience = collapse_patience  # steps a collapse signal must last before it is reported
        # targets count as near-uniform above this fraction of log K (small sets: ~0.88, docs/small_data.md)
        self.collapse_entropy_fraction = collapse_entropy_fraction
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        if not separate_ibot_head and self.ibot_num_prototypes != num_prototypes:
            raise ValueError("a shared DINO/iBOT head has one prototype count: set separate_ibot_head=True")

    @property
    def use_dino(self) -> bool:
        return self.dino_weight > 0

    @property
    def use_ibot(self) -> bool:
        return self.ibot_weight > 0

    @property
    def use_koleo(self) -> bool:
        return self.koleo_weight > 0


@dataclass
class DinoPretrainingOutput(ModelOutput):
    """Every loss term is already weighted as it enters `loss`.

    `teacher_entropy` (mean entropy of the teacher DINO targets, nats) and `teacher_prototypes_used` (distinct
    argmax prototypes in the batch) are collapse signals: a collapsed teacher has entropy → 0 with one
    prototype, or entropy → log K (uniform targets).
    """

    loss: torch.Tensor | None = None
    dino_global_loss: torch.Tensor | None = None
    dino_local_loss: torch.Tensor | None = None
    ibot_loss: torch.Tensor | None = None
    koleo_loss: torch.Tensor | None = None
    teacher_entropy: torch.Tensor | None = None
    teacher_prototypes_used: torch.Tensor | None = None


# What a collapse warning tells the user to change (docs/small_data.md has the measurements behind it).
_COLLAPSE_ADVICE = {
    "uniform": (
        "teacher collapse: the teacher's targets have been near-uniform for {steps} steps (entropy {entropy:.2f} of "
        "max {uniform:.2f}), so the student learns nothing. Likely causes and keys: too many prototypes for the data "
        "(heads.num_prototypes), a teacher temperature too high for them (teacher.temp, teacher.temp_warmup), "
        "softmax centering on a small dataset (loss.centering=sinkhorn_knopp), a learning rate too low for the "
        "heads to move (optim.base_lr); see docs/small_data.md"
    ),
    "one_prototype": (
        "teacher collapse: every image of the batch has mapped to one prototype for {steps} steps. Likely causes "
        "and keys: a learning rate too high (optim.base_lr, optim.warmup_epochs), an EMA teacher following the "
        "student too fast (teacher.momentum), centering off or too weak (loss.centering=sinkhorn_knopp), a teacher "
        "temperature too low (teacher.temp); see docs/small_data.md"
    ),
}


def _tower(config: DinoPretrainingConfig, backbone_config: DinoVisionConfig) -> nn.ModuleDict:
    modules: dict[str, nn.Module] = {"backbone": DinoVisionModel(backbone_config)}
    dim = backbone_config.hidden_size
    modules["dino_head"] = DinoHead(
        dim, config.num_prototypes, config.hidden_dim, config.bottleneck_dim, config.head_nlayers
    )
    if config.separate_ibot_head:
        modules["ibot_head"] = DinoHead(
            dim, config.ibot_num_prototypes, config.ibot_hidden_dim, config.ibot_bottleneck_dim, config.head_nlayers
        )
    return nn.ModuleDict(modules)


def _all_reduce_count(n: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return n
    t = torch.tensor([n], device=device, dtype=torch.long)
    dist.all_reduce(t)
    return int(t.item())


class DinoForPretraining(DinoVisionPreTrainedModel, PretrainingMethod):
    """Student + EMA teacher, each `{backbone, dino_head, ibot_head}`; the teacher never gets gradients.

    With a shared head (`separate_ibot_head=False`) there is no `ibot_head` module: the DINO head serves both.
    The loss centers are buffers, so `save_pretrained` keeps them and training continues from any checkpoint.
    """

    config_class = DinoPretrainingConfig
    config: DinoPretrainingConfig
    base_model_prefix = "dinoforge_pretraining"
    _no_split_modules = ["Embeddings", "Block", "DinoHead"]
    _keys_to_ignore_on_load_missing = [r"dino_center", r"ibot_center"]

    def __init__(self, config: DinoPretrainingConfig):
        super().__init__(config)
        self.student = _tower(config, config.backbone_config)
        # The official teacher has no stochastic depth.
        teacher_backbone_config = copy.deepcopy(config.backbone_config)
        teacher_backbone_config.drop_path_rate = 0.0
        self.teacher = _tower(config, teacher_backbone_config)
        self.register_buffer("dino_center", torch.zeros(1, config.num_prototypes))
        self.register_buffer("ibot_center", torch.zeros(1, config.ibot_num_prototypes))
        self.post_init()
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> DinoForPretraining:
        # transformers 5 recreates parameters while loading, which drops requires_grad=False: freeze again
        model = super().from_pretrained(*args, **kwargs)
        model.teacher.requires_grad_(False)
        return model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, WeightNormLinear):
            module.reset_parameters()
        else:
            super()._init_weights(module)

    def _apply_heads(
        self, tower: nn.ModuleDict, cls_tokens: torch.Tensor, masked_tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DINO head on CLS tokens, iBOT head on masked patch tokens; a shared head runs once on both
        (one weight-norm evaluation and one large matmul instead of several small ones)."""
        if masked_tokens is None:
            return tower["dino_head"](cls_tokens), None
        if self.config.separate_ibot_head:
            return tower["dino_head"](cls_tokens), tower["ibot_head"](masked_tokens)
        logits = tower["dino_head"](torch.cat((cls_tokens, masked_tokens)))
        cls_logits, masked_logits = logits.split([cls_tokens.shape[0], masked_tokens.shape[0]])
        return cls_logits, masked_logits

    def _student_cross_entropies(
        self,
        cls_tokens: torch.Tensor,
        masked_tokens: torch.Tensor | None,
        dino_targets: list[torch.Tensor],
        ibot_targets: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row student cross-entropies of the DINO rows (CLS tokens) and the iBOT rows (masked tokens).

        A shared head runs once on all rows and feeds one cross-entropy call, so the [rows, K] logits are never
        split or concatenated (their gradient is written once, in place); a separate iBOT head gets its own call.
        Rows without a target (DINO or iBOT off) do not go through the head.
        """
        temp = self.config.student_temp
        cls_tokens = cls_tokens if dino_targets else cls_tokens[:0]
        masked_tokens = masked_tokens if ibot_targets else cls_tokens[:0]
        if self.config.separate_ibot_head:
            dino_ce = soft_cross_entropy(self.student["dino_head"](cls_tokens), dino_targets, temp)
            ibot_ce = soft_cross_entropy(self.student["ibot_head"](masked_tokens), ibot_targets, temp)
            return dino_ce, ibot_ce
        logits = self.student["dino_head"](torch.cat((cls_tokens, masked_tokens)))
        per_row = soft_cross_entropy(logits, dino_targets + ibot_targets, temp)
        return per_row.split([cls_tokens.shape[0], masked_tokens.shape[0]])

    def _check_inputs(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor | None):
        if global_crops.ndim != 4 or global_crops.shape[0] % 2:
            raise ValueError(
                f"global_crops must be [2*batch, 3, H, W] (two crops per image, crop-major), got {tuple(global_crops.shape)}"
            )
        if local_crops is not None and local_crops.numel() > 0:
            b = global_crops.shape[0] // 2
            if local_crops.ndim != 4 or local_crops.shape[0] % b:
                raise ValueError(
                    f"local_crops must be [n_local*{b}, 3, h, w] (crop-major), got {tuple(local_crops.shape)}"
                )
        if self.config.use_ibot and masks is None:
            raise ValueError("the iBOT loss is on: pass masks (bool [2*batch, num_patches]) or set ibot_weight=0")
        if masks is not None:
            p = self.config.backbone_config.patch_size
            expected = (global_crops.shape[0], (global_crops.shape[-2] // p) * (global_crops.shape[-1] // p))
            if tuple(masks.shape) != expected or masks.dtype != torch.bool:
                raise ValueError(
                    f"masks must be bool [2*batch, num_patches] = {list(expected)}, got {masks.dtype} {list(masks.shape)}"
                )

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        teacher_temp: float = 0.07,
        **kwargs,
    ) -> DinoPretrainingOutput:
        """`global_crops` [2·B,3,H,W], `local_crops` [n_local·B,3,h,w] (both crop-major), `masks` bool [2·B, N]."""
        cfg = self.config
        self._check_inputs(global_crops, local_crops, masks)
        n_reg = cfg.backbone_config.num_register_tokens
        has_local = local_crops is not None and local_crops.numel() > 0
        ibot_masks = masks if cfg.use_ibot else None
        update_centers = self.training

        # ---- teacher: global crops only, no masks, no gradient
        with torch.no_grad():
            t_out = self.teacher["backbone"](global_crops).last_hidden_state
            t_cls = t_out[:, 0]
            t_masked = t_out[:, 1 + n_reg :][ibot_masks] if ibot_masks is not None else None
            t_cls_logits, t_masked_logits = self._apply_heads(self.teacher, t_cls, t_masked)
            t_probs, new_dino_center = teacher_targets(
                t_cls_logits, teacher_temp, cfg.centering, self.dino_center, cfg.center_momentum, cfg.sinkhorn_iterations
            )
            if ibot_masks is not None:
                t_masked_probs, new_ibot_center = teacher_targets(
                    t_masked_logits, teacher_temp, cfg.centering, self.ibot_center,
                    cfg.center_momentum, cfg.sinkhorn_iterations,
                )
            if update_centers:
                self.dino_center.copy_(new_dino_center)
                if ibot_masks is not None:
                    self.ibot_center.copy_(new_ibot_center)

        # ---- student: global crops (with iBOT masks) and local crops
        s_global = self.student["backbone"](global_crops, masks=ibot_masks).last_hidden_state
        s_cls = s_global[:, 0]
        s_local_cls = self.student["backbone"](local_crops).pooler_output if has_local and cfg.use_dino else None
        s_masked = s_global[:, 1 + n_reg :][ibot_masks] if ibot_masks is not None else None
        batch = global_crops.shape[0] // 2
        n_local = 0 if s_local_cls is None else s_local_cls.shape[0] // batch
        s_cls_all = s_cls if s_local_cls is None else torch.cat((s_cls, s_local_cls))

        # ---- per-row cross-entropies: one call per head over all its rows (targets paired row by row)
        dino_targets = dino_crop_targets(t_probs, 2, n_local) if cfg.use_dino else []
        ibot_targets = [t_masked_probs] if ibot_masks is not None else []
        dino_ce, ibot_ce = self._student_cross_entropies(s_cls_all, s_masked, dino_targets, ibot_targets)

        zero = s_cls.new_zeros((), dtype=torch.float32)
        dino_global = dino_local = ibot_term = koleo_term = zero
        if cfg.use_dino:
            dino_global, dino_local = dino_crop_losses_from_rows(dino_ce, batch, 2, n_local)
            dino_global = cfg.dino_weight * dino_global
            dino_local = cfg.dino_weight * dino_local
        if cfg.use_koleo:
            # per global crop: the two crops of one image are never each other's neighbour
            koleo_term = cfg.koleo_weight * sum(koleo_loss(c) for c in s_cls.chunk(2))
        if ibot_masks is not None:
            if _all_reduce_count(int(ibot_masks.sum()), ibot_masks.device) > 0:
                ibot_term = cfg.ibot_weight * ibot_loss_from_rows(ibot_ce, ibot_masks)
            else:  # no masked patch anywhere: keep the head in the graph so DDP sees its (zero) gradients
                ibot_term = 0.0 * ibot_ce.sum()

        loss = dino_global + dino_local + ibot_term + koleo_term
        with torch.no_grad():
            entropy = -(t_probs * t_probs.clamp_min(1e-12).log()).sum(-1).mean()
            used = torch.unique(t_probs.argmax(-1)).numel()
        return DinoPretrainingOutput(
            loss=loss,
            dino_global_loss=dino_global,
            dino_local_loss=dino_local,
            ibot_loss=ibot_term,
            koleo_loss=koleo_term,
            teacher_entropy=entropy,
            teacher_prototypes_used=torch.tensor(used),
        )

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: `teacher = momentum * teacher + (1 - momentum) * student` (1.0 keeps the teacher, 0.0 copies)."""
        t_params = list(self.teacher.parameters())
        s_params = list(self.student.parameters())
        # lerp: one pass over the teacher (mul_ + add_ took two); exact at momentum 0 (copy) and 1 (no change)
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)

    # ---- the method protocol (modeling/method.py): what the shared training loop calls

    def data_pipeline(self) -> DataPipeline:
        """Global + local crops, crop-major, with iBOT block masks on the global crops when iBOT is on."""
        return DataPipeline("multicrop", {"patch_size": self.config.backbone_config.patch_size,
                                          "masks": self.config.use_ibot})

    def trainable_parts(self) -> dict[str, nn.Module]:
        """The student's backbone and heads; each is a gradient-clipping group, as in the official loop."""
        return dict(self.student.items())

    def after_optimizer_step(self, momentum: float, **_: float) -> None:
        self.update_teacher(momentum)

    def step_state(self) -> list[torch.Tensor]:
        return [self.dino_center, self.ibot_center]

    def exports(self) -> dict[str, nn.Module]:
        """The EMA teacher's backbone (what DINOv2 releases) and this whole model, to continue training from."""
        return {"backbone": self.teacher_backbone, "pretraining": self}

    def health(self, metrics: dict[str, float]) -> list[str]:
        """Teacher collapse lasting `collapse_patience` steps: every image of the batch on one prototype, or
        near-uniform targets (entropy above `collapse_entropy_fraction` of its maximum). The warning names the likely
        causes and the keys."""
        uniform = math.log(self.config.num_prototypes)
        signals = {
            "one_prototype": metrics.get("teacher_prototypes_used", 2) <= 1,
            "uniform": metrics.get("teacher_entropy", 0.0) > self.config.collapse_entropy_fraction * uniform,
        }
        step = int(metrics.get("step", 0))
        since = self.__dict__.setdefault("_collapse_since", {})  # plain attribute: not state, not saved
        warnings = []
        for name, on in signals.items():
            if not on:
                since.pop(name, None)
                continue
            start = since.setdefault(name, step)
            if step - start >= self.config.collapse_patience:
                warnings.append(_COLLAPSE_ADVICE[name].format(steps=step - start, entropy=metrics.get(
                    "teacher_entropy", float("nan")), uniform=uniform))
        return warnings

    def model_card_rows(self, config: dict) -> dict[str, str]:
        c, crops = self.config, config.get("crops") or {}
        rows = {}
        if crops:
            rows["crops"] = (f"2 × {crops.get('global_size')} px global + {crops.get('local_number')} × "
                             f"{crops.get('local_size')} px local")
        rows["losses"] = (f"DINO {c.dino_weight} · iBOT {c.ibot_weight} · KoLeo {c.koleo_weight}, teacher centering "
                          f"`{c.centering}`")
        rows["prototypes"] = str(c.num_prototypes) + (f" (iBOT head {c.ibot_num_prototypes})" if c.separate_ibot_head else "")
        return rows

    @property
    def teacher_backbone(self) -> DinoVisionModel:
        return self.teacher["backbone"]

    @property
    def student_backbone(self) -> DinoVisionModel:
        return self.student["backbone"]
