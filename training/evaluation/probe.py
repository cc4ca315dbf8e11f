"""The probe behind `probe.py`: k-NN + linear probes of a backbone on a labelled dataset, results.json.

results.json: `{"model", "dataset", "num_train", "num_test", "knn": {"10": {"top1", "top5"}, "20": ...},
"linear": {"cls": {"top1", "top5"}, "cls_avgpool": {...}}}`, accuracies in percent (DESIGN.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbone import check_image_size, load_backbone, model_name, num_prefix_tokens
from .cache import DEFAULT_CACHE_MAX_BYTES, FeatureCache, default_cache_dir, feature_cache_key, model_fingerprint
from .common import FEATURE_KINDS, HEADLINE_K, KNN_KS, KNN_TEMPERATURE, EvaluationError, default_device
from .features import FeatureSet, extract_features, resolve_dtype
from .knn import knn_classify
from .linear import LinearHead, LinearProbeConfig, train_linear_probe
from .metrics import topk_accuracy
from .preprocess import default_image_processor, load_image_processor, processor_output_size
from .splits import check_image_column, check_label_range, load_split, resolve_labels

DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class ProbeConfig:
    """Everything one probe run needs (`probe.py` builds it from its flags, one field per flag)."""

    model: str | os.PathLike | torch.nn.Module  # folder / Hub id (AutoModel.from_pretrained) or a live model
    dataset: str | os.PathLike | Any  # anything `training.data.load_image_dataset` opens, or a Dataset(Dict)
    output_dir: str | os.PathLike | None = None  # results.json + details.json (+ classifier/); None: write nothing
    train_split: str = "train"
    test_split: str = "test"
    val_split: str | None = None  # linear-probe grid search; None: a seeded 10 % of train
    image_column: str = "image"
    label_column: str = "label"
    image_size: int | None = None  # crop size override (multiple of the patch size)
    batch_size: int = 64
    num_workers: int | None = None  # DataLoader workers; None: min(8, CPUs)
    cache_dir: str | os.PathLike | None = None  # None: `default_cache_dir()`
    use_cache: bool = True  # read and write cached features
    cache_max_bytes: int | None = DEFAULT_CACHE_MAX_BYTES  # LRU size limit of the cache; None: no limit
    clear_cache: bool = False  # delete the cache's entries before running
    device: str | None = None  # None: cuda if available
    dtype: str = "auto"  # autocast of the forward passes: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    ks: tuple[int, ...] = KNN_KS
    temperature: float = KNN_TEMPERATURE
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    export_classifier: bool = False  # save the CLS+mean-patch head as a stock classifier in output_dir/classifier
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise EvaluationError(f"dtype {self.dtype!r} is not one of {list(DTYPES)} (--dtype)")
        if self.batch_size < 1:
            raise EvaluationError(f"batch_size must be at least 1, got {self.batch_size} (--batch_size)")
        self.ks = tuple(int(k) for k in self.ks)
        if not self.ks or min(self.ks) < 1:
            raise EvaluationError(f"ks must be positive integers, got {list(self.ks)} (--ks)")
        if self.temperature <= 0:
            raise EvaluationError(f"temperature must be positive, got {self.temperature} (--temperature)")
        if self.export_classifier and self.output_dir is None:
            raise EvaluationError("export_classifier needs an output_dir to write the classifier folder into")

    def feature_cache(self) -> FeatureCache:
        return FeatureCache(self.cache_dir or default_cache_dir(), max_bytes=self.cache_max_bytes)


@dataclass
class ProbeOutput:
    """What `run_probe` computed: the results.json dict, the linear heads, class names and the features."""

    results: dict[str, Any]
    heads: dict[str, LinearHead]
    class_names: list[str]
    features: dict[str, FeatureSet]
    details: dict[str, Any]


def run_probe(config: ProbeConfig) -> ProbeOutput:
    """k-NN + linear probes of `config.model` on `config.dataset`; writes `output_dir/results.json` (+ details.json).

    details.json records splits, class names, the chosen linear-probe settings and the grid. With
    `export_classifier` the CLS || mean-patch head is saved as a stock `Dinov2ForImageClassification` in
    `output_dir/classifier`.
    """
    cfg = config
    device = torch.device(cfg.device) if cfg.device is not None else default_device()
    live_model = isinstance(cfg.model, torch.nn.Module)
    backbone = load_backbone(cfg.model, device=device)
    if live_model and cfg.image_size is None:  # a live model has no processor of its own: its config's size
        processor = default_image_processor(int(getattr(backbone.config, "image_size", 224) or 224))
    else:
        processor = load_image_processor(None if live_model else cfg.model, image_size=cfg.image_size)
    out_size = processor_output_size(processor)
    if out_size is not None:
        check_image_size(backbone, *out_size)

    splits = {"train": cfg.train_split, "test": cfg.test_split}
    if cfg.val_split:
        splits["val"] = cfg.val_split
    data = {
        role: check_image_column(load_split(cfg.dataset, name, image_column=cfg.image_column), cfg.image_column,
                                 f"the {name!r} split")
        for role, name in splits.items()
    }
    class_names, label_to_index = resolve_labels(
        data["train"], {splits[r]: ds for r, ds in data.items() if r != "train"}, cfg.label_column
    )

    dtype = resolve_dtype(device, cfg.dtype)
    if cfg.clear_cache:
        cfg.feature_cache().clear()
    cache = cfg.feature_cache() if cfg.use_cache else None
    fingerprint = model_fingerprint(backbone) if cache is not None else None
    feats: dict[str, FeatureSet] = {}
    for role, ds in data.items():
        key = None
        if cache is not None:
            key = feature_cache_key(
                fingerprint, ds, image_processor=processor, image_column=cfg.image_column,
                label_column=cfg.label_column, dtype=dtype,
                extra={"labels": label_to_index and sorted(map(str, label_to_index))},
            )
        feats[role] = extract_features(
            backbone, ds, image_processor=processor, image_column=cfg.image_column, label_column=cfg.label_column,
            label_to_index=label_to_index, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device,
            dtype=dtype, progress=cfg.progress, desc=f"features {role}", cache=cache, cache_key=key,
        )
    train, test, val = feats["train"], feats["test"], feats.get("val")
    num_classes = len(class_names)
    for role, fs in feats.items():
        check_label_range(fs, num_classes, role)

    knn = knn_classify(
        train.cls, train.labels, test.cls, test.labels, num_classes=num_classes, ks=cfg.ks,
        temperature=cfg.temperature, device=device,
    )
    linear_results, heads = {}, {}
    for kind in FEATURE_KINDS:
        head = train_linear_probe(
            train.features(kind), train.labels, num_classes=num_classes,
            val_features=val.features(kind) if val is not None else None,
            val_labels=val.labels if val is not None else None, config=cfg.linear, feature=kind, device=device,
        )
        heads[kind] = head
        linear_results[kind] = topk_accuracy(head(test.features(kind)), test.labels)

    results = {
        "model": model_name(cfg.model) if live_model else str(cfg.model),
        "dataset": _dataset_name(cfg.dataset),
        "num_train": len(train),
        "num_test": len(test),
        "knn": knn,
        "linear": linear_results,
    }
    details = {
        "train_split": cfg.train_split, "test_split": cfg.test_split, "val_split": cfg.val_split,
        "num_val": len(val) if val is not None else None,
        "num_classes": num_classes, "class_names": class_names,
        "feature_dim": int(train.cls.shape[1]), "num_prefix_tokens": num_prefix_tokens(backbone),
        "image_processor": processor.to_dict() if hasattr(processor, "to_dict") else None,
        "dtype": dtype, "device": str(device),
        "knn": {"ks": list(cfg.ks), "temperature": cfg.temperature, "headline_k": HEADLINE_K,
                "features": "L2-normalised CLS, cosine, softmax(sim/T) weighted vote"},
        "linear": {"config": asdict(cfg.linear), "selected": {k: h.summary() for k, h in heads.items()}},
        "metrics": "top-k accuracy in percent computed with torch; class-score ties go to the lower class index",
    }
    if cfg.output_dir is not None:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        if cfg.export_classifier:
            # Imported here: training.classifier builds on this package (LinearHead, processors).
            from training.classifier import export_classifier_model

            path = export_classifier_model(backbone, heads["cls_avgpool"], out / "classifier",
                                           class_names=class_names, image_processor=processor)
            details["classifier"] = str(path)
        (out / "details.json").write_text(json.dumps(details, indent=2, default=str) + "\n")
    return ProbeOutput(results=results, heads=heads, class_names=class_names, features=feats, details=details)


def _dataset_name(dataset: Any) -> str:
    if isinstance(dataset, (str, os.PathLike)):
        return str(dataset)
    return getattr(getattr(dataset, "info", None), "dataset_name", None) or type(dataset).__name__


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
