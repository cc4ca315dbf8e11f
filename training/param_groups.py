"""Optimizer parameter groups of the official recipe: layer-wise lr decay, patch-embed lr multiplier,
no weight decay on biases / norms / LayerScale gammas, a flag for the heads' last layers (frozen at first)."""

from __future__ import annotations

from collections import defaultdict

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
    student: nn.ModuleDict,
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    decay_tokens: bool = True,
) -> list[dict]:
    """Fused groups with `lr_multiplier`, `wd_multiplier` and `is_last_layer` (applied each step by the loop).

    As in the official code, multipliers are computed per student submodule: the backbone's parameters decay
    with depth, the heads (no blocks) get multiplier 1.
    """
    fused: dict[tuple, dict] = defaultdict(lambda: {"params": [], "names": []})
    for module_name, module in student.items():
        num_layers = len(module.blocks) if hasattr(module, "blocks") else 0
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            lr_mult = layerwise_decay ** (num_layers + 1 - layer_id(name, num_layers)) if num_layers else 1.0
            if "patch_embed" in name:
                lr_mult *= patch_embed_lr_mult
            no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
            if not decay_tokens and any(key in name for key in _TOKEN_NAMES):
                no_decay = True
            is_last_layer = "last_layer" in name
            key = (lr_mult, 0.0 if no_decay else 1.0, is_last_layer)
            group = fused[key]
            group.update(lr_multiplier=key[0], wd_multiplier=key[1], is_last_layer=key[2])
            group["params"].append(param)
            group["names"].append(f"{module_name}.{name}")
    return list(fused.values())


def apply_schedule(optimizer, lr: float, last_layer_lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
        group["weight_decay"] = weight_decay * group["wd_multiplier"]
