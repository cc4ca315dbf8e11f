"""Frozen-feature evaluation of a backbone: k-NN and linear probes, in-training k-NN, model-card results.

Works on any backbone that `transformers.AutoModel.from_pretrained` loads and that returns a ViT-style
`last_hidden_state` `[batch, 1 + registers + patches, dim]` (ours, an export, a stock DINOv2 with or without
registers), and on any labelled `datasets` split (Hub id, image folder, `save_to_disk` dir, ... through
`training.data.load_image_dataset`).

Protocols
- Features: final-normed CLS token and the mean of the patch tokens (register tokens excluded), the inputs of
  `Dinov2ForImageClassification` / `Dinov2WithRegistersForImageClassification`. Batched, no grad, bf16 autocast
  on CUDA (fp32 on CPU), decoding + preprocessing in DataLoader workers, cached on disk (`FeatureCache`).
- k-NN (official DINOv2 `eval/knn.py`): L2-normalised CLS, cosine similarity, the `max(ks)` nearest train
  samples, weights `softmax(sim / T)` with T = 0.07, class score = sum of the weights of the first k neighbours,
  k in {10, 20, 100, 200}; headline k = 20. Deterministic tie rules: equally similar train samples are taken in
  increasing train index; equal class scores rank the lower class index first. k larger than the train set
  uses the whole train set.
- Linear probe: a linear classifier (multinomial logistic regression) on frozen features, CLS and
  CLS || mean-patch ("cls_avgpool"); features standardised, SGD + momentum + cosine schedule; (lr, weight decay)
  picked on a validation split (the dataset's own, or a seeded 10 % of train), then refit on all of train. The
  standardisation is folded into the weights, so the head applies to raw features and exports exactly.
- Metrics: top-1 / top-5 accuracy in percent, micro-averaged (like the official `MEAN_ACCURACY`), computed
  with plain torch (no `evaluate` dependency). With fewer than 5 classes top-5 is top-(num classes) = 100 %.

Multi-process (`accelerator` given): every process extracts features for its contiguous shard of the dataset
(shards padded to equal length so every process runs the same number of forward passes, which FSDP needs),
features are gathered to every process with `accelerator.gather`, and k-NN is computed on every process
(identical results everywhere, nothing to broadcast).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from modeling.convert import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

KNN_KS: tuple[int, ...] = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
HEADLINE_K = 20
FEATURE_KINDS: tuple[str, ...] = ("cls", "cls_avgpool")

# Bump when the extracted features change meaning (invalidates every cache entry).
FEATURE_CACHE_VERSION = "1"

FeatureKind = Literal["cls", "cls_avgpool"]


class EvaluationError(ValueError):
    """A user-fixable problem with the model, the dataset or the options of an evaluation."""


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# k-NN
# --------------------------------------------------------------------------------------------------------------


def _stable_topk(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along dim 1 ordered by (similarity desc, index asc): ties go to the lower train index.

    `torch.topk` does not specify which of equal values it returns, so take k + 1 candidates, order them by
    (value desc, index asc) with two stable sorts, and fall back to a full stable sort for the rows where the
    k-th and (k+1)-th values are equal (a tie group that may continue outside the candidates).
    """
    n = sims.shape[1]
    if k >= n:
        vals, idx = torch.sort(sims, dim=1, descending=True, stable=True)
        return vals, idx
    vals, idx = torch.topk(sims, k + 1, dim=1, largest=True, sorted=True)
    order = torch.argsort(idx, dim=1, stable=True)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    boundary_tie = vals[:, k - 1] == vals[:, k]
    if boundary_tie.any():
        rows = boundary_tie.nonzero().squeeze(1)
        full_vals, full_idx = torch.sort(sims[rows], dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = full_vals[:, : k + 1], full_idx[:, : k + 1]
    return vals[:, :k], idx[:, :k]


def _knn_chunks(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    num_classes: int | None,
    ks: Sequence[int],
    temperature: float,
    device: torch.device | str | None,
    chunk_size: int | None,
) -> Iterator[tuple[int, dict[int, Tensor]]]:
    """Yields (first test row, {k: class scores of this chunk of test rows, on `device`})."""
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"features must be [N, D] with the same D, got {tuple(train_features.shape)} and {tuple(test_features.shape)}"
        )
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} train features but {len(train_labels)} labels")
    if len(train_features) == 0:
        raise EvaluationError("k-NN needs at least one train sample")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    device = torch.device(device) if device is not None else _default_device()
    train_labels = train_labels.long().to(device)
    num_classes = int(num_classes if num_classes is not None else train_labels.max().item() + 1)
    train = F.normalize(train_features.float().to(device), dim=1)
    n_train = len(train)
    max_k = min(max(ks), n_train)
    if chunk_size is None:  # keep the [chunk, n_train] similarity block around 64M floats
        chunk_size = max(1, min(4096, (1 << 26) // n_train))
    for start in range(0, len(test_features), chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].float().to(device), dim=1)
        top_sims, top_idx = _stable_topk(test @ train.T, max_k)
        weights = torch.softmax(top_sims / temperature, dim=1)  # over the max(ks) neighbours, as the official code
        neighbor_labels = train_labels[top_idx]
        chunk = {}
        for k in ks:
            kk = min(k, max_k)
            scores = torch.zeros(len(test), num_classes, device=device, dtype=weights.dtype)
            chunk[k] = scores.scatter_add_(1, neighbor_labels[:, :kk], weights[:, :kk])
        yield start, chunk


def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    num_classes: int | None = None,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
) -> dict[int, Tensor]:
    """Weighted k-NN class scores `{k: [N_test, C]}` (on CPU) with the official DINOv2 protocol.

    Features are L2-normalised here (pass raw CLS features). For each test sample the `max(ks)` most cosine-similar
    train samples (ties: lower train index first) get weights `softmax(sim / temperature)` over those neighbours;
    the score of class c for a given k is the sum of the weights of the first k neighbours labelled c.
    k larger than the train set is clamped to it.
    """
    out: dict[int, list[Tensor]] = {k: [] for k in ks}
    for _, chunk in _knn_chunks(
        train_features, train_labels, test_features, num_classes=num_classes, ks=ks, temperature=temperature,
        device=device, chunk_size=chunk_size,
    ):
        for k, scores in chunk.items():
            out[k].append(scores.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
) -> dict[str, dict[str, float]]:
    """k-NN top-1/top-5 accuracy (percent) per k: `{"10": {"top1": .., "top5": ..}, "20": ..., ...}`.

    Scores are reduced to hits chunk by chunk, so memory does not grow with test size x classes.
    """
    if len(test_labels) != len(test_features):
        raise ValueError(f"{len(test_features)} test features but {len(test_labels)} labels")
    if len(test_labels) == 0:
        raise EvaluationError("cannot compute accuracy on an empty test set")
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item()) + 1)
    hits = {k: {1: 0, 5: 0} for k in ks}
    for start, chunk in _knn_chunks(
        train_features, train_labels, test_features, num_classes=num_classes, ks=ks, temperature=temperature,
        device=device, chunk_size=chunk_size,
    ):
        for k, scores in chunk.items():
            for top, h in topk_hits(scores, test_labels[start : start + len(scores)]).items():
                hits[k][top] += h
    n = len(test_labels)
    return {str(k): {"top1": 100.0 * h[1] / n, "top5": 100.0 * h[5] / n} for k, h in hits.items()}


