"""Frozen features of a labelled split: final-normed CLS and mean patch token, batched, in DataLoader workers.

Features are the inputs of `Dinov2ForImageClassification` / `Dinov2WithRegistersForImageClassification`: the
final-normed CLS token and the mean of the patch tokens (register tokens excluded). Batched, no grad, bf16
autocast on CUDA (fp32 on CPU), decoding + preprocessing in DataLoader workers, optionally cached on disk.

Multi-process (`accelerator` given): every process extracts features for its contiguous shard of the dataset
(shards padded to equal length so every process runs the same number of forward passes, which FSDP needs), and
the features are gathered to every process with `accelerator.gather`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import torch
from torch import Tensor

from training.data import decode_image, path_policy

from .backbone import check_image_size, model_name, num_prefix_tokens, patch_size
from .common import FEATURE_KINDS, EvaluationError, default_device, unwrap
from .preprocess import SplitPreprocessing

if TYPE_CHECKING:
    from .cache import FeatureCache

logger = logging.getLogger(__name__)


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


def forward_features(model: torch.nn.Module, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    """(CLS, mean of patch tokens) from `model(pixel_values=...).last_hidden_state`, both float32 `[B, D]`.

    ViTs: checks the token layout `[CLS, registers..., patches...]` and raises `EvaluationError` for token models
    without a CLS token (e.g. Swin) or with image sizes the model cannot take. ConvNets (a `[B, C, h, w]` feature
    map, e.g. transformers' `ResNetModel`): the global average pool (`pooler_output`) stands for the CLS token and
    the mean of the last feature map for the mean patch token (`convnet_features`).
    """
    name = model_name(model)
    h, w = pixel_values.shape[-2:]
    check_image_size(model, h, w)
    try:
        out = model(pixel_values=pixel_values)
    except torch.cuda.OutOfMemoryError:
        raise
    except (ValueError, RuntimeError) as e:
        config = getattr(unwrap(model), "config", None)
        expected = getattr(config, "image_size", None)
        hint = f" Pass --image_size {expected} (the size in the model's config)." if expected and expected != h else ""
        raise EvaluationError(f"{name} failed on a batch of {h}x{w} images: {e}.{hint}") from e
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)):
        hidden = out[0]
    if isinstance(hidden, Tensor) and hidden.ndim == 4:
        return convnet_features(name, hidden, getattr(out, "pooler_output", None))
    if not isinstance(hidden, Tensor) or hidden.ndim != 3:
        shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else None
        raise EvaluationError(
            f"{name} has no CLS token: its last_hidden_state has shape {shape}, expected ViT-style tokens "
            "[batch, 1 + registers + patches, dim]. k-NN and linear probes need a ViT backbone with a CLS token "
            "(e.g. DINOv2, with or without registers)"
        )
    prefix = num_prefix_tokens(model)
    p = patch_size(model)
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


def convnet_features(name: str, feature_map: Tensor, pooled: Tensor | None) -> tuple[Tensor, Tensor]:
    """(pooled feature, mean of the feature map), float32 `[B, C]`, of a ConvNet's `[B, C, h, w]` last feature map
    and its `pooler_output` (`[B, C]` or `[B, C, 1, 1]`; absent: the mean). For a global-average-pooling ConvNet
    (ResNet) the two are the same vector, so "cls_avgpool" probes see it twice. A pooler that keeps a grid
    (TextNet's 2x2, made for detection heads) is not a global feature: the mean stands for it."""
    mean = feature_map.float().mean(dim=(2, 3))
    if pooled is None or (pooled.dim() == 4 and pooled.shape[2:] != (1, 1)):
        return mean, mean
    pooled = pooled.float().flatten(1)
    if pooled.shape != mean.shape:
        raise EvaluationError(f"{name}: pooler_output {tuple(pooled.shape)} does not match its feature map "
                              f"{tuple(feature_map.shape)} (expected [batch, channels] or [batch, channels, 1, 1])")
    return pooled, mean


class _ImageBatches(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: a list of row indices → (pixel_values, labels, indices).

    Decoding and preprocessing happen here, i.e. in the DataLoader workers (with `split`, only the geometric
    part: the tensors are uint8 and normalised on the device).
    """

    def __init__(
        self, dataset: Any, image_column: str, label_column: str, processor: Callable[..., Any],
        label_to_index: dict[Any, int] | None, split: SplitPreprocessing | None = None,
    ):
        # Decode ourselves (not inside `datasets`), so that an unreadable file is reported by name.
        self.dataset = dataset.select_columns([image_column, label_column]).cast_column(
            image_column, datasets.Image(decode=False)
        )
        self.image_column, self.label_column = image_column, label_column
        self.processor = processor
        self.label_to_index = label_to_index
        self.split = split
        # Which local paths rows may name (the folders the dataset was loaded from): decided here, in the main
        # process, because DataLoader workers started by spawn do not share its registry.
        self.allow_paths = path_policy()

    def __len__(self) -> int:
        return len(self.dataset)

    def _decode(self, value: Any, row: int) -> Any:
        # The project's one decoder (EXIF orientation, RGB). Unlike training, which counts and skips unreadable
        # images, an evaluation must see every row: a broken image is an error that names it.
        try:
            return decode_image(value, allow_paths=self.allow_paths)
        except Exception as e:
            where = value.get("path") if isinstance(value, dict) and value.get("path") else f"row {row}"
            raise EvaluationError(
                f"cannot decode the image of {where} (row {row}): {type(e).__name__}: {e}. Fix or remove it; the "
                "probe evaluates every row and does not skip images"
            ) from e

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


def autocast(device: torch.device, dtype: str) -> torch.autocast:
    """Autocast context for the forward passes: "auto" is bf16 on CUDA, fp32 (autocast off) elsewhere."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return torch.autocast(device_type=device.type, dtype=torch_dtype)


def resolve_dtype(device: torch.device, dtype: str) -> str:
    """The dtype "auto" means on `device` ("bf16" on CUDA, "fp32" elsewhere); others unchanged."""
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
        device = param.device if param is not None and param.device.type != "meta" else default_device()
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
    base = unwrap(model)
    was_training = base.training
    model.eval()
    cls_parts, patch_parts, label_parts, index_parts = [], [], [], []
    show = progress and rank == 0
    from tqdm.auto import tqdm

    # A manual bar: tqdm 4.70 wrapping the loader calls iter() twice, which starts a second set of workers.
    bar = tqdm(total=len(batches), desc=desc, disable=not show, unit="batch")
    try:
        with autocast(device, dtype):
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
