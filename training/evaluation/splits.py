"""Labelled splits for evaluation: loading them, checking their image/label columns, one class list for all."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import datasets

from training.data import load_image_dataset

from .common import EvaluationError

if TYPE_CHECKING:
    from .features import FeatureSet


def load_split(dataset: str | os.PathLike | Any, split: str, *, image_column: str = "image") -> datasets.Dataset:
    """One split as a map-style `datasets.Dataset`.

    Strings go through `training.data.load_image_dataset` (Hub id, image folder, `save_to_disk`, parquet,
    webdataset, `"sample"`), the project's one source resolver. A `datasets.Dataset` / `DatasetDict` is used as is.
    """
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
        ds = load_image_dataset(name, split=split, image_column=image_column, streaming=False)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise EvaluationError(
            f"could not load split {split!r} of dataset {name!r}: {e} (probe.py: --dataset, --train_split, "
            "--test_split, --image_column)"
        ) from e
    if not isinstance(ds, datasets.Dataset):
        raise EvaluationError(f"dataset {name!r} split {split!r} loaded as {type(ds).__name__}; need a map-style Dataset")
    return ds


def check_image_column(dataset: datasets.Dataset, image_column: str, where: str) -> datasets.Dataset:
    """`dataset` with `image_column` as an `Image` column (file-path strings are cast); clear error otherwise."""
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


def _label_info(dataset: Any, label_column: str, where: str) -> tuple[list[str] | None, str]:
    """(class names or None, kind) for a label column; kind is 'int' or 'str'."""
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


def check_label_range(features: FeatureSet, num_classes: int, role: str) -> None:
    """Raise unless every label of `features` is a class of the train split."""
    top = int(features.labels.max()) if len(features) else -1
    if top >= num_classes:
        raise EvaluationError(
            f"the {role} split has label {top}, but the train split defines only {num_classes} classes "
            f"(0..{num_classes - 1})"
        )