# --------------------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------------------


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

    def predict(self, features: Tensor) -> Tensor:
        """Top-1 class (ties to the lower class index)."""
        return rank_classes(self(features), 1)[:, 0]

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
    device = torch.device(device) if device is not None else _default_device()
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


# --------------------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Frozen features of one labelled split: final-normed CLS, mean of patch tokens (no registers), labels."""

    cls: Tensor  # [N, D] float32, not normalised
    patch_mean: Tensor  # [N, D] float32
    labels: Tensor  # [N] int64

    def __len__(self) -> int:
        return len(self.labels)

    def features(self, kind: str) -> Tensor:
        """`"cls"` → CLS; `"cls_avgpool"` → concat(CLS, mean patch), the `Dinov2ForImageClassification` input."""
        if kind == "cls":
            return self.cls
        if kind == "cls_avgpool":
            return torch.cat([self.cls, self.patch_mean], dim=1)
        raise ValueError(f"unknown feature kind {kind!r}; use one of {list(FEATURE_KINDS)}")


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def num_prefix_tokens(model: torch.nn.Module) -> int:
    """Tokens before the patches in `last_hidden_state`: CLS + register tokens."""
    config = getattr(_unwrap(model), "config", None)
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def _patch_size(model: torch.nn.Module) -> int | None:
    config = getattr(_unwrap(model), "config", None)
    p = getattr(config, "patch_size", None)
    if isinstance(p, (tuple, list)):
        p = p[0]
    return int(p) if p else None


def _model_name(model: torch.nn.Module) -> str:
    config = getattr(_unwrap(model), "config", None)
    return getattr(config, "_name_or_path", "") or type(_unwrap(model)).__name__


def check_image_size(model: torch.nn.Module, height: int, width: int) -> None:
    """Raise `EvaluationError` unless height and width are multiples of the model's patch size."""
    p = _patch_size(model)
    if p and (height % p or width % p):
        fix = max(p, round(height / p) * p)
        raise EvaluationError(
            f"image size {height}x{width} is not a multiple of the patch size {p} of {_model_name(model)}: "
            f"pass an image size that is (e.g. --image_size {fix}) or fix the image processor's crop size"
        )


