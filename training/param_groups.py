"""Optimizer parameter groups of the official recipe: layer-wise lr decay, patch-embed lr multiplier,
no weight decay on biases / norms / LayerScale gammas, a flag for the heads' last layers (frozen at first)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from torch import nn

_EMBEDDING_NAMES = ("position_embeddings", "patch_embed", "mask_token", "cls_token", "register_tokens")
_TOKEN_NAMES = ("position_embeddings", "mask_token", "cls_token", "register_tokens")


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for block i, num_layers + 1 for everything after (final norm, heads)."""
    if any(key in name for key in _EMBEDDING_NAMES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def param_groups(
    parts: Mapping[str, nn.Module],
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    decay_tokens: bool = True,
) -> list[dict]:
    """Fused groups with `lr_multiplier`, `wd_multiplier`, `is_last_layer` and `part` (applied each step by the loop).

    `parts` are a method's trainable modules by name (`trainable_parts()`, e.g. DINOv2's student backbone and
    heads). As in the official code, multipliers are computed per part: a part with `blocks` (a ViT) decays
    with depth, the others (heads) get multiplier 1. Groups never mix parts, so a part can be frozen alone.
    """
    fused: dict[tuple, dict] = defaultdict(lambda: {"params": [], "names": []})
    for module_name, module in parts.items():
        num_layers = len(module.blocks) if hasattr(module, "blocks") else 0
        # A part may name parameters that must not decay by other rules (timm's `no_weight_decay()` convention),
        # e.g. a CLIP logit scale or a text tower's `LayerNorm` gains.
        keep = set(module.no_weight_decay()) if callable(getattr(module, "no_weight_decay", None)) else set()
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            lr_mult = layerwise_decay ** (num_layers + 1 - layer_id(name, num_layers)) if num_layers else 1.0
            if "patch_embed" in name:
                lr_mult *= patch_embed_lr_mult
            no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name or name in keep
            if not decay_tokens and any(key in name for key in _TOKEN_NAMES):
                no_decay = True
            is_last_layer = "last_layer" in name
            key = (module_name, lr_mult, 0.0 if no_decay else 1.0, is_last_layer)
            group = fused[key]
            group.update(part=module_name, lr_multiplier=key[1], wd_multiplier=key[2], is_last_layer=key[3])
            group["params"].append(param)
            group["names"].append(f"{module_name}.{name}")
    return list(fused.values())


def apply_schedule(
    optimizer, lr: float, last_layer_lr: float, weight_decay: float, lr_scales: Mapping[str, float] | None = None
) -> None:
    """Set this step's lr and weight decay on every group; `lr_scales` multiplies the lr of whole parts."""
    lr_scales = lr_scales or {}
    for group in optimizer.param_groups:
        scale = lr_scales.get(group["part"], 1.0)
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"] * scale
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
