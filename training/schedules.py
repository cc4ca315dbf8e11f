"""Per-step optimizer schedules of the official recipe (lr, weight decay, last-layer freeze) and the schedule
shapes methods build their own values from (`cosine_schedule`, e.g. the teacher momentum and temperature)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .train_config import OptimConfig


def cosine_schedule(step: int, total: int, base: float, final: float, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """Official `CosineScheduler`: linear warm-up `warmup_start → base` over `warmup` steps, then cosine to `final`.

    Past `total` the final value holds (the official array simply ends there).
    """
    if step < warmup:
        # np.linspace(warmup_start, base, warmup)[step]
        return warmup_start + (base - warmup_start) * (step / (warmup - 1) if warmup > 1 else 1.0)
    decay_steps = total - warmup
    if decay_steps <= 0 or step >= total:
        return final
    t = step - warmup
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / decay_steps))


def rise_hold_schedule(step: int, rise: int, peak: float) -> float:
    """DINOv3 high-res adaptation lr (its `linear_warmup_cosine_decay` with start = peak = 0, end = peak):
    a half-cosine rise 0 → ``peak`` over ``rise`` steps (``peak`` reached at step ``rise - 1``), then constant."""
    if step >= rise - 1:
        return peak
    return peak * 0.5 * (1 - math.cos(math.pi * step / (rise - 1)))


def scaled_lr(base_lr: float, global_batch: int, rule: str = "sqrt_1024") -> float:
    """The lr for a global batch: DINOv2's "sqrt_wrt_1024" (`base_lr * sqrt(batch / 1024)`) or the linear rule of
    MoCo v3 / SimCLR-style recipes (`base_lr * batch / 256`)."""
    if rule == "sqrt_1024":
        return base_lr * math.sqrt(global_batch / 1024)
    if rule == "linear_256":
        return base_lr * global_batch / 256
    raise ValueError(f"optim.lr_scaling={rule!r} is not one of ['sqrt_1024', 'linear_256']")


@dataclass
class StepValues:
    lr: float
    last_layer_lr: float
    weight_decay: float


class Schedules:
    """The optimizer schedules of a run, evaluated at an optimizer step (counted in official "iterations")."""

    def __init__(self, optim: OptimConfig, global_batch: int):
        o, epoch = optim, optim.iters_per_epoch
        self.total = o.epochs * epoch
        self.lr = scaled_lr(o.base_lr, global_batch, o.lr_scaling)
        self.min_lr = o.min_lr
        self.lr_warmup = o.warmup_epochs * epoch
        self.lr_schedule = o.lr_schedule
        self.freeze_last_layer = o.freeze_last_layer_epochs * epoch
        self.wd = (o.weight_decay, o.weight_decay_end)

    def at(self, step: int) -> StepValues:
        if self.lr_schedule == "rise_hold":
            lr = rise_hold_schedule(step, self.lr_warmup, self.lr)
        else:
            lr = cosine_schedule(step, self.total, self.lr, self.min_lr, self.lr_warmup)
        return StepValues(
            lr=lr,
            last_layer_lr=0.0 if step < self.freeze_last_layer else lr,
            weight_decay=cosine_schedule(step, self.total, *self.wd),
        )
