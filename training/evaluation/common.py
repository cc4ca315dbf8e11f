"""What every evaluation module shares: the protocol constants, the user-error type and small model helpers."""

from __future__ import annotations

import torch

# Official DINOv2 k-NN protocol (`eval/knn.py`): these ks, this temperature, k = 20 as the headline number.
KNN_KS: tuple[int, ...] = (10, 20, 100, 200)
KNN_TEMPERATURE = 0.07
HEADLINE_K = 20
# Linear-probe inputs: CLS alone, and CLS || mean patch (the `Dinov2ForImageClassification` head input).
FEATURE_KINDS: tuple[str, ...] = ("cls", "cls_avgpool")


class EvaluationError(ValueError):
    """A user-fixable problem with the model, the dataset or the options of an evaluation."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP/FSDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