def forward_features(model: torch.nn.Module, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    """(CLS, mean of patch tokens) from `model(pixel_values=...).last_hidden_state`, both float32 `[B, D]`.

    Checks the token layout `[CLS, registers..., patches...]` and raises `EvaluationError` for models without a
    CLS token (e.g. ConvNets, Swin) or with image sizes the model cannot take.
    """
    name = _model_name(model)
    h, w = pixel_values.shape[-2:]
    check_image_size(model, h, w)
    try:
        out = model(pixel_values=pixel_values)
    except torch.cuda.OutOfMemoryError:
        raise
    except (ValueError, RuntimeError) as e:
        config = getattr(_unwrap(model), "config", None)
        expected = getattr(config, "image_size", None)
        hint = f" Pass --image_size {expected} (the size in the model's config)." if expected and expected != h else ""
        raise EvaluationError(f"{name} failed on a batch of {h}x{w} images: {e}.{hint}") from e
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)):
        hidden = out[0]
    if not isinstance(hidden, Tensor) or hidden.ndim != 3:
        shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else None
        raise EvaluationError(
            f"{name} has no CLS token: its last_hidden_state has shape {shape}, expected ViT-style tokens "
            "[batch, 1 + registers + patches, dim]. k-NN and linear probes need a ViT backbone with a CLS token "
            "(e.g. DINOv2, with or without registers)"
        )
    prefix = num_prefix_tokens(model)
    p = _patch_size(model)
    if p is None:
        raise EvaluationError(
            f"{name}: cannot tell where the CLS token is (its config has no patch_size). The probe supports ViT-style "
            "backbones whose last_hidden_state is [CLS, registers..., patches...]"
        )
    n_patches = (h // p) * (w // p)
    if hidden.shape[1] != prefix + n_patches:
        raise EvaluationError(
            f"{name} has no CLS token in the expected place: last_hidden_state has {hidden.shape[1]} tokens for "
            f"{n_patches} patches of {h}x{w} images and {prefix - 1} register tokens (expected {prefix + n_patches} = "
            "1 CLS + registers + patches)"
        )
    hidden = hidden.float()
    return hidden[:, 0], hidden[:, prefix:].mean(dim=1)


def _label_info(dataset: Any, label_column: str, where: str) -> tuple[list[str] | None, str]:
    """(class names or None, kind) for a label column; kind is 'int' or 'str'."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    columns = list(getattr(dataset, "column_names", None) or features)
    if label_column not in columns:
        raise EvaluationError(
            f"{where} has no label column {label_column!r} (columns: {columns}); pass --label_column with the column "
            "that holds the class labels"
        )
    feat = features.get(label_column)
    if isinstance(feat, datasets.ClassLabel):
        return list(feat.names), "int"
    dtype = getattr(feat, "dtype", None)
    if dtype is not None and ("int" in dtype):
        return None, "int"
    if dtype in ("string", "large_string"):
        return None, "str"
    raise EvaluationError(
        f"{where}: label column {label_column!r} has type {feat}; expected a ClassLabel, integer or string column"
    )


def _check_image_column(dataset: Any, image_column: str, where: str) -> Any:
    import datasets

    columns = list(getattr(dataset, "column_names", None) or [])
    if image_column not in columns:
        raise EvaluationError(
            f"{where} has no image column {image_column!r} (columns: {columns}); pass --image_column"
        )
    feat = dataset.features[image_column]
    if isinstance(feat, datasets.Image):
        return dataset
    if getattr(feat, "dtype", None) in ("string", "large_string"):  # file paths
        return dataset.cast_column(image_column, datasets.Image())
    raise EvaluationError(
        f"{where}: image column {image_column!r} has type {feat}; expected an Image column (or file paths)"
    )


class SplitPreprocessing:
    """An image processor split in two: geometry in the DataLoader workers, rescale + normalise on the device.

    Workers call the processor with `do_rescale=False, do_normalize=False` (decode, RGB, resize, center crop →
    uint8 tensors: 4x less to pickle and copy), and `normalize(batch)` then applies the processor's own
    `rescale_factor` / `image_mean` / `image_std` on the device. `SplitPreprocessing.build(processor)` checks on
    a few random images that the two halves reproduce the processor's output (max |Δ| ≤ 1e-4) and returns None
    otherwise, in which case the workers run the whole processor.
    """

    def __init__(self, processor: Any):
        self.processor = processor
        rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else 1.0
        if getattr(processor, "do_normalize", False):
            mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        else:
            mean, std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
        # (x * rescale - mean) / std as one fused x * scale + shift
        self.scale, self.shift = rescale / std, -mean / std

    def geometry(self, images: list[Any]) -> Tensor:
        return self.processor(images=images, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]

    def normalize(self, pixel_values: Tensor) -> Tensor:
        x = pixel_values.float()
        return torch.addcmul(self.shift.to(x.device), x, self.scale.to(x.device))

    @classmethod
    def build(cls, processor: Any) -> SplitPreprocessing | None:
        needed = ("do_rescale", "do_normalize", "rescale_factor", "image_mean", "image_std")
        if not all(hasattr(processor, a) for a in needed):
            return None
        try:
            split = cls(processor)
            from PIL import Image

            g = torch.Generator().manual_seed(0)
            images = [
                Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
                for h, w in ((37, 53), (61, 40))
            ]
            full = processor(images=images, return_tensors="pt")["pixel_values"]
            raw = split.geometry(images)
            if raw.shape != full.shape or not torch.allclose(split.normalize(raw), full.float(), atol=1e-4, rtol=0):
                return None
            return split
        except Exception:  # any processor that does not take the overrides: run it whole in the workers
            return None


class _ImageBatches(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: a list of row indices → (pixel_values, labels, indices).

    Decoding and preprocessing happen here, i.e. in the DataLoader workers (with `split`, only the geometric
    part: the tensors are uint8 and normalised on the device).
    """

    def __init__(
        self, dataset: Any, image_column: str, label_column: str, processor: Callable[..., Any],
        label_to_index: dict[Any, int] | None, split: SplitPreprocessing | None = None,
    ):
        import datasets

        # Decode ourselves (not inside `datasets`), so that an unreadable file is reported by name.
        self.dataset = dataset.select_columns([image_column, label_column]).cast_column(
            image_column, datasets.Image(decode=False)
        )
        self.decoder = datasets.Image()
        self.image_column, self.label_column = image_column, label_column
        self.processor = processor
        self.label_to_index = label_to_index
        self.split = split

    def __len__(self) -> int:
        return len(self.dataset)

    def _decode(self, value: Any, row: int) -> Any:
        try:
            image = self.decoder.decode_example(value)
            image.load()
        except Exception as e:
            where = value.get("path") if isinstance(value, dict) and value.get("path") else f"row {row}"
            raise EvaluationError(
                f"cannot decode the image of {where} (row {row}): {type(e).__name__}: {e}. Fix or remove it; the "
                "probe evaluates every row and does not skip images"
            ) from e
        return image if image.mode == "RGB" else image.convert("RGB")

    def __getitem__(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        rows = self.dataset[indices]
        images = [self._decode(v, i) for v, i in zip(rows[self.image_column], indices)]
        labels = rows[self.label_column]
        if self.label_to_index is not None:
            labels = [self.label_to_index.get(lab, -1) for lab in labels]
        try:
            if self.split is not None:
                pixel_values = self.split.geometry(images)
            else:
                pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        except (RuntimeError, ValueError) as e:
            sizes = sorted({im.size for im in images})
            raise EvaluationError(
                f"the image processor failed on rows {indices[0]}..{indices[-1]} (image sizes {sizes[:5]}): {e}. "
                "If it keeps the aspect ratio without a center crop, pass --image_size to get square crops"
            ) from e
        return pixel_values, torch.as_tensor(labels, dtype=torch.long), torch.as_tensor(indices, dtype=torch.long)


def _autocast(device: torch.device, dtype: str):
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return torch.autocast(device_type=device.type, dtype=torch_dtype)


def _resolved_dtype(device: torch.device, dtype: str) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if dtype == "auto" else dtype


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    dataset: Any,
    *,
    image_processor: Callable[..., Any],
    image_column: str = "image",
    label_column: str = "label",
    label_to_index: dict[Any, int] | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    dtype: str = "auto",
    accelerator: Any = None,
    progress: bool = True,
    desc: str = "features",
    cache: FeatureCache | None = None,
    cache_key: str | None = None,
    split_preprocessing: bool | None = None,
) -> FeatureSet:
    """Frozen CLS / mean-patch features and labels of a map-style `datasets.Dataset`.

    Batched, `torch.no_grad`, bf16 autocast on CUDA (`dtype="auto"`), fp32 on CPU. Decode + preprocessing run in
    `num_workers` DataLoader worker processes (default `min(8, cpu count)`), overlapping the forward passes; with
    `split_preprocessing` (default: on CUDA) the workers stop at uint8 crops and rescale/normalise runs on the
    device (`SplitPreprocessing`, verified against the processor; otherwise, and always by default on CPU, where
    the normalisation would not overlap the forward passes, the whole processor runs in the workers).
    With `accelerator` the dataset is split over processes and the features are gathered to every process.
    With `cache` + `cache_key` a stored result is returned without running the model, and a new one is stored.
    Labels are integers (`label_to_index` maps string labels; unknown ones raise).
    """
    if cache is not None and cache_key is not None:
        hit = cache.load(cache_key)
        if hit is not None:
            logger.info("%s: loaded cached features (%d rows) from %s", desc, len(hit), cache.path(cache_key))
            return hit
    if accelerator is not None:
        device = accelerator.device
        rank, world = accelerator.process_index, accelerator.num_processes
    else:
        rank, world = 0, 1
    if device is None:  # where the model is (an in-memory model stays put), else CUDA if available
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None and param.device.type != "meta" else _default_device()
    device = torch.device(device)
    n = len(dataset)
    if n == 0:
        raise EvaluationError(f"{desc}: the dataset is empty")
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)

    # Contiguous shard per process, padded (repeating its last row) so every process runs the same number of
    # forward passes: FSDP forwards are collectives.
    per_rank = math.ceil(n / world)
    own = list(range(rank * per_rank, min((rank + 1) * per_rank, n)))
    own += [own[-1] if own else n - 1] * (per_rank - len(own))
    batches = [own[i : i + batch_size] for i in range(0, per_rank, batch_size)]

    if split_preprocessing is None:  # on a GPU the normalisation is free and uint8 batches are 4x smaller;
        split_preprocessing = device.type == "cuda"  # on CPU it would run serially with the forward passes
    split = SplitPreprocessing.build(image_processor) if split_preprocessing else None
    source = _ImageBatches(dataset, image_column, label_column, image_processor, label_to_index, split)
    loader = torch.utils.data.DataLoader(
        source, sampler=batches, batch_size=None, num_workers=num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers > 0 else None,
    )
    base = _unwrap(model)
    was_training = base.training
    model.eval()
    cls_parts, patch_parts, label_parts, index_parts = [], [], [], []
    show = progress and rank == 0
    from tqdm.auto import tqdm

    # A manual bar: tqdm 4.70 wrapping the loader calls iter() twice, which starts a second set of workers.
    bar = tqdm(total=len(batches), desc=desc, disable=not show, unit="batch")
    try:
        with _autocast(device, dtype):
            for pixel_values, labels, indices in loader:
                pixel_values = pixel_values.to(device, non_blocking=True)
                if split is not None:
                    pixel_values = split.normalize(pixel_values)
                cls, patch_mean = forward_features(model, pixel_values)
                cls_parts.append(cls)
                patch_parts.append(patch_mean)
                label_parts.append(labels.to(device))
                index_parts.append(indices.to(device))
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    cls, patch_mean = torch.cat(cls_parts), torch.cat(patch_parts)
    labels, indices = torch.cat(label_parts), torch.cat(index_parts)
    if world > 1:
        cls, patch_mean = accelerator.gather(cls), accelerator.gather(patch_mean)
        labels, indices = accelerator.gather(labels), accelerator.gather(indices)
    cls, patch_mean, labels, indices = cls.cpu(), patch_mean.cpu(), labels.cpu(), indices.cpu()
    out = FeatureSet(
        cls=torch.empty(n, cls.shape[1]), patch_mean=torch.empty(n, patch_mean.shape[1]),
        labels=torch.empty(n, dtype=torch.long),
    )
    out.cls[indices], out.patch_mean[indices], out.labels[indices] = cls, patch_mean, labels
    if (out.labels < 0).any():
        bad = int((out.labels < 0).sum())
        raise EvaluationError(
            f"{desc}: {bad} of {n} rows have no valid label in column {label_column!r} (label -1 or a class that "
            "the train split does not have); evaluate on a labelled split"
        )
    if cache is not None and cache_key is not None and rank == 0:
        cache.save(cache_key, out, {"desc": desc})
    return out


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module) -> str:
    """Content hash of a model: class, config (minus paths/versions) and every parameter and buffer byte.

    Any change of weights or architecture gives a new fingerprint, whatever the folder or Hub id it came from.
    """
    h = hashlib.blake2b(digest_size=20)
    base = _unwrap(model)
    h.update(type(base).__qualname__.encode())
    config = getattr(base, "config", None)
    if config is not None:
        cfg = {
            k: v for k, v in config.to_dict().items()
            if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype", "architectures")
        }
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(base.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """Identity of a `datasets.Dataset` (its `_fingerprint`, which tracks its files and transforms) and length."""
    fp = getattr(dataset, "_fingerprint", None)
    if fp is None:
        raise EvaluationError("only map-style `datasets.Dataset` objects can be cached (no fingerprint)")
    return f"{fp}:{len(dataset)}"


def feature_cache_key(
    model: torch.nn.Module | str,
    dataset: Any,
    *,
    image_processor: Any,
    image_column: str,
    label_column: str,
    dtype: str,
    extra: dict[str, Any] | None = None,
) -> str:
    """Cache key = hash(model content, dataset fingerprint + columns, preprocessing config, compute dtype).

    `model` may be a model (content-hashed with `model_fingerprint`) or a precomputed fingerprint string.
    """
    processor_cfg = image_processor.to_dict() if hasattr(image_processor, "to_dict") else repr(image_processor)
    payload = {
        "version": FEATURE_CACHE_VERSION,
        "model": model if isinstance(model, str) else model_fingerprint(model),
        "dataset": dataset_fingerprint(dataset),
        "columns": [image_column, label_column],
        "processor": processor_cfg,
        "dtype": dtype,
        "extra": extra or {},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """Features stored as `<dir>/features-<key>.safetensors` (tensors `cls`, `patch_mean`, `labels`).

    Written to a temporary file and renamed, so an interrupted run never leaves a truncated entry. A stale
    entry is never reused: the key changes with the model's weights, the dataset and the preprocessing.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"features-{key[:40]}.safetensors"

    def load(self, key: str) -> FeatureSet | None:
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
                return FeatureSet(cls=f.get_tensor("cls"), patch_mean=f.get_tensor("patch_mean"),
                                  labels=f.get_tensor("labels"))
        except Exception as e:  # a damaged cache entry is recomputed, not fatal
            logger.warning("ignoring unreadable feature cache %s: %s", path, e)
            return None

    def save(self, key: str, features: FeatureSet, metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        meta = {"key": key, "num_rows": str(len(features)), **{k: str(v) for k, v in (metadata or {}).items()}}
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"cls": features.cls.contiguous(), "patch_mean": features.patch_mean.contiguous(),
                       "labels": features.labels.contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def default_cache_dir() -> Path:
    """`$DINOFORGE_CACHE/probe_features`, else `$XDG_CACHE_HOME/dinoforge/probe_features` (~/.cache by default)."""
    root = os.environ.get("DINOFORGE_CACHE")
    if root:
        return Path(root) / "probe_features"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinoforge" / "probe_features"


# --------------------------------------------------------------------------------------------------------------
# Loading models, processors and datasets
# --------------------------------------------------------------------------------------------------------------


def load_backbone(model: str | os.PathLike | torch.nn.Module, *, device: torch.device | str | None = None) -> Any:
    """A backbone in eval mode: a folder/Hub id loaded with `AutoModel.from_pretrained`, or a model as is.

    dinoforge's own classes are registered first (import `modeling`), so `pretraining/` and `backbone/` folders
    load too; for a `DinoForPretraining` the teacher backbone is used.
    """
    if isinstance(model, torch.nn.Module):
        backbone = model
    else:
        try:
            import modeling  # noqa: F401  (registers DinoVisionModel / DinoForPretraining with AutoModel)
        except ImportError:
            pass
        from transformers import AutoModel

        try:
            backbone = AutoModel.from_pretrained(str(model))
        except (OSError, ValueError, KeyError) as e:
            raise EvaluationError(
                f"could not load model {str(model)!r} with AutoModel.from_pretrained: {e}. Pass a model folder "
                "(e.g. outputs/<run>/backbone) or a Hub id (needs network or a cached copy)"
            ) from e
    if hasattr(backbone, "teacher_backbone"):
        logger.info("%s is a pretraining model: evaluating its teacher backbone", type(backbone).__name__)
        backbone = backbone.teacher_backbone
    backbone.eval()
    if device is not None:
        backbone.to(device)
    return backbone


def default_image_processor(image_size: int = 224) -> Any:
    """DINOv2 evaluation preprocessing: resize shortest edge to 256/224·size (bicubic), center crop, ImageNet norm."""
    from transformers import BitImageProcessor

    return BitImageProcessor(
        do_resize=True, size={"shortest_edge": int(round(image_size * 256 / 224))}, resample=3,
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
    )


def _with_image_size(processor: Any, image_size: int) -> Any:
    """Copy of `processor` producing `image_size` square crops (resize keeps the processor's resize/crop ratio)."""
    d = processor.to_dict()
    size = dict(d.get("size") or {})
    crop = dict(d.get("crop_size") or {})
    if d.get("do_center_crop") and crop.get("height"):
        ratio = (size.get("shortest_edge") or crop["height"]) / crop["height"]
        if "shortest_edge" in size and size["shortest_edge"]:
            d["size"] = {"shortest_edge": int(round(image_size * ratio))}
        else:
            d["size"] = {"height": image_size, "width": image_size}
        d["crop_size"] = {"height": image_size, "width": image_size}
    else:
        d["size"] = {"height": image_size, "width": image_size}
    try:
        return type(processor).from_dict(d)
    except Exception:
        out = copy.deepcopy(processor)
        out.size, out.crop_size = d["size"], d.get("crop_size")
        return out


def load_image_processor(model: str | os.PathLike | None, image_size: int | None = None) -> Any:
    """The model folder's image processor (AutoImageProcessor) if it has one, else `default_image_processor`.

    `image_size` overrides the crop size (for small models); it must be a multiple of the patch size.
    """
    processor = None
    if model is not None and not isinstance(model, torch.nn.Module):
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(str(model))
        except (OSError, ValueError, KeyError, TypeError):
            processor = None
    if processor is None:
        return default_image_processor(image_size or 224)
    return _with_image_size(processor, image_size) if image_size else processor


def processor_output_size(processor: Any) -> tuple[int, int] | None:
    """(height, width) a processor produces when it crops or resizes to a fixed size, else None."""
    d = processor.to_dict() if hasattr(processor, "to_dict") else {}
    crop, size = d.get("crop_size") or {}, d.get("size") or {}
    if d.get("do_center_crop") and crop.get("height") and crop.get("width"):
        return int(crop["height"]), int(crop["width"])
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    return None


def load_split(dataset: str | os.PathLike | Any, split: str, *, image_column: str = "image") -> Any:
    """One split as a map-style `datasets.Dataset`.

    Strings go through `training.data.load_image_dataset` (Hub id, image folder, `save_to_disk`, parquet,
    webdataset, `"sample"`); if that module is not available, a minimal loader handles Hub ids, image folders and
    `save_to_disk` directories. A `datasets.Dataset` / `DatasetDict` is used as is.
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise EvaluationError(f"split {split!r} not found; available splits: {list(dataset)}")
        return dataset[split]
    if isinstance(dataset, datasets.Dataset):
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        raise EvaluationError("streaming datasets cannot be probed: features need a finite, indexable split")
    name = str(dataset)
    try:
        from training.data import load_image_dataset
    except ImportError:
        load_image_dataset = None
    try:
        if load_image_dataset is not None:
            ds = load_image_dataset(name, split=split, image_column=image_column, streaming=False)
        else:
            ds = _fallback_load(name, split)
    except EvaluationError:
        raise
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise EvaluationError(f"could not load split {split!r} of dataset {name!r}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise EvaluationError(f"dataset {name!r} has no split {split!r}; available splits: {list(ds)}")
        ds = ds[split]
    if not isinstance(ds, datasets.Dataset):
        raise EvaluationError(f"dataset {name!r} split {split!r} loaded as {type(ds).__name__}; need a map-style Dataset")
    return ds


def _fallback_load(name: str, split: str) -> Any:
    import datasets

    path = Path(name)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            dd = datasets.load_from_disk(str(path))
            if split not in dd:
                raise EvaluationError(f"{name!r} has no split {split!r}; available splits: {list(dd)}")
            return dd[split]
        if (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    return datasets.load_dataset(name, split=split)


def resolve_labels(
    train: Any, others: dict[str, Any], label_column: str
) -> tuple[list[str], dict[Any, int] | None]:
    """(class names, label→index map for string labels or None) checked across splits.

    ClassLabel columns must have the same names in every split; string labels are indexed in sorted order of the
    train split's values; plain integer labels are named by their value.
    """
    names, kind = _label_info(train, label_column, "the train split")
    for where, ds in others.items():
        other_names, other_kind = _label_info(ds, label_column, f"the {where} split")
        if other_kind != kind or (names is not None and other_names is not None and other_names != names):
            raise EvaluationError(
                f"the {where} split's label column {label_column!r} does not match the train split's "
                f"({other_names or other_kind} vs {names or kind})"
            )
    if kind == "str":
        values = sorted(set(train[label_column]))
        return [str(v) for v in values], {v: i for i, v in enumerate(values)}
    if names is None:
        top = max(train[label_column]) if len(train) else -1
        names = [str(i) for i in range(int(top) + 1)]
    return names, None


def _check_label_range(features: FeatureSet, num_classes: int, role: str) -> None:
    top = int(features.labels.max()) if len(features) else -1
    if top >= num_classes:
        raise EvaluationError(
            f"the {role} split has label {top}, but the train split defines only {num_classes} classes (0..{num_classes - 1})"
        )


# --------------------------------------------------------------------------------------------------------------
# In-training k-NN
# --------------------------------------------------------------------------------------------------------------


def flatten_knn(knn: dict[str, dict[str, float]], prefix: str = "knn") -> dict[str, float]:
    """`{"20": {"top1": x}}` → `{"knn/k20/top1": x, ..., "knn/top1": <headline k=20>}` for trackers."""
    flat = {f"{prefix}/k{k}/{m}": v for k, d in knn.items() for m, v in d.items()}
    head = knn.get(str(HEADLINE_K))
    if head is not None:
        flat.update({f"{prefix}/{m}": v for m, v in head.items()})
    return flat


def knn_eval(
    model: torch.nn.Module,
    train_dataset: Any,
    test_dataset: Any,
    *,
    image_processor: Any = None,
    image_size: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    batch_size: int = 64,
    num_workers: int | None = None,
    accelerator: Any = None,
    dtype: str = "auto",
    progress: bool = False,
    prefix: str = "knn",
) -> dict[str, float]:
    """k-NN accuracy of an in-memory backbone (no disk round trip), flat for `accelerator.log` / metrics.jsonl.

    Returns `{"knn/top1", "knn/top5"}` (k = 20) plus `"knn/k{k}/top1|top5"` for every k, in percent. With
    `accelerator`, features are extracted data-parallel and gathered to every process; every process computes
    the same k-NN result (call it on all processes). The model's train/eval mode is restored afterwards.
    `image_processor` defaults to `default_image_processor(image_size or the model's image_size)`;
    `num_workers` (default `min(8, cpu count)`) DataLoader workers decode, started afresh at each call.
    """
    if image_processor is None:
        size = image_size or getattr(getattr(_unwrap(model), "config", None), "image_size", None) or 224
        image_processor = default_image_processor(int(size))
    train_ds = _check_image_column(train_dataset, image_column, "the k-NN train set")
    test_ds = _check_image_column(test_dataset, image_column, "the k-NN test set")
    class_names, label_to_index = resolve_labels(train_ds, {"test": test_ds}, label_column)
    common = dict(
        image_processor=image_processor, image_column=image_column, label_column=label_column,
        label_to_index=label_to_index, batch_size=batch_size, num_workers=num_workers, accelerator=accelerator,
        dtype=dtype, progress=progress,
    )
    train = extract_features(model, train_ds, desc="knn train", **common)
    test = extract_features(model, test_ds, desc="knn test", **common)
    _check_label_range(train, len(class_names), "train")
    _check_label_range(test, len(class_names), "test")
    param = next(iter(model.parameters()), None)
    device = accelerator.device if accelerator is not None else (param.device if param is not None else None)
    knn = knn_classify(
        train.cls, train.labels, test.cls, test.labels, num_classes=len(class_names), ks=ks,
        temperature=temperature, device=device,
    )
    return flatten_knn(knn, prefix)


class KnnEvaluator:
    """Periodic k-NN for the training loop; free when off.

        evaluator = KnnEvaluator.from_dataset(cfg.data.eval_dataset, every=cfg.train.eval_every)  # None if off
        ...
        if evaluator is not None and evaluator.due(step):
            accelerator.log(evaluator(teacher_backbone), step=step)   # on every process

    The datasets are loaded once; each call extracts features with the current weights (nothing cached).
    """

    def __init__(self, train_dataset: Any, test_dataset: Any, *, every: int, **knn_kwargs: Any):
        if every <= 0:
            raise ValueError("every must be positive; use no evaluator (None) to turn periodic k-NN off")
        self.train_dataset, self.test_dataset = train_dataset, test_dataset
        self.every = every
        self.knn_kwargs = knn_kwargs

    @classmethod
    def from_dataset(
        cls, dataset: str | None, *, every: int, train_split: str = "train", test_split: str = "test",
        image_column: str = "image", **knn_kwargs: Any,
    ) -> KnnEvaluator | None:
        """Load the eval dataset's splits once; returns None when `dataset` is empty or `every` <= 0 (off)."""
        if not dataset or every <= 0:
            return None
        train = load_split(dataset, train_split, image_column=image_column)
        test = load_split(dataset, test_split, image_column=image_column)
        return cls(train, test, every=every, image_column=image_column, **knn_kwargs)

    def due(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def __call__(self, model: torch.nn.Module, **overrides: Any) -> dict[str, float]:
        return knn_eval(model, self.train_dataset, self.test_dataset, **{**self.knn_kwargs, **overrides})


# --------------------------------------------------------------------------------------------------------------
# The probe (probe.py)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ProbeOutput:
    """What `run_probe` computed: the results.json dict, the linear heads, class names and the features."""

    results: dict[str, Any]
    heads: dict[str, LinearHead]
    class_names: list[str]
    features: dict[str, FeatureSet]
    details: dict[str, Any]


def run_probe(
    model: str | os.PathLike | torch.nn.Module,
    dataset: str | os.PathLike | Any,
    output_dir: str | os.PathLike | None = None,
    *,
    train_split: str = "train",
    test_split: str = "test",
    val_split: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    image_size: int | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    device: torch.device | str | None = None,
    dtype: str = "auto",
    ks: Sequence[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    linear: LinearProbeConfig | None = None,
    export_classifier: bool = False,
    progress: bool = True,
) -> ProbeOutput:
    """k-NN + linear probes of `model` on `dataset`; writes `output_dir/results.json` (+ `details.json`).

    results.json: `{"model", "dataset", "num_train", "num_test", "knn": {"10": {"top1", "top5"}, ...},
    "linear": {"cls": {"top1", "top5"}, "cls_avgpool": {...}}}`, accuracies in percent. details.json records
    splits, class names, the chosen linear-probe settings and the grid. With `export_classifier` the
    CLS || mean-patch head is saved as a stock `Dinov2ForImageClassification` in `output_dir/classifier`.
    """
    device = torch.device(device) if device is not None else _default_device()
    backbone = load_backbone(model, device=device)
    processor = load_image_processor(
        model if not isinstance(model, torch.nn.Module) else None, image_size=image_size
    )
    if isinstance(model, torch.nn.Module) and image_size is None:
        processor = default_image_processor(int(getattr(backbone.config, "image_size", 224) or 224))
    out_size = processor_output_size(processor)
    if out_size is not None:
        check_image_size(backbone, *out_size)

    train_ds = _check_image_column(load_split(dataset, train_split, image_column=image_column),
                                   image_column, f"the {train_split!r} split")
    test_ds = _check_image_column(load_split(dataset, test_split, image_column=image_column),
                                  image_column, f"the {test_split!r} split")
    val_ds = None
    others = {test_split: test_ds}
    if val_split:
        val_ds = _check_image_column(load_split(dataset, val_split, image_column=image_column),
                                     image_column, f"the {val_split!r} split")
        others[val_split] = val_ds
    class_names, label_to_index = resolve_labels(train_ds, others, label_column)

    resolved_dtype = _resolved_dtype(device, dtype)
    cache = FeatureCache(cache_dir or default_cache_dir()) if use_cache else None
    fingerprint = model_fingerprint(backbone) if cache is not None else None
    feats: dict[str, FeatureSet] = {}
    for role, ds in (("train", train_ds), ("test", test_ds), ("val", val_ds)):
        if ds is None:
            continue
        key = None
        if cache is not None:
            key = feature_cache_key(
                fingerprint, ds, image_processor=processor, image_column=image_column, label_column=label_column,
                dtype=resolved_dtype, extra={"labels": label_to_index and sorted(map(str, label_to_index))},
            )
        feats[role] = extract_features(
            backbone, ds, image_processor=processor, image_column=image_column, label_column=label_column,
            label_to_index=label_to_index, batch_size=batch_size, num_workers=num_workers, device=device,
            dtype=resolved_dtype, progress=progress, desc=f"features {role}", cache=cache, cache_key=key,
        )
    train, test, val = feats["train"], feats["test"], feats.get("val")
    num_classes = len(class_names)
    for role, fs in feats.items():
        _check_label_range(fs, num_classes, role)

    knn = knn_classify(
        train.cls, train.labels, test.cls, test.labels, num_classes=num_classes, ks=ks,
        temperature=temperature, device=device,
    )
    linear_results, heads = {}, {}
    for kind in FEATURE_KINDS:
        head = train_linear_probe(
            train.features(kind), train.labels, num_classes=num_classes,
            val_features=val.features(kind) if val is not None else None,
            val_labels=val.labels if val is not None else None, config=linear, feature=kind, device=device,
        )
        heads[kind] = head
        linear_results[kind] = topk_accuracy(head(test.features(kind)), test.labels)

    model_name = str(model) if not isinstance(model, torch.nn.Module) else _model_name(model)
    dataset_name = str(dataset) if isinstance(dataset, (str, os.PathLike)) else getattr(
        getattr(dataset, "info", None), "dataset_name", None) or type(dataset).__name__
    results = {
        "model": model_name,
        "dataset": dataset_name,
        "num_train": len(train),
        "num_test": len(test),
        "knn": knn,
        "linear": linear_results,
    }
    details = {
        "train_split": train_split, "test_split": test_split, "val_split": val_split,
        "num_val": len(val) if val is not None else None,
        "num_classes": num_classes, "class_names": class_names,
        "feature_dim": int(train.cls.shape[1]), "num_prefix_tokens": num_prefix_tokens(backbone),
        "image_processor": processor.to_dict() if hasattr(processor, "to_dict") else None,
        "dtype": resolved_dtype, "device": str(device),
        "knn": {"ks": list(ks), "temperature": temperature, "headline_k": HEADLINE_K,
                "features": "L2-normalised CLS, cosine, softmax(sim/T) weighted vote"},
        "linear": {"config": asdict(linear or LinearProbeConfig()),
                   "selected": {k: h.summary() for k, h in heads.items()}},
        "metrics": "top-k accuracy in percent computed with torch; class-score ties go to the lower class index",
    }
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "details.json").write_text(json.dumps(details, indent=2, default=str) + "\n")
        if export_classifier:
            path = export_classifier_model(backbone, heads["cls_avgpool"], out / "classifier",
                                           class_names=class_names, image_processor=processor)
            details["classifier"] = str(path)
            (out / "details.json").write_text(json.dumps(details, indent=2, default=str) + "\n")
    return ProbeOutput(results=results, heads=heads, class_names=class_names, features=feats, details=details)


def format_results_table(results: dict[str, Any]) -> str:
    """Plain-text table of a results.json dict."""
    lines = [
        f"model:   {results['model']}",
        f"dataset: {results['dataset']}  (train {results['num_train']}, test {results['num_test']})",
        "",
        f"{'method':<28}{'top-1':>8}{'top-5':>8}",
        "-" * 44,
    ]
    for k, m in results["knn"].items():
        mark = "  <- headline" if k == str(HEADLINE_K) else ""
        lines.append(f"{'k-NN k=' + k:<28}{m['top1']:>8.2f}{m['top5']:>8.2f}{mark}")
    names = {"cls": "linear CLS", "cls_avgpool": "linear CLS+mean-patch"}
    for kind, m in results["linear"].items():
        lines.append(f"{names.get(kind, 'linear ' + kind):<28}{m['top1']:>8.2f}{m['top5']:>8.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Model card and classifier export
# --------------------------------------------------------------------------------------------------------------


def eval_results_from_results(
    results: dict[str, Any], *, dataset_split: str = "test", dataset_config: str | None = None,
    knn_ks: Sequence[int] = (HEADLINE_K,),
) -> list[Any]:
    """`huggingface_hub.EvalResult`s for a results.json dict (k-NN at `knn_ks`, both linear probes, top-1/top-5)."""
    from huggingface_hub import EvalResult

    dataset = str(results["dataset"])
    name = Path(dataset).name or dataset
    local = dataset.startswith(("/", ".", "~")) or Path(dataset).expanduser().exists()
    common = dict(
        task_type="image-classification", task_name="Image Classification",
        dataset_type=name if local else dataset,  # a Hub id links the dataset page; a local path would not
        dataset_name=name, dataset_split=dataset_split, dataset_config=dataset_config, metric_type="accuracy",
    )
    out = []
    for k in knn_ks:
        for m in ("top1", "top5"):
            value = results["knn"][str(k)][m]
            out.append(EvalResult(**common, metric_value=round(float(value), 2),
                                  metric_name=f"k-NN {m[:3]}-{m[3:]} (k={k}, frozen)", metric_config=f"knn-k{k}-{m}"))
    names = {"cls": "linear {m} (CLS, frozen)", "cls_avgpool": "linear {m} (CLS+mean-patch, frozen)"}
    for kind, metrics in results["linear"].items():
        for m in ("top1", "top5"):
            label = names.get(kind, f"linear {{m}} ({kind}, frozen)").format(m=f"{m[:3]}-{m[3:]}")
            out.append(EvalResult(**common, metric_value=round(float(metrics[m]), 2), metric_name=label,
                                  metric_config=f"linear-{kind}-{m}"))
    return out


def model_index_from_results(
    results: dict[str, Any] | str | os.PathLike, model_name: str | None = None, *, dataset_split: str = "test",
    dataset_config: str | None = None, knn_ks: Sequence[int] = (HEADLINE_K,),
) -> list[dict[str, Any]]:
    """The `model-index` value (Hub metadata schema) for a results.json dict or path.

    Put it in the card's YAML header as `model-index: <this>` (or pass `eval_results_from_results(...)` to
    `huggingface_hub.ModelCardData(eval_results=..., model_name=...)`). Task `image-classification`, dataset
    `type` = the probed dataset, metrics of type `accuracy` in percent, named e.g. "k-NN top-1 (k=20, frozen)".
    """
    from huggingface_hub.repocard_data import eval_results_to_model_index

    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text())
    name = model_name or Path(str(results["model"])).name or str(results["model"])
    evals = eval_results_from_results(results, dataset_split=dataset_split, dataset_config=dataset_config,
                                      knn_ks=knn_ks)
    return eval_results_to_model_index(name, evals)


model_index = model_index_from_results  # short alias: `{"model-index": model_index(results, name)}`


def update_model_card(model_dir: str | os.PathLike, results: dict[str, Any], model_name: str | None = None) -> Path:
    """Write the probe results into the `model-index` of `model_dir/README.md` (created if missing), keeping the
    rest of the card; the Hub renders them as evaluation results."""
    from huggingface_hub import ModelCard

    path = Path(model_dir) / "README.md"
    card = ModelCard(path.read_text()) if path.is_file() else ModelCard("---\n---\n")
    card.data["model-index"] = model_index_from_results(results, model_name or Path(model_dir).name)
    path.write_text(str(card))
    return path


def export_classifier_model(
    backbone: torch.nn.Module,
    head: LinearHead,
    output_dir: str | os.PathLike,
    *,
    class_names: Sequence[str],
    image_processor: Any = None,
) -> Path:
    """Save backbone + CLS||mean-patch head as a stock `Dinov2ForImageClassification` (or `...WithRegisters`).

    The folder loads with `AutoModelForImageClassification.from_pretrained` and `pipeline("image-classification")`
    (id2label/label2id set, image processor saved). Our `DinoVisionModel` is converted with
    `modeling.convert.to_transformers` first. Returns the folder.
    """
    from transformers import (
        Dinov2ForImageClassification,
        Dinov2Model,
        Dinov2WithRegistersForImageClassification,
        Dinov2WithRegistersModel,
    )

    if head.feature != "cls_avgpool":
        raise EvaluationError(
            f"only the CLS + mean-patch head ('cls_avgpool') has the Dinov2ForImageClassification layout, got {head.feature!r}"
        )
    base = _unwrap(backbone)
    if not isinstance(base, (Dinov2Model, Dinov2WithRegistersModel)):
        try:
            from modeling.convert import to_transformers
        except ImportError as e:
            raise EvaluationError(
                f"cannot export a {type(base).__name__} as Dinov2ForImageClassification: it is not a stock DINOv2 "
                "model and modeling.convert.to_transformers is not available"
            ) from e
        try:
            from modeling.convert import transformers_matches_at_all_sizes

            exact_everywhere = transformers_matches_at_all_sizes(base.config)
        except ImportError:
            exact_everywhere = True
        size = processor_output_size(image_processor) if image_processor is not None else None
        if not exact_everywhere and size is not None and size != (base.config.image_size,) * 2:
            logger.warning(
                "exporting a backbone with interpolate_offset=0.1 probed at %s px: the stock transformers class "
                "equals it only at its native %d px, so the exported classifier's outputs differ slightly from the probe's",
                size, base.config.image_size,
            )
        try:
            base = to_transformers(base)
        except Exception as e:
            raise EvaluationError(f"cannot convert {type(base).__name__} to a stock DINOv2 model: {e}") from e
    registers = isinstance(base, Dinov2WithRegistersModel)
    cls_ = Dinov2WithRegistersForImageClassification if registers else Dinov2ForImageClassification
    config = copy.deepcopy(base.config)
    config.architectures = [cls_.__name__]
    config.num_labels = len(class_names)
    config.id2label = {i: str(n) for i, n in enumerate(class_names)}
    config.label2id = {str(n): i for i, n in enumerate(class_names)}
    if head.weight.shape != (len(class_names), 2 * config.hidden_size):
        raise EvaluationError(
            f"head weight {tuple(head.weight.shape)} does not match {len(class_names)} classes x 2*{config.hidden_size}"
        )
    clf = cls_(config)
    inner = clf.dinov2_with_registers if registers else clf.dinov2
    inner.load_state_dict(base.state_dict())
    with torch.no_grad():
        clf.classifier.weight.copy_(head.weight)
        clf.classifier.bias.copy_(head.bias)
    clf.eval()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clf.save_pretrained(out)
    (image_processor or default_image_processor(int(config.image_size))).save_pretrained(out)
    return out
