"""Frozen-feature evaluation of a backbone: k-NN and linear probes, in-training k-NN, the probe runner.

Works on any backbone that `transformers.AutoModel.from_pretrained` loads and that returns a ViT-style
`last_hidden_state` `[batch, 1 + registers + patches, dim]` (ours, an export, a stock DINOv2 with or without
registers), and on any labelled `datasets` split (through `training.data.load_image_dataset`).

One job per module:
- `common`: protocol constants, `EvaluationError`, model unwrapping.
- `metrics`: top-k accuracy and the class-ranking tie rule.
- `knn`: the official DINOv2 weighted k-NN, and `knn_eval` for the training loop.
- `linear`: the linear probe (grid search on a validation split, standardisation folded into the head).
- `backbone`: loading a backbone and reading its token layout / patch size.
- `preprocess`: image processors (DINOv2 default, size overrides, worker/device split).
- `splits`: loading labelled splits and resolving their classes.
- `features`: batched feature extraction in DataLoader workers (multi-process with Accelerate).
- `cache`: the on-disk feature cache (content fingerprints, LRU size limit).
- `probe`: `ProbeConfig` + `run_probe` (what `probe.py` runs) and its results table.
- `zero_shot`: zero-shot classification of image-text models with class-name prompts (`probe.py --zero_shot`).

Model cards (`model-index`) live in `training.model_card`, the classifier export in `training.classifier`.
"""

from .cache import DEFAULT_CACHE_MAX_BYTES, FeatureCache, default_cache_dir, feature_cache_key, model_fingerprint
from .common import FEATURE_KINDS, HEADLINE_K, KNN_KS, KNN_TEMPERATURE, EvaluationError
from .features import FeatureSet, extract_features, forward_features
from .knn import flatten_knn, knn_classify, knn_eval, knn_scores, unflatten_knn
from .linear import LinearHead, LinearProbeConfig, train_linear_probe
from .metrics import rank_classes, topk_accuracy
from .preprocess import default_image_processor, load_image_processor, processor_output_size
from .probe import ProbeConfig, ProbeOutput, format_results_table, run_probe
from .splits import load_split, resolve_labels
from .zero_shot import ZeroShotConfig, format_zero_shot_table, run_zero_shot, zero_shot_classify

__all__ = [
    "DEFAULT_CACHE_MAX_BYTES", "FEATURE_KINDS", "HEADLINE_K", "KNN_KS", "KNN_TEMPERATURE",
    "EvaluationError", "FeatureCache", "FeatureSet", "LinearHead", "LinearProbeConfig", "ProbeConfig", "ProbeOutput",
    "default_cache_dir", "default_image_processor", "extract_features", "feature_cache_key", "flatten_knn",
    "format_results_table", "forward_features", "knn_classify", "knn_eval", "knn_scores", "load_image_processor",
    "load_split", "model_fingerprint", "processor_output_size", "rank_classes", "resolve_labels", "run_probe",
    "topk_accuracy", "train_linear_probe", "unflatten_knn",
    "ZeroShotConfig", "format_zero_shot_table", "run_zero_shot", "zero_shot_classify",
]
