"""Linear probe on frozen features: multinomial logistic regression, (lr, weight decay) picked on a validation split.

Features are standardised, trained with SGD + momentum + a cosine schedule; (lr, weight decay) is picked on a
validation split (the dataset's own, or a seeded 10 % of train), then the head is refit on all of train. The
standardisation is folded into the weights, so the head applies to raw features and exports exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import EvaluationError, default_device
from .metrics import topk_accuracy


@dataclass
class LinearProbeConfig:
    """Linear-probe training on frozen features; the (lr, weight decay) grid is searched on a validation split."""

    learning_rates: tuple[float, ...] = (0.01, 0.1, 1.0)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
    epochs: int = 100
    min_steps: int = 500  # small sets: at least this many SGD steps
    batch_size: int = 1024
    momentum: float = 0.9
    val_fraction: float = 0.1  # used when no validation split is given
    seed: int = 0


@dataclass
class LinearHead:
    """A trained linear probe that applies to *raw* features (the standardisation is folded in)."""

    weight: Tensor  # [num_classes, dim]
    bias: Tensor  # [num_classes]
    feature: str  # "cls" | "cls_avgpool"
    learning_rate: float
    weight_decay: float
    val_top1: float | None = None
    grid: list[dict[str, float]] = field(default_factory=list)

    def __call__(self, features: Tensor) -> Tensor:
        return features.float().to(self.weight.device) @ self.weight.T + self.bias

    def summary(self) -> dict[str, Any]:
        return {
            "feature": self.feature, "learning_rate": self.learning_rate, "weight_decay": self.weight_decay,
            "val_top1": self.val_top1, "grid": self.grid,
        }


def _fit_linear_grid(
    x: Tensor, y: Tensor, num_classes: int, lrs: Sequence[float], wds: Sequence[float], cfg: LinearProbeConfig,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Train len(lrs) softmax classifiers at once (one per (lr, wd)) on standardised x; returns W [G,D,C], b [G,C].

    Mean cross-entropy, SGD with momentum and coupled L2 weight decay on W (like `torch.optim.SGD`), cosine lr
    to 0, zero init; gradients written out by hand (softmax - one-hot), which is much cheaper than autograd for
    these small problems.
    """
    g_count, (n, d) = len(lrs), x.shape
    small = device.type == "cpu" and min(cfg.batch_size, n) * d * num_classes * g_count < 50_000_000
    with _torch_threads(1 if small else None):  # tiny CPU ops only lose from threads (badly on a busy machine)
        return _fit_linear_grid_impl(x, y, num_classes, lrs, wds, cfg, device)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily run torch CPU ops on `n` threads (no change for None)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(before)


