"""What the two-view methods (`mocov3`, `barlow_twins`, `densecl`) add to the shared config sections, and how
their models are built: the backbone section (`model`: our ViT or a ResNet), the photometric views section
(`views`), optimizer options for SGD / LARS (`optim`), momentum schedules and the model builder."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import ResNetConfig, TextNetConfig

from modeling import DinoVisionConfig, VGGConfig
from modeling.two_view import TEXTNET_BRANCHES, BackboneConfig, TwoViewPreTrainedModel, sync_batch_norm

from ..build import ModelConfig, folder_model_type, load_backbone
from ..config import ConfigError, check
from ..data.two_views import ViewsConfig
from ..schedules import cosine_schedule
from ..train_config import TrainConfig
from .registry import Schedule

logger = logging.getLogger(__name__)


@dataclass
class BackboneModelConfig(ModelConfig):
    """The `model` section of the two-view methods: DINOv2's (preset and sizes of our ViT, `init_from`, ...) plus
    `arch` (vit | resnet | textnet | vgg), the ViT's `patch_size`, the ResNet's shape (transformers `ResNetConfig`; the
    defaults are `microsoft/resnet-50`), and the plain CNN's (transformers `TextNetModel` as a VGG-style stack:
    a 3x3 stem of `textnet_stride`, then per stage `textnet_depths` 3x3 conv-BN-ReLU layers, the first of every
    stage after the first with stride 2, `textnet_hidden_sizes` channels; the stem has the first stage's width), and
    `vgg` (`modeling.vgg.VGGModel`: per stage `vgg_depths` 3x3 conv-BN-ReLU layers of `vgg_hidden_sizes` channels,
    2x2 max-pooling between stages; exported with its code, loads with `trust_remote_code=True`)."""

    arch: str = field(default="vit", metadata=check(choices=("vit", "resnet", "textnet", "vgg")))
    patch_size: int | None = field(default=None, metadata=check(ge=1))  # None: the preset's (14)
    resnet_depths: list[int] = field(default_factory=lambda: [3, 4, 6, 3], metadata=check(ge=1))
    resnet_hidden_sizes: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048], metadata=check(ge=1))
    resnet_embedding_size: int = field(default=64, metadata=check(ge=1))
    resnet_layer_type: str = field(default="bottleneck", metadata=check(choices=("bottleneck", "basic")))
    textnet_depths: list[int] = field(default_factory=lambda: [1, 2, 2, 2], metadata=check(ge=1))
    textnet_hidden_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128], metadata=check(ge=1))
    textnet_stride: int = field(default=1, metadata=check(ge=1))
    # RepVGG's training-time branches (3x1, 1x3, identity) beside each 3x3 conv; false: a plain conv-BN-ReLU stack,
    # ~2.5x cheaper on CPU, exported as a stock TextNetModel whose branches are zero (the same function)
    textnet_branches: bool = True
    # kernel of the stride-2 first layer of every stage after the first: 3, or 2 (a 2x2 patch merge that sees every
    # pixel once, where a strided 3x3 skips every other position)
    textnet_downsample_kernel: int = field(default=3, metadata=check(choices=(2, 3)))
    vgg_depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2], metadata=check(ge=1))
    vgg_hidden_sizes: list[int] = field(default_factory=lambda: [16, 32, 64, 128], metadata=check(ge=1))
    # ConvNet weights in channels-last memory layout: oneDNN's fast path on CPU (a 32 px TextNet step took 114 ms
    # instead of 148 on 2 cores) and cuDNN's with mixed precision
    channels_last: bool = False


@dataclass
class TwoViewTrainConfig(TrainConfig):
    """Shared sections + `model` (backbone) + `views` (photometric augmentation). The view size and crop scale
    are `crops.global_size` and `crops.global_scale`."""

    model: BackboneModelConfig = field(default_factory=BackboneModelConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)


def backbone_config(model: BackboneModelConfig, view_size: int) -> BackboneConfig:
    """The backbone config of the `model` section: a ResNet, or our ViT (position-embedding grid = the view size
    unless `model.image_size`)."""
    if model.arch == "resnet":
        return ResNetConfig(
            embedding_size=model.resnet_embedding_size, hidden_sizes=list(model.resnet_hidden_sizes),
            depths=list(model.resnet_depths), layer_type=model.resnet_layer_type,
        )
    if model.arch == "textnet":
        return textnet_config(model.textnet_depths, model.textnet_hidden_sizes, model.textnet_stride,
                              branches=model.textnet_branches, downsample_kernel=model.textnet_downsample_kernel)
    if model.arch == "vgg":
        if len(model.vgg_depths) != len(model.vgg_hidden_sizes):
            raise ConfigError(f"model.vgg_depths {model.vgg_depths} and model.vgg_hidden_sizes "
                              f"{model.vgg_hidden_sizes} need one entry per stage each")
        return VGGConfig(hidden_sizes=list(model.vgg_hidden_sizes), depths=list(model.vgg_depths))
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "ffn", "drop_path_rate", "layerscale_init",
             "patch_size")
    overrides = {name: getattr(model, name) for name in sizes if getattr(model, name) is not None}
    return DinoVisionConfig.from_preset(model.preset, image_size=model.image_size or view_size,
                                        num_register_tokens=model.num_register_tokens, **overrides)


def textnet_config(depths: list[int], widths: list[int], stem_stride: int = 1, branches: bool = True,
                   downsample_kernel: int = 3) -> TextNetConfig:
    """`TextNetConfig` of a plain VGG-style CNN (see `BackboneModelConfig`); `branches=False` trains it without
    RepVGG's branches (`modeling.two_view.remove_textnet_branches_`)."""
    if len(depths) != len(widths):
        raise ConfigError(f"model.textnet_depths {depths} and model.textnet_hidden_sizes {widths} need one entry per "
                          "stage each")
    return TextNetConfig(
        stem_kernel_size=3, stem_stride=stem_stride, stem_out_channels=widths[0],
        hidden_sizes=[widths[0], *widths],
        conv_layer_kernel_sizes=[[[3, 3] if i == 0 or j else [downsample_kernel] * 2 for j in range(d)]
                                 for i, d in enumerate(depths)],
        conv_layer_strides=[[1 if i == 0 else 2] + [1] * (d - 1) for i, d in enumerate(depths)],
        **({} if branches else {TEXTNET_BRANCHES: False}),
    )


