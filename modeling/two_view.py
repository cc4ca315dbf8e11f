"""What the two-view methods (MoCo v3, Barlow Twins, DenseCL) share: their backbones, BatchNorm projection MLPs,
BatchNorm over the global batch, momentum encoders, and the ResNet export.

Backbones are our ViT (`DinoVisionModel`, exported as a stock `Dinov2Model`), transformers' `ResNetModel`
(`ResNetConfig()` = `microsoft/resnet-50`, exported as itself), so the papers' own settings run, or transformers'
`TextNetModel` used as a plain VGG-style CNN (a stride-1 stem keeps small images at full resolution; global
average pool of its last feature map), or our `VGGModel` (`modeling/vgg.py`: max-pooling between stages; exported
with its code, `trust_remote_code`). A pretraining config stores the backbone's config under `backbone_config` with
its `model_type`, so every kind round-trips through `save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import (
    ConvNextImageProcessor,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetModel,
    TextNetConfig,
    TextNetModel,
)

from .convert import IMAGENET_MEAN, IMAGENET_STD
from .losses import all_reduce_with_grad
from .vgg import VGGConfig, VGGModel
from .vision_transformer import DinoVisionConfig, DinoVisionModel

BackboneConfig = DinoVisionConfig | ResNetConfig | TextNetConfig | VGGConfig
Backbone = DinoVisionModel | ResNetModel | TextNetModel | VGGModel
_BACKBONE_CONFIGS: dict[str, type[PretrainedConfig]] = {
    DinoVisionConfig.model_type: DinoVisionConfig,
    ResNetConfig.model_type: ResNetConfig,
    TextNetConfig.model_type: TextNetConfig,
    VGGConfig.model_type: VGGConfig,
}
_CONVNETS = (ResNetConfig, TextNetConfig, VGGConfig)


# ---- backbones -----------------------------------------------------------------------------------------------


def backbone_config_from(value: BackboneConfig | dict[str, Any] | None) -> BackboneConfig:
    """A backbone config from a config object, its dict (`model_type` says which; default our ViT) or None."""
    if value is None:
        return DinoVisionConfig()
    if isinstance(value, (DinoVisionConfig, *_CONVNETS)):
        return value
    if isinstance(value, dict):
        values = dict(value)
        model_type = values.pop("model_type", DinoVisionConfig.model_type)
        if model_type not in _BACKBONE_CONFIGS:
            raise ValueError(f"backbone model_type {model_type!r} is not supported; use one of {sorted(_BACKBONE_CONFIGS)}")
        return _BACKBONE_CONFIGS[model_type].from_dict(values)
    raise TypeError(f"backbone_config must be a DinoVisionConfig, a ResNetConfig, a TextNetConfig or a dict, got "
                    f"{type(value).__name__}")


def build_backbone(config: BackboneConfig) -> Backbone:
    if isinstance(config, ResNetConfig):
        return ResNetModel(config)
    if isinstance(config, TextNetConfig):
        model = TextNetModel(config)
        return model if getattr(config, TEXTNET_BRANCHES, True) else remove_textnet_branches_(model)
    if isinstance(config, VGGConfig):
        return VGGModel(config)
    return DinoVisionModel(config)


# A `TextNetConfig` attribute of ours (config.json keeps it; stock TextNet ignores it): False = the layers train
# without RepVGG's vertical / horizontal / identity branches (see `remove_textnet_branches_`).
TEXTNET_BRANCHES = "rep_branches"
TEXTNET_BRANCH_MODULES = ("vertical_conv", "vertical_batch_norm", "horizontal_conv", "horizontal_batch_norm",
                           "rbr_identity")


def remove_textnet_branches_(model: TextNetModel) -> TextNetModel:
    """Drop the training-time branches of every `TextNetRepConvLayer` (its forward skips a branch that is None):
    a plain conv-BN-ReLU stack, ~2.5x cheaper to train on CPU than with the branches (docs/small_data.md).
    `stock_textnet` turns it back into a stock model with the branches present and contributing zero."""
    for module in model.modules():
        if type(module).__name__ == "TextNetRepConvLayer":
            for name in TEXTNET_BRANCH_MODULES:
                setattr(module, name, None)
    return model


@torch.no_grad()
def stock_textnet(model: TextNetModel) -> TextNetModel:
    """A stock `TextNetModel` equal to ``model`` in eval mode: a model without branches gets them back with zero
    weights and zero BatchNorm scale and shift, so each adds exactly 0 (in train mode too: a zero conv output, or
    any input scaled by 0, normalises to 0). A model with its branches is returned as it is."""
    if getattr(model.config, TEXTNET_BRANCHES, True):
        return model
    values = {k: v for k, v in model.config.to_dict().items() if k != TEXTNET_BRANCHES}
    stock = TextNetModel(TextNetConfig.from_dict(values))
    for module in stock.modules():
        if type(module).__name__ == "TextNetRepConvLayer":
            for name in TEXTNET_BRANCH_MODULES:
                branch = getattr(module, name)
                if branch is not None:
                    for tensor in (*branch.parameters(), *branch.buffers()):
                        tensor.zero_()
                    if isinstance(branch, nn.BatchNorm2d):
                        branch.running_var.fill_(1.0)
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    branch_keys = [k for k in missing if any(f".{name}." in k for name in TEXTNET_BRANCH_MODULES)]
    if unexpected or len(branch_keys) != len(missing):
        raise ValueError(f"TextNet export: unexpected {unexpected}, missing non-branch {sorted(set(missing) - set(branch_keys))}")
    return stock.train(model.training)


def is_convnet(config: BackboneConfig) -> bool:
    return isinstance(config, _CONVNETS)


def backbone_dim(config: BackboneConfig) -> int:
    """Width of the pooled feature (ConvNets: channels of the last stage; ViT: hidden size)."""
    return config.hidden_sizes[-1] if is_convnet(config) else config.hidden_size


def pooled_features(backbone: Backbone, pixel_values: torch.Tensor) -> torch.Tensor:
    """The global feature `[B, C]`: a ConvNet's global average pool, the ViT's final-normed CLS token (what the
    references feed their projectors, and what kNN / linear probes evaluate). TextNet's own pooler keeps a 2x2
    grid (for detection); the mean of its feature map is the global pool."""
    out = backbone(pixel_values=pixel_values)
    if isinstance(backbone, TextNetModel):
        return out.last_hidden_state.mean((2, 3))
    return out.pooler_output.flatten(1)


def features_and_map(backbone: Backbone, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global feature `[B, C]`, feature map `[B, C, h, w]`): a ConvNet's last stage and its global average pool,
    or the ViT's CLS token and final-normed patch tokens laid out on their grid (registers and CLS excluded)."""
    out = backbone(pixel_values=pixel_values)
    if isinstance(backbone, TextNetModel):
        return out.last_hidden_state.mean((2, 3)), out.last_hidden_state
    if isinstance(backbone, (ResNetModel, VGGModel)):
        return out.pooler_output.flatten(1), out.last_hidden_state
    config = backbone.config
    h, w = pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size
    patches = out.last_hidden_state[:, 1 + config.num_register_tokens :]
    return out.pooler_output, patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)


