"""Feature distillation (LightlyTrain-style, `method: distill_features`): any vision backbone as the frozen teacher,
any backbone — our ViT, a timm model, a transformers model, CNNs included — as the student(s).

The teacher and every student see the *same* augmented images ("consistent teaching": Beyer et al. 2022, which
LightlyTrain follows). A student regresses, through linear projections to the teacher's width, (1) the teacher's
pooled embedding (CLS / pooler output) and (2) its dense features (patch tokens or feature map), the student's map
resized (bilinear) to the teacher's grid: `pooled_weight · d(P s, t) + dense_weight · d(D s_map, t_map)` with `d` the
MSE (LightlyTrain's `DistillationV2Loss`) or `1 - cos` (`modeling.losses.feature_distillation_loss`).

Backbones are read through one adapter (`pooled_and_dense`): a `[B, C, h, w]` `last_hidden_state` is a feature
map (ResNet, ConvNeXt, EfficientNet, timm CNNs); a `[B, tokens, C]` one is a ViT whose leading tokens (CLS,
registers) are whatever precedes the `(H/p)·(W/p)` patch tokens (DINOv2, DINOv3, CLIP, SigLIP, timm ViTs, ours).
The teacher is held outside the module tree (`FrozenTeacherMixin`): never in checkpoints, reloaded from
`teacher_path`. Students export as stock folders: our ViT as `Dinov2Model`, a timm model as transformers'
`TimmWrapperModel` (its `config.json` carries the `pretrained_cfg` that `AutoImageProcessor` builds a
`TimmWrapperImageProcessor` from), a transformers model as itself.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .distillation import FrozenTeacherMixin, card_name, student_seed
from .losses import feature_distillation_loss
from .method import DataPipeline, PretrainingMethod
from .vision_transformer import DinoVisionConfig, DinoVisionModel

logger = logging.getLogger(__name__)

STUDENT_KINDS = ("vit", "timm", "transformers")


# ---- reading any backbone -------------------------------------------------------------------------------------


def vision_tower(model: nn.Module) -> nn.Module:
    """The image tower of what `AutoModel.from_pretrained` returned: a dual encoder's `vision_model` (CLIP, SigLIP),
    a `DinoForPretraining`'s teacher backbone, else the model itself."""
    if hasattr(model, "teacher_backbone"):
        return model.teacher_backbone
    if hasattr(model, "vision_model") and hasattr(model, "text_model"):
        return model.vision_model
    return model