def _fit_linear_grid_impl(
    x: Tensor, y: Tensor, num_classes: int, lrs: Sequence[float], wds: Sequence[float], cfg: LinearProbeConfig,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    g_count, (n, d) = len(lrs), x.shape
    lr = torch.tensor(lrs, device=device, dtype=x.dtype).view(-1, 1, 1)
    wd = torch.tensor(wds, device=device, dtype=x.dtype).view(-1, 1, 1)
    w = torch.zeros(g_count, d, num_classes, device=device, dtype=x.dtype)
    b = torch.zeros(g_count, num_classes, device=device, dtype=x.dtype)
    w_buf, b_buf = torch.zeros_like(w), torch.zeros_like(b)
    bs = min(cfg.batch_size, n)
    total = max(cfg.epochs * math.ceil(n / bs), cfg.min_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    perm, pos = torch.randperm(n, generator=gen), 0
    for step in range(total):
        if pos >= n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + bs].to(device)
        pos += bs
        xb, yb = x[idx], y[idx]
        probs = torch.softmax(torch.matmul(xb, w) + b[:, None, :], dim=-1)  # [G, B, C]
        probs[:, torch.arange(len(idx), device=device), yb] -= 1.0  # d(mean CE)/d(logits) * B
        gw = torch.matmul(xb.T, probs) / len(idx) + wd * w
        gb = probs.mean(dim=1)
        scale = 0.5 * (1.0 + math.cos(math.pi * step / total))
        w_buf.mul_(cfg.momentum).add_(gw)
        b_buf.mul_(cfg.momentum).add_(gb)
        w.sub_(scale * lr * w_buf)
        b.sub_(scale * lr.view(-1, 1) * b_buf)
    return w, b


def _standardise_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return mean, std


@torch.no_grad()
def train_linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    *,
    num_classes: int,
    val_features: Tensor | None = None,
    val_labels: Tensor | None = None,
    config: LinearProbeConfig | None = None,
    feature: str = "cls",
    device: torch.device | str | None = None,
) -> LinearHead:
    """Pick (lr, weight decay) on a validation split, refit on train (+ val), return the head on raw features.

    Without `val_features` a seeded `config.val_fraction` of train is held out for the grid search. The chosen
    setting is the best validation top-1 (ties: lower validation loss, then grid order); it is then retrained
    on all train samples (and the given validation samples), so the test set is never used for selection.
    """
    cfg = config or LinearProbeConfig()
    device = torch.device(device) if device is not None else default_device()
    x_all = train_features.float().to(device)
    y_all = train_labels.long().to(device)
    if len(x_all) == 0:
        raise EvaluationError("the linear probe needs at least one train sample")
    if val_features is not None and val_labels is not None:
        x_fit, y_fit = x_all, y_all
        x_val, y_val = val_features.float().to(device), val_labels.long().to(device)
        x_all, y_all = torch.cat([x_fit, x_val]), torch.cat([y_fit, y_val])
    else:
        n_val = int(round(cfg.val_fraction * len(x_all)))
        perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        if n_val >= 1 and len(x_all) - n_val >= 1:
            x_val, y_val = x_all[perm[:n_val]], y_all[perm[:n_val]]
            x_fit, y_fit = x_all[perm[n_val:]], y_all[perm[n_val:]]
        else:
            x_val = y_val = x_fit = y_fit = None

    grid = [(lr, wd) for lr in cfg.learning_rates for wd in cfg.weight_decays]
    if not grid:
        raise ValueError("the linear-probe grid is empty: give at least one learning rate and one weight decay")
    grid_report: list[dict[str, float]] = []
    # Too few samples for a validation split: the middle learning rate, the smallest weight decay.
    best_lr, best_wd, best_top1 = cfg.learning_rates[len(cfg.learning_rates) // 2], min(cfg.weight_decays), None
    if x_val is not None and len(grid) > 1:
        mean, std = _standardise_stats(x_fit)
        w, b = _fit_linear_grid(
            (x_fit - mean) / std, y_fit, num_classes, [g[0] for g in grid], [g[1] for g in grid], cfg, device
        )
        logits = torch.matmul((x_val - mean) / std, w) + b[:, None, :]
        best_key = None
        for i, (lr, wd) in enumerate(grid):
            top1 = topk_accuracy(logits[i], y_val, (1,))["top1"]
            loss = F.cross_entropy(logits[i], y_val).item()
            grid_report.append({"learning_rate": lr, "weight_decay": wd, "val_top1": top1, "val_loss": loss})
            key = (-top1, loss if math.isfinite(loss) else math.inf, i)
            if best_key is None or key < best_key:
                best_key, best_lr, best_wd, best_top1 = key, lr, wd, top1

    mean, std = _standardise_stats(x_all)
    w, b = _fit_linear_grid((x_all - mean) / std, y_all, num_classes, [best_lr], [best_wd], cfg, device)
    w, b = w[0], b[0]  # [D, C], [C]
    weight = (w / std.view(-1, 1)).T.contiguous()  # fold x' = (x - mean) / std into the weights
    bias = b - (mean / std) @ w
    return LinearHead(
        weight=weight.cpu(), bias=bias.cpu(), feature=feature, learning_rate=best_lr, weight_decay=best_wd,
        val_top1=best_top1, grid=grid_report,
    )