def pooled_two_views(backbone: Backbone, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global features of both views. A backbone with BatchNorm sees each view as its own batch (as in the
    references, whose batch statistics are per view); a ViT runs once on both (same result, one larger pass)."""
    if has_batch_norm(backbone):
        return pooled_features(backbone, view1), pooled_features(backbone, view2)
    return pooled_features(backbone, torch.cat((view1, view2))).chunk(2)


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@torch.no_grad()
def zero_init_residual_(backbone: ResNetModel) -> None:
    """torchvision's `zero_init_residual=True` (MoCo v3, Barlow Twins): the last BatchNorm of every residual
    branch starts at 0, so each block starts as the identity."""
    for stage in backbone.encoder.stages:
        for layer in stage.layers:
            layer.layer[-1].normalization.weight.zero_()


@torch.no_grad()
def sincos_position_embedding_(backbone: DinoVisionModel, temperature: float = 10000.0) -> None:
    """MoCo v3's fixed 2-D sin-cos position embedding (`build_2d_sincos_position_embedding`), frozen.

    For the patch at grid row i, column j: `[sin(i·ω), cos(i·ω), sin(j·ω), cos(j·ω)]` with
    `ω_d = temperature^(-d / (dim/4))`; the CLS position is zeros. (The reference names the first half `w`: its
    `meshgrid` puts the row index there.)
    """
    config = backbone.config
    grid, dim = config.image_size // config.patch_size, config.hidden_size
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    out_rows, out_cols = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega
    table = torch.cat((out_rows.sin(), out_rows.cos(), out_cols.sin(), out_cols.cos()), dim=1)
    table = torch.cat((torch.zeros(1, dim), table))[None]
    position = backbone.embeddings.position_embeddings
    position.copy_(table.to(position.dtype))
    freeze_position_embedding_(backbone)


def freeze_patch_embedding_(backbone: DinoVisionModel) -> None:
    """MoCo v3's stability trick (`--stop-grad-conv1`): the random patch projection is never trained."""
    backbone.embeddings.patch_embed.requires_grad_(False)


def freeze_position_embedding_(backbone: DinoVisionModel) -> None:
    backbone.embeddings.position_embeddings.requires_grad_(False)


# ---- heads ---------------------------------------------------------------------------------------------------


def batchnorm_mlp(dims: Sequence[int], *, last_bn: bool, last_bn_affine: bool = False) -> nn.Sequential:
    """The references' projectors / predictors: bias-free linears through `dims` (`[in, hidden..., out]`) with
    BatchNorm + ReLU between them and optionally a BatchNorm after the last (MoCo v3: without affine). Modules are
    named `linear{i}`, `norm{i}`, `act{i}`, so the optimizer's no-weight-decay rule recognises the norms."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    n = len(dims) - 1
    for i in range(n):
        layers[f"linear{i}"] = nn.Linear(dims[i], dims[i + 1], bias=False)
        if i < n - 1:
            layers[f"norm{i}"] = nn.BatchNorm1d(dims[i + 1])
            layers[f"act{i}"] = nn.ReLU(inplace=True)
        elif last_bn:
            layers[f"norm{i}"] = nn.BatchNorm1d(dims[i + 1], affine=last_bn_affine)
    return nn.Sequential(layers)


def mlp_dims(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> list[int]:
    """`[in, hidden × (num_layers - 1), out]`: the sizes of a `num_layers`-layer MLP."""
    return [in_dim, *[hidden_dim] * (num_layers - 1), out_dim]


@torch.no_grad()
def torch_default_init_(module: nn.Module) -> None:
    """PyTorch's own initialisation of a layer (what the references' projectors use), from transformers'
    `_init_weights` (which runs instead of the layers' `reset_parameters`)."""
    from transformers import initialization as init

    if isinstance(module, (nn.Linear, nn.Conv2d)):
        init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if module.bias is not None:
            fan_in = module.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(module.bias, -bound, bound)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.weight is not None:
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if module.running_mean is not None:
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


# ---- momentum encoders ---------------------------------------------------------------------------------------


@torch.no_grad()
def momentum_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """`target = momentum · target + (1 - momentum) · online`, parameters only (BatchNorm running statistics of
    the target come from its own forward passes, as in the references)."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - momentum)


def copy_weights_(target: nn.Module, online: nn.Module) -> None:
    """Start a momentum encoder as a copy of the online one."""
    target.load_state_dict(online.state_dict())


# ---- BatchNorm over the global batch ------------------------------------------------------------------------


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the batch of every process — `nn.SyncBatchNorm`'s semantics on
    any backend (SyncBatchNorm only runs on GPUs): mean and biased variance from two autograd-aware all-reduces,
    so gradients flow through the global statistics as they do through SyncBatchNorm. One process, or eval mode,
    is plain BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input [batch, channels, ...], got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        stats = all_reduce_with_grad(torch.cat((x.sum(dims), count.reshape(1))))
        n = stats[-1].detach()
        mean = stats[:-1] / n
        centered = x - mean.reshape(shape)
        var = all_reduce_with_grad(centered.pow(2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = centered / torch.sqrt(var + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out.to(input.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """`module` with every BatchNorm replaced by a `GlobalBatchNorm` holding the same tensors (like
        `nn.SyncBatchNorm.convert_sync_batchnorm`)."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


def sync_batch_norm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm of `module` use global-batch statistics when several processes train (the references
    convert their whole model with `nn.SyncBatchNorm.convert_sync_batchnorm`): SyncBatchNorm under NCCL (GPUs),
    `GlobalBatchNorm` otherwise (gloo on CPUs, where SyncBatchNorm refuses to run). One process: unchanged."""
    if _world_size() == 1:
        return module
    if dist.get_backend() == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return GlobalBatchNorm.convert(module)


# ---- gathering across processes ------------------------------------------------------------------------------


@torch.no_grad()
def shuffled_forward(fn, x: torch.Tensor) -> Any:
    """MoCo's "shuffle BN" (`_batch_shuffle_ddp` / `_batch_unshuffle_ddp`): run `fn` on a random slice of the
    images of all processes, then give each process the outputs of its own images back, so a key encoder's
    per-process BatchNorm statistics cannot tell which images belong together. `fn` returns a tensor or a tuple
    of tensors with the batch first. One process: just `fn(x)` (a permutation within one batch changes nothing).
    """
    from .losses import gather_rows

    if _world_size() == 1:
        return fn(x)
    everything, offset = gather_rows(x)
    perm = torch.randperm(everything.shape[0], device=x.device)
    dist.broadcast(perm, src=0)  # one permutation for all processes
    mine = perm[offset : offset + x.shape[0]]  # this process computes these images ...
    out = fn(everything[mine])
    single = isinstance(out, torch.Tensor)
    results = []
    for t in (out,) if single else out:
        gathered, _ = gather_rows(t)  # ... in the order of `perm` over all processes
        restored = torch.empty_like(gathered)
        restored[perm] = gathered  # row perm[i] of the full batch is gathered row i
        results.append(restored[offset : offset + x.shape[0]])
    return results[0] if single else tuple(results)


# ---- export --------------------------------------------------------------------------------------------------


def resnet_image_processor(crop_size: int = 224) -> ConvNextImageProcessor:
    """The preprocessing of `microsoft/resnet-50` (what `AutoImageProcessor` loads for it): resize the shortest
    edge to `crop_size / 0.875` (bicubic), center crop `crop_size`, ImageNet mean/std."""
    return ConvNextImageProcessor(
        do_resize=True, size={"shortest_edge": crop_size}, crop_pct=0.875, resample=3, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )


def save_resnet_backbone(backbone: ResNetModel, folder: str | Path, crop_size: int = 224) -> Path:
    """A stock-loadable ResNet folder: `ResNetModel` weights + `microsoft/resnet-50`'s image processor, so
    `AutoModel.from_pretrained` and `pipeline("image-feature-extraction")` work on it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(folder)
    resnet_image_processor(crop_size).save_pretrained(folder)
    return folder


def l2_normalized_std(x: torch.Tensor) -> torch.Tensor:
    """Collapse signal: per-dimension std over the batch of the L2-normalised rows, averaged over dimensions and
    scaled by sqrt(dim) — about 1 for embeddings spread over the sphere, 0 when every row is the same vector."""
    x = F.normalize(x.detach().float(), dim=1)
    return x.std(0).mean() * math.sqrt(x.shape[1])


# ---- the base of the two-view pretraining models -------------------------------------------------------------


class TwoViewPretrainingConfig(PretrainedConfig):
    """What every two-view pretraining config holds: the backbone config (our ViT or a ResNet) and whether a
    ResNet starts with zero-initialised residual branches."""

    sub_configs = {"backbone_config": PretrainedConfig}

    def __init__(self, backbone_config: BackboneConfig | dict | None = None, zero_init_residual: bool = False,
                 **kwargs):
        self.backbone_config = backbone_config_from(backbone_config)
        self.zero_init_residual = zero_init_residual
        super().__init__(**kwargs)


class TwoViewPreTrainedModel(PreTrainedModel):
    """Base of the MoCo v3 / Barlow Twins / DenseCL pretraining models: heads keep PyTorch's default init (as in
    the references; the backbone, a `PreTrainedModel` itself, keeps its own), batches come from the `two_views`
    pipeline, and the export is the online backbone (what the references release and evaluate)."""

    main_input_name = "view1"
    input_modalities = ("image",)
    _no_split_modules = ["Embeddings", "Block", "ResNetBottleNeckLayer", "ResNetBasicLayer", "TextNetRepConvLayer",
                         "VGGConvLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        torch_default_init_(module)

    def _freeze_(self) -> None:
        """Mark the parameters that never train (momentum encoders, MoCo v3's patch projection, ...)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model._freeze_()  # transformers re-creates parameters while loading, which drops requires_grad=False
        return model

    def _start_backbone_(self, backbone: Backbone) -> None:
        """Fresh-init extras of a backbone (ResNet: zero-initialised residual branches if configured)."""
        if isinstance(backbone, ResNetModel) and self.config.zero_init_residual:
            zero_init_residual_(backbone)

    def data_pipeline(self):
        from .method import DataPipeline

        config = self.config.backbone_config
        return DataPipeline("two_views", {"patch_size": None if is_convnet(config) else config.patch_size})

    def exports(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "pretraining": self}

    def _backbone_rows(self) -> dict[str, str]:
        c = self.config.backbone_config
        if isinstance(c, TextNetConfig):
            return {"backbone": f"plain CNN (`TextNetModel`), stem stride {c.stem_stride}, layers per stage "
                                f"{[len(k) for k in c.conv_layer_kernel_sizes]}, widths {list(c.hidden_sizes)}"
                                + ("" if getattr(c, TEXTNET_BRANCHES, True) else ", trained without RepVGG branches")}
        if isinstance(c, VGGConfig):
            return {"backbone": f"VGG-style CNN (dinoforge `VGGModel`, max-pooling between stages), layers per "
                                f"stage {list(c.depths)}, widths {list(c.hidden_sizes)}"}
        if is_convnet(c):
            return {"backbone": f"ResNet (`ResNetModel`), stages {list(c.depths)}, widths {list(c.hidden_sizes)}"}
        return {"backbone": f"ViT (exported as `Dinov2Model`), width {c.hidden_size}, depth {c.num_hidden_layers}, "
                            f"patch {c.patch_size}"}