def patch_size_of(model: nn.Module) -> int | None:
    """The (square) patch size of a ViT-like backbone (its config, or a timm model's patch embedding); None for a
    ConvNet."""
    config = getattr(model, "config", None)
    for c in (config, getattr(config, "vision_config", None)):
        p = getattr(c, "patch_size", None)
        if p:
            return int(p[0] if isinstance(p, (tuple, list)) else p)
    embed = getattr(getattr(model, "timm_model", None), "patch_embed", None)
    if embed is not None and getattr(embed, "patch_size", None):
        p = embed.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)
    return None


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def pooled_and_dense(model: nn.Module, pixel_values: torch.Tensor, patch: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(pooled [B, C], dense [B, C', h, w])` of any vision backbone (see the module docstring).

    Pooled: `pooler_output` when the model has one (a ViT's normed CLS, SigLIP's attention pool, a CNN's global
    pool), else the CLS token, else the mean of the dense features. `patch`: the ViT's patch size (default: read
    from the model)."""
    kwargs = {"interpolate_pos_encoding": True} if _accepts(model, "interpolate_pos_encoding") else {}
    out = model(pixel_values=pixel_values, **kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    pooled = getattr(out, "pooler_output", None)
    if hidden.ndim == 4:
        dense = hidden
    elif hidden.ndim == 3:
        p = patch or patch_size_of(model)
        if p is None:
            raise ValueError(f"{type(model).__name__} returns tokens {tuple(hidden.shape)} but has no patch_size")
        h, w = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
        prefix = hidden.shape[1] - h * w
        if prefix < 0:
            raise ValueError(f"{type(model).__name__}: {hidden.shape[1]} tokens for a {h}x{w} patch grid "
                             f"({pixel_values.shape[-2]}x{pixel_values.shape[-1]} px, patch {p})")
        patches = hidden[:, prefix:]
        dense = patches.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], h, w)
        if pooled is None and prefix > 0:
            pooled = hidden[:, 0]
    else:
        raise ValueError(f"{type(model).__name__}: unexpected last_hidden_state of shape {tuple(hidden.shape)}")
    if pooled is None:
        pooled = dense.mean(dim=(2, 3))
    return pooled.flatten(1), dense


# ---- building students ----------------------------------------------------------------------------------------


def timm_pretrained_cfg(image_size: int) -> dict[str, Any]:
    """The `pretrained_cfg` a timm student's export carries: what `TimmWrapperImageProcessor` preprocesses with
    (crop `image_size`, the resize/crop ratio 224/256 of the DINOv2 evaluation, bicubic, ImageNet mean/std)."""
    from .convert import IMAGENET_MEAN, IMAGENET_STD

    return {"input_size": [3, image_size, image_size], "interpolation": "bicubic", "crop_pct": 0.875,
            "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def build_student(kind: str, config: dict[str, Any]) -> PreTrainedModel:
    """A fresh student backbone from its stored config: our ViT (`DinoVisionConfig`), a timm model
    (`TimmWrapperConfig`: `architecture`, `model_args`), or any transformers vision model (its config dict with
    `model_type`)."""
    values = {k: v for k, v in config.items() if k != "model_type"}
    if kind == "vit":
        return DinoVisionModel(DinoVisionConfig(**values))
    if kind == "timm":
        from transformers import TimmWrapperConfig, TimmWrapperModel

        return TimmWrapperModel(TimmWrapperConfig.from_dict(dict(config)))
    if kind == "transformers":
        from transformers import AutoConfig, AutoModel

        return AutoModel.from_config(AutoConfig.for_model(config["model_type"], **values))
    raise ValueError(f"student kind must be one of {STUDENT_KINDS}, got {kind!r}")


# ---- the model ----------------------------------------------------------------------------------------------


class FeatureDistillConfig(PretrainedConfig):
    """The teacher (`teacher_path`, its pooled / dense widths and patch size, and the input size it is fed;
    None: the view size), the students (`students`: name → `{"kind", "config", "pooled_dim", "dense_dim",
    "patch_size"}`; widths are measured when the run is built), the loss weights and distance."""

    model_type = "dinoforge_distill_features"

    def __init__(
        self,
        teacher_path: str | None = None,
        teacher_pooled_dim: int = 384,
        teacher_dense_dim: int = 384,
        teacher_patch_size: int | None = 14,
        teacher_image_size: int | None = None,
        students: dict[str, dict[str, Any]] | None = None,
        pooled_weight: float = 1.0,
        dense_weight: float = 1.0,
        loss_kind: str = "mse",
        init_seed: int = 0,
        **kwargs,
    ):
        if loss_kind not in ("mse", "cosine"):
            raise ValueError(f"loss_kind must be 'mse' or 'cosine', got {loss_kind!r}")
        self.teacher_path = teacher_path
        self.teacher_pooled_dim = teacher_pooled_dim
        self.teacher_dense_dim = teacher_dense_dim
        self.teacher_patch_size = teacher_patch_size
        self.teacher_image_size = teacher_image_size
        self.students = students if students is not None else {
            "student": {"kind": "vit", "config": DinoVisionConfig().to_dict(), "pooled_dim": 384, "dense_dim": 384,
                        "patch_size": 14}}
        self.pooled_weight = pooled_weight
        self.dense_weight = dense_weight
        self.loss_kind = loss_kind
        self.init_seed = init_seed
        super().__init__(**kwargs)


@dataclass
class FeatureDistillOutput(ModelOutput):
    """`pooled_loss` / `dense_loss` (weighted, summed over students); `<name>/...` per student when several.
    `pooled_cosine`: mean cosine between the (projected) student and teacher embeddings (1 = perfect)."""

    loss: torch.Tensor | None = None
    pooled_loss: torch.Tensor | None = None
    dense_loss: torch.Tensor | None = None
    pooled_cosine: torch.Tensor | None = None


class FeatureDistillForPretraining(FrozenTeacherMixin, PreTrainedModel, PretrainingMethod):
    """Students `students[name]` (any backbone) with projections `projectors[name] = {pooled, dense}` (linear to
    the teacher's widths), and a frozen teacher outside the module tree."""

    config_class = FeatureDistillConfig
    config: FeatureDistillConfig
    base_model_prefix = "dinoforge_distill_features"
    main_input_name = "view1"
    input_modalities = ("image",)

    def __init__(self, config: FeatureDistillConfig):
        super().__init__(config)
        students, projectors = {}, {}
        for name, spec in config.students.items():
            with torch.random.fork_rng(devices=[]):  # a student starts the same alone or beside others
                torch.manual_seed(student_seed(config.init_seed, name))
                students[name] = build_student(spec["kind"], spec["config"])
                projectors[name] = nn.ModuleDict({
                    "pooled": nn.Linear(spec["pooled_dim"], config.teacher_pooled_dim),
                    "dense": nn.Linear(spec["dense_dim"], config.teacher_dense_dim),
                })
                for layer in projectors[name].values():  # LightlyTrain: trunc-normal(0.02), zero bias
                    nn.init.trunc_normal_(layer.weight, std=0.02)
                    nn.init.zeros_(layer.bias)
            if spec["kind"] == "vit":  # the student never sees masked inputs: no gradient would reach it (DDP)
                students[name].embeddings.mask_token.requires_grad_(False)
        self.students = nn.ModuleDict(students)
        self.projectors = nn.ModuleDict(projectors)
        self._init_frozen_teacher()
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Every part initialised itself when built (seeded per student)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> FeatureDistillForPretraining:
        model = super().from_pretrained(*args, **kwargs)
        for name, spec in model.config.students.items():  # loading drops requires_grad=False
            if spec["kind"] == "vit":
                model.students[name].embeddings.mask_token.requires_grad_(False)
        return model

    def attach_teacher(self, teacher: nn.Module) -> None:
        self._set_teacher(vision_tower(teacher))

    def frozen_teacher_backbone(self) -> nn.Module:
        return self._require_teacher()

    def load_teacher(self) -> None:
        if not self.config.teacher_path:
            raise ValueError("this feature-distillation model has no teacher: set teacher.path")
        self.attach_teacher(load_feature_teacher(self.config.teacher_path))

    # ---- forward -----------------------------------------------------------------------------------------------

    def _teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.teacher_image_size
        if size is None or tuple(images.shape[-2:]) == (size, size):
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor | None = None, **_: Any) -> FeatureDistillOutput:
        """`view1`, `view2` `[B, 3, S, S]`: both views are distilled (2B images); the teacher runs once on them."""
        c = self.config
        images = view1 if view2 is None else torch.cat((view1, view2))
        with torch.no_grad():
            t_pooled, t_dense = pooled_and_dense(self._require_teacher(), self._teacher_input(images),
                                                 c.teacher_patch_size)
            t_tokens = t_dense.flatten(2).transpose(1, 2)  # [B, h·w, C]
        out = FeatureDistillOutput()
        totals: dict[str, torch.Tensor] = {}
        several = len(self.students) > 1
        for name, student in self.students.items():
            proj = self.projectors[name]
            s_pooled, s_dense = pooled_and_dense(student, images, c.students[name].get("patch_size"))
            s_pooled = proj["pooled"](s_pooled)
            # 1x1 projection to the teacher's width, then bilinear to its grid (LightlyTrain's order)
            s_dense = proj["dense"](s_dense.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            s_dense = F.interpolate(s_dense, size=t_dense.shape[-2:], mode="bilinear", align_corners=False)
            terms = {
                "pooled_loss": c.pooled_weight * feature_distillation_loss(s_pooled, t_pooled, c.loss_kind),
                "dense_loss": c.dense_weight * feature_distillation_loss(s_dense.flatten(2).transpose(1, 2), t_tokens,
                                                                         c.loss_kind),
            }
            terms["loss"] = terms["pooled_loss"] + terms["dense_loss"]
            with torch.no_grad():
                terms["pooled_cosine"] = F.cosine_similarity(s_pooled.float(), t_pooled.float(), dim=-1).mean()
            for key, value in terms.items():
                totals[key] = value if key not in totals else totals[key] + value
                if several:
                    out[f"{name}/{key}"] = value
        for key, value in totals.items():
            out[key] = value / len(self.students) if key == "pooled_cosine" else value
        return out

    # ---- the method protocol ---------------------------------------------------------------------------------

    def data_pipeline(self) -> DataPipeline:
        """Two views per image (`two_views`): teacher and students see the same strongly augmented images."""
        return DataPipeline("two_views", {"patch_size": None})

    def trainable_parts(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {}
        for name in self.students:
            parts[f"{name}/backbone"] = self.students[name]
            parts[f"{name}/projector"] = self.projectors[name]
        return parts

    def step_state(self) -> list[torch.Tensor]:
        # BatchNorm running statistics of CNN students (a skipped step must not learn from NaNs)
        return [b for b in self.students.buffers() if b.is_floating_point()]

    def exports(self) -> dict[str, nn.Module]:
        if len(self.students) == 1:
            return {"backbone": next(iter(self.students.values()))}
        return {f"backbone/{name}": module for name, module in self.students.items()}

    def health(self, metrics: dict[str, float]) -> list[str]:
        if math.isfinite(metrics.get("pooled_cosine", 1.0)) and metrics.get("step", 0) > 50 and \
                metrics.get("pooled_cosine", 1.0) < 0.05:
            return ["the students' projected embeddings are unrelated to the teacher's after 50 steps "
                    f"(pooled_cosine {metrics['pooled_cosine']:.3f}): check optim.base_lr and the teacher"]
        return []

    def model_card_rows(self, config: dict[str, Any]) -> dict[str, str]:
        c = self.config
        teacher = card_name(c.teacher_path)
        rows = {
            "teacher": f"{teacher} (frozen; pooled width {c.teacher_pooled_dim}, dense width {c.teacher_dense_dim})",
            "recipe": "feature distillation (LightlyTrain-style): the students regress the teacher's pooled embedding "
                      "and dense features of the same augmented images through linear projections",
            "losses": f"pooled {c.pooled_weight} · dense {c.dense_weight} ({c.loss_kind}), dense features resized "
                      "(bilinear) to the teacher's grid",
        }
        if len(c.students) > 1:
            rows["students"] = ", ".join(f"{n} ({s['kind']})" for n, s in c.students.items())
        return rows


def load_feature_teacher(path: str) -> nn.Module:
    """Whatever `AutoModel.from_pretrained(path)` loads as a vision backbone (a stock DINOv2 / DINOv3, a CLIP or
    SigLIP model or vision tower, a timm model — `timm/...` Hub repos or a `TimmWrapperModel` folder —, one of
    our exports or `pretraining/` folders), in eval mode."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"teacher.path={path!r}: AutoModel.from_pretrained could not load it ({e}); pass a model "
                         "folder or Hub id of a vision backbone") from e
    return vision_tower(model).eval()