def build_two_view_model(
    cfg: TwoViewTrainConfig, model_class: type[TwoViewPreTrainedModel], config, *, global_batch_norm: bool = True
) -> TwoViewPreTrainedModel:
    """Fresh model from `config`, or `model.init_from`: a folder of this method's pretraining model continues it
    (both encoders, heads, queues); any other backbone source (ViT: DINOv2 / dinoforge exports or official
    checkpoints; ResNet: a `ResNetModel` folder or Hub id) initialises the backbones, with fresh heads.
    With `global_batch_norm`, BatchNorms use the statistics of all processes' batches (`sync_batch_norm`, as
    MoCo v3 and Barlow Twins do; DenseCL keeps per-process BatchNorm with shuffle BN instead)."""
    source = cfg.model.init_from
    if source and Path(source).is_dir() and folder_model_type(Path(source)) == model_class.config_class.model_type:
        logger.info("continuing from %s", source)
        model = model_class.from_pretrained(source)
    else:
        model = model_class(config)
        if source:
            model.load_backbone_weights(_backbone_weights(source, cfg.model))
            logger.info("initialised the backbones from %s (fresh heads)", source)
    model.train()  # from_pretrained returns eval mode: BatchNorm would use running statistics
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-d weights only; checkpoints still hold plain tensors
    if cfg.model.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    if cfg.model.compile:
        model.backbone.compile()
    return sync_batch_norm(model) if global_batch_norm else model


def _backbone_weights(source: str, model: BackboneModelConfig) -> dict:
    if model.arch in ("resnet", "textnet", "vgg"):
        from transformers import AutoModel

        state = AutoModel.from_pretrained(source).state_dict()
        return state if model.arch != "textnet" or model.textnet_branches else without_textnet_branches(state, source)
    return load_backbone(source, model.drop_path_rate).state_dict()


def without_textnet_branches(state: dict, source: str) -> dict:
    """A stock TextNet state dict for a model trained without branches: its branch tensors dropped when they are
    zero (a branch-free model's export); branches that compute something cannot be dropped without changing it."""
    from modeling.two_view import TEXTNET_BRANCH_MODULES

    branch = {k: v for k, v in state.items() if any(f".{name}." in k for name in TEXTNET_BRANCH_MODULES)}
    live = [k for k, v in branch.items() if k.endswith(("weight", "bias")) and v.abs().max() > 0]
    if live:
        raise ConfigError(f"model.init_from {source} has RepVGG branches that are not zero ({live[0]}, ...): set "
                          "model.textnet_branches: true to continue it with them")
    return {k: v for k, v in state.items() if k not in branch}


def momentum_schedule(cfg: TrainConfig, start: float, end: float) -> Schedule:
    """Key-encoder momentum `start → end` by a cosine over the run (constant when equal), as the value the update
    after step s needs: the references update at the start of iteration s + 1 with that iteration's momentum
    (MoCo v3: `1 − ½(1 + cos(π t / T))(1 − m₀)`), so this returns the value of s + 1."""
    total = cfg.optim.epochs * cfg.optim.iters_per_epoch
    return lambda step: cosine_schedule(step + 1, total, start, end)


def backbone_warmup(cfg: TwoViewTrainConfig) -> dict[str, Callable[[int], float]]:
    """`model.head_warmup_steps`: the backbone's lr is 0 for that many steps (fresh heads on a loaded backbone)."""
    if cfg.model.head_warmup_steps <= 0:
        return {}
    frozen = cfg.model.head_warmup_steps
    return {"lr_scale/backbone": lambda step: 0.0 if step < frozen else 1.0}
