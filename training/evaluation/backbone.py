"""The backbone under evaluation: loading it, and what its config says about its token layout and input sizes."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .common import EvaluationError, unwrap

logger = logging.getLogger(__name__)


def load_backbone(model: str | os.PathLike | torch.nn.Module, *, device: torch.device | str | None = None) -> Any:
    """A backbone in eval mode: a folder/Hub id loaded with `AutoModel.from_pretrained`, or a model as is.

    dinoforge's own classes are registered first (import `modeling`), so `pretraining/` and `backbone/` folders
    load too; for a `DinoForPretraining` the teacher backbone is used.
    """
    if isinstance(model, torch.nn.Module):
        backbone = model
    else:
        from transformers import AutoModel

        import modeling  # noqa: F401  (registers DinoVisionModel / DinoForPretraining with AutoModel)

        try:
            backbone = AutoModel.from_pretrained(str(model))
        except (OSError, ValueError, KeyError) as e:
            raise EvaluationError(
                f"could not load model {str(model)!r} with AutoModel.from_pretrained: {e}. Pass a model folder "
                "(e.g. outputs/<run>/backbone) or a Hub id (needs network or a cached copy)"
            ) from e
    exports = backbone.exports() if callable(getattr(backbone, "exports", None)) else {}
    if "backbone" in exports:  # a pretraining model of any method: evaluate what it exports
        logger.info("%s is a pretraining model: evaluating its exported backbone", type(backbone).__name__)
        backbone = exports["backbone"]
    backbone.eval()
    if device is not None:
        backbone.to(device)
    return backbone


def num_prefix_tokens(model: torch.nn.Module) -> int:
    """Tokens before the patches in `last_hidden_state`: CLS + register tokens."""
    config = getattr(unwrap(model), "config", None)
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


def patch_size(model: torch.nn.Module) -> int | None:
    """The model's (square) patch size from its config, None if it has none."""
    config = getattr(unwrap(model), "config", None)
    p = getattr(config, "patch_size", None)
    if isinstance(p, (tuple, list)):
        p = p[0]
    return int(p) if p else None


def model_name(model: torch.nn.Module) -> str:
    """Where the model was loaded from (config `_name_or_path`), else its class name: for messages."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_name_or_path", "") or type(unwrap(model)).__name__


def check_image_size(model: torch.nn.Module, height: int, width: int) -> None:
    """Raise `EvaluationError` unless height and width are multiples of the model's patch size."""
    p = patch_size(model)
    if p and (height % p or width % p):
        fix = max(p, round(height / p) * p)
        raise EvaluationError(
            f"image size {height}x{width} is not a multiple of the patch size {p} of {model_name(model)}: "
            f"pass an image size that is (e.g. --image_size {fix}) or fix the image processor's crop size"
        )
