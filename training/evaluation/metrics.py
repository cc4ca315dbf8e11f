"""Top-k accuracy with a deterministic tie rule (plain torch, no `evaluate` dependency)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import EvaluationError


def rank_classes(scores: Tensor, k: int | None = None) -> Tensor:
    """Class indices sorted by decreasing score; equal scores rank the lower class index first.

    `scores` is `[N, C]`; returns `[N, min(k, C)]` (all C when k is None). A stable descending sort keeps equal
    values in index order, which is the tie rule.
    """
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order if k is None else order[:, : min(k, scores.shape[1])]


def topk_hits(scores: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose target is among the k best-ranked classes (`rank_classes`), per k."""
    if scores.ndim != 2 or targets.ndim != 1 or len(scores) != len(targets):
        raise ValueError(f"scores must be [N, C] and targets [N], got {tuple(scores.shape)} and {tuple(targets.shape)}")
    ranked = rank_classes(scores, max(ks))
    hits = ranked == targets.to(ranked.device).view(-1, 1)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def topk_accuracy(scores: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent, `{"top1": ..., "top5": ...}` (micro average over samples).

    A sample counts as correct for top-k if its target is among the k best-ranked classes (`rank_classes`, ties
    to the lower class index). k larger than the number of classes means all classes.
    """
    if len(targets) == 0:
        raise EvaluationError("cannot compute accuracy on an empty set")
    return {f"top{k}": 100.0 * h / len(targets) for k, h in topk_hits(scores, targets, ks).items()}
