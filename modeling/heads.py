"""DINO / iBOT projection head (METHOD.md "Heads and losses")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation `W = g · v / ||v||` (per output row).

    Written out instead of `torch.nn.utils.parametrizations.weight_norm` so the parameters are plain tensors
    named like the official checkpoints (`weight_g`, `weight_v`): they save to safetensors, shard under FSDP and
    load from official head weights without parametrization plumbing.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The official head builds its last layer after the trunc-normal init, so it keeps nn.Linear's default
        # (kaiming-uniform) direction; only the norm g is set to 1.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DinoHead(nn.Module):
    """3-layer MLP (GELU) → L2-normalise → weight-normalised linear (no bias) to `num_prototypes`."""

    def __init__(
        self,
        in_dim: int,
        num_prototypes: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, num_prototypes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        # fp16 cannot represent 1e-12 (official uses 1e-6 there)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
