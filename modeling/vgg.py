"""A small VGG-style ConvNet: stages of 3x3 conv-BatchNorm-ReLU layers at full resolution, 2x2 max-pooling between
stages, global average pool. The shape that learns most from ~1k small images on a CPU budget (docs/small_data.md,
finding 13: max-pooling between stages is worth ~8 kNN points over stride-2 convolutions at equal cost), which no
transformers ConvNet has: their stems downsample 2-4x, and the rest downsample with strided convolutions.

This file imports only transformers and torch: an exported folder carries it (`auto_map`), so it loads with
`AutoModel.from_pretrained(folder, trust_remote_code=True)` without dinoforge, and serves
`pipeline("image-feature-extraction", model=folder, trust_remote_code=True)`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention


class VGGConfig(PretrainedConfig):
    """`hidden_sizes[i]` channels and `depths[i]` 3x3 conv-BN-ReLU layers in stage i; a 2x2 max-pool (stride 2)
    before every stage after the first, so the last feature map is the input downsampled 2^(stages - 1) times."""

    model_type = "dinoforge_vgg"

    def __init__(self, num_channels: int = 3, hidden_sizes: list[int] | None = None, depths: list[int] | None = None,
                 batch_norm_eps: float = 1e-5, **kwargs):
        self.num_channels = num_channels
        self.hidden_sizes = list(hidden_sizes or [16, 32, 64, 128])
        self.depths = list(depths or [2, 2, 2, 2])
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(f"hidden_sizes {self.hidden_sizes} and depths {self.depths} need one entry per stage each")
        if min(self.depths) < 1 or min(self.hidden_sizes) < 1:
            raise ValueError(f"every stage needs >= 1 layer and >= 1 channel, got depths {self.depths}, "
                             f"hidden_sizes {self.hidden_sizes}")
        self.batch_norm_eps = batch_norm_eps
        super().__init__(**kwargs)


class VGGConvLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.normalization = nn.BatchNorm2d(out_channels, eps=eps)
        self.activation = nn.ReLU()

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(hidden_state)))


class VGGStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int, eps: float, pool: bool) -> None:
        super().__init__()
        self.pooler = nn.MaxPool2d(kernel_size=2, stride=2) if pool else nn.Identity()
        self.layers = nn.Sequential(*(VGGConvLayer(in_channels if i == 0 else out_channels, out_channels, eps)
                                      for i in range(depth)))

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.layers(self.pooler(hidden_state))


class VGGPreTrainedModel(PreTrainedModel):
    config_class = VGGConfig
    base_model_prefix = "vgg"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["VGGConvLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's own defaults (kaiming-uniform convs, BatchNorm 1 / 0): what the measurements used
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class VGGModel(VGGPreTrainedModel):
    """`last_hidden_state` `[B, C, h, w]` (the last stage), `pooler_output` its global average `[B, C, 1, 1]` (as
    transformers' `ResNetModel`), `hidden_states` each stage's output when asked."""

    def __init__(self, config: VGGConfig) -> None:
        super().__init__(config)
        widths = [config.num_channels, *config.hidden_sizes]
        self.stages = nn.ModuleList(VGGStage(widths[i], widths[i + 1], depth, config.batch_norm_eps, pool=i > 0)
                                    for i, depth in enumerate(config.depths))
        self.pooler = nn.AdaptiveAvgPool2d(1)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_state, hidden_states = pixel_values, ()
        for stage in self.stages:
            hidden_state = stage(hidden_state)
            hidden_states += (hidden_state,)
        pooled = self.pooler(hidden_state)
        if not return_dict:
            return (hidden_state, pooled, *((hidden_states,) if output_hidden_states else ()))
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden_state, pooler_output=pooled,
            hidden_states=hidden_states if output_hidden_states else None,
        )


__all__ = ["VGGConfig", "VGGModel", "VGGPreTrainedModel"]
