"""The optimizer of a run, by name (`optim.optimizer`), over the parameter groups of `training.param_groups`.

Each group carries `lr_multiplier`, `wd_multiplier`, `is_last_layer` and `part`; the loop sets `lr` and
`weight_decay` on every group each step (`param_groups.apply_schedule`), so an optimizer here is built with lr 0.

* `adamw` — DINOv2 (and MoCo v3 ViT, Barlow Twins ViT); `optim.betas`.
* `sgd` — SGD with momentum (`optim.momentum`, DenseCL: 0.9), no Nesterov, as `torch.optim.SGD`.
* `lars` — LARS as in the MoCo v3 and Barlow Twins references (`moco/optimizer.py`, `main.py`): SGD with momentum
  whose update of every parameter with more than one dimension is scaled by the trust ratio
  `eta · ‖w‖ / ‖g + wd · w‖`; one-dimensional parameters (biases, BatchNorm) get neither weight decay nor the
  trust ratio (`optim.momentum`, `optim.lars_eta`).

Shared `optim` options: `momentum` 0.9, `lars_eta` 0.001, `bias_norm_lr_mult` 1.0 (lr multiplier of the
one-dimensional parameters: Barlow Twins' 0.0048 / 0.2), `decay_biases_and_norms` False (True decays every
parameter, as MoCo v3's AdamW and DenseCL's SGD do).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .train_config import OptimConfig

OPTIMIZERS = ("adamw", "sgd", "lars")


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum (the references' LARS; see the module docstring).

    Per parameter `p` with gradient `g`: if `p.ndim > 1`, `g ← g + wd · p` and `g ← g · eta‖p‖/‖g‖` (1 where a
    norm is 0); then `μ ← momentum · μ + g` and `p ← p − lr · μ`.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1, eta > 0; got {lr}, "
                             f"{weight_decay}, {momentum}, {eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:  # not a bias or a norm: weight decay and the trust ratio
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    one = torch.ones_like(param_norm)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm, one)
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def split_one_dimensional(groups: list[dict], lr_mult: float, decay_all: bool) -> list[dict]:
    """Groups with the one-dimensional parameters (biases, norm weights) in groups of their own whose
    `lr_multiplier` is multiplied by `lr_mult` (Barlow Twins trains them at 0.0048 / 0.2 of the weights' lr);
    `decay_all` gives every group weight decay (`wd_multiplier` 1), as MoCo v3 (AdamW) and DenseCL (SGD) do."""
    out = []
    for group in groups:
        for one_dim in (False, True):
            keep = [(p, n) for p, n in zip(group["params"], group["names"]) if (p.ndim <= 1) == one_dim]
            if not keep:
                continue
            new = {**group, "params": [p for p, _ in keep], "names": [n for _, n in keep]}
            if one_dim:
                new["lr_multiplier"] = group["lr_multiplier"] * lr_mult
            if decay_all:
                new["wd_multiplier"] = 1.0
            out.append(new)
    return out


def build_optimizer(groups: list[dict], optim: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """`fused`: one kernel for all parameters, where they are plain tensors (not FSDP / DeepSpeed shards)."""
    if optim.bias_norm_lr_mult != 1.0 or optim.decay_biases_and_norms:
        groups = split_one_dimensional(groups, optim.bias_norm_lr_mult, optim.decay_biases_and_norms)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(optim.betas), fused=True if fused else None)
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=optim.momentum, weight_decay=0.0)
    if optim.optimizer == "lars":
        return LARS(groups, lr=0.0, momentum=optim.momentum, eta=optim.lars_eta)
    raise ValueError(f"optim.optimizer={optim.optimizer!r} is not one of {list(OPTIMIZERS)}")
