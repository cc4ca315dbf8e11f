"""Weighted k-NN on frozen CLS features, the official DINOv2 protocol (`eval/knn.py`), and its in-training use.

L2-normalised CLS, cosine similarity, the `max(ks)` nearest train samples, weights `softmax(sim / T)` with
T = 0.07, class score = sum of the weights of the first k neighbours, k in {10, 20, 100, 200}; headline k = 20.
Deterministic tie rules: equally similar train samples are taken in increasing train index; equal class scores
rank the lower class index first. k larger than the train set uses the whole train set.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import HEADLINE_K, KNN_KS, KNN_TEMPERATURE, EvaluationError, default_device, unwrap
from .features import extract_features
from .metrics import topk_hits
from .preprocess import default_image_processor
from .splits import check_image_column, check_label_range, resolve_labels


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
    device = torch.device(device) if device is not None else default_device()
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


def flatten_knn(knn: dict[str, dict[str, float]], prefix: str = "knn") -> dict[str, float]:
    """`{"20": {"top1": x}}` → `{"knn/k20/top1": x, ..., "knn/top1": <headline k=20>}` for trackers."""
    flat = {f"{prefix}/k{k}/{m}": v for k, d in knn.items() for m, v in d.items()}
    head = knn.get(str(HEADLINE_K))
    if head is not None:
        flat.update({f"{prefix}/{m}": v for m, v in head.items()})
    return flat


_FLAT_KEY = re.compile(r"^(?:.*/)?k(\d+)/(top\d+)$")
_HEADLINE_KEY = re.compile(r"^(?:.*/)?(top\d+)$")


def unflatten_knn(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """Inverse of `flatten_knn`: `{"knn/k20/top1": x, "knn/top1": x, ...}` → `{"20": {"top1": x}, ...}`.

    The headline keys (`<prefix>/top1`) fill k = 20 when the flat dict has no `k20` keys. A `"step"` key (the
    training loop adds one to its logged rows) is ignored; any other key that is neither form raises `ValueError`.
    """
    knn: dict[str, dict[str, float]] = {}
    headline: dict[str, float] = {}
    for key, value in flat.items():
        if key == "step":
            continue
        if m := _FLAT_KEY.match(key):
            knn.setdefault(m.group(1), {})[m.group(2)] = float(value)
        elif m := _HEADLINE_KEY.match(key):
            headline[m.group(1)] = float(value)
        else:
            raise ValueError(f"{key!r} is not a flat k-NN metric (expected '<prefix>/k<K>/top<N>' or '<prefix>/top<N>')")
    if headline:
        knn.setdefault(str(HEADLINE_K), {}).update({m: v for m, v in headline.items() if m not in knn[str(HEADLINE_K)]})
    return dict(sorted(knn.items(), key=lambda kv: int(kv[0])))


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
        size = image_size or getattr(getattr(unwrap(model), "config", None), "image_size", None) or 224
        image_processor = default_image_processor(int(size))
    train_ds = check_image_column(train_dataset, image_column, "the k-NN train set")
    test_ds = check_image_column(test_dataset, image_column, "the k-NN test set")
    class_names, label_to_index = resolve_labels(train_ds, {"test": test_ds}, label_column)
    common = dict(
        image_processor=image_processor, image_column=image_column, label_column=label_column,
        label_to_index=label_to_index, batch_size=batch_size, num_workers=num_workers, accelerator=accelerator,
        dtype=dtype, progress=progress,
    )
    train = extract_features(model, train_ds, desc="knn train", **common)
    test = extract_features(model, test_ds, desc="knn test", **common)
    check_label_range(train, len(class_names), "train")
    check_label_range(test, len(class_names), "test")
    param = next(iter(model.parameters()), None)
    device = accelerator.device if accelerator is not None else (param.device if param is not None else None)
    knn = knn_classify(
        train.cls, train.labels, test.cls, test.labels, num_classes=len(class_names), ks=ks,
        temperature=temperature, device=device,
    )
    return flatten_knn(knn, prefix)
