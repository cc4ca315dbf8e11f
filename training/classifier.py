"""Export a probed backbone + its linear head as a stock `transformers` image classifier.

`probe.py --export_classifier` writes one: the folder loads with `AutoModelForImageClassification` and
`pipeline("image-classification")`, no dinoforge import needed.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from modeling import DinoVisionModel
from modeling.convert import to_transformers, transformers_matches_at_all_sizes

from .evaluation import EvaluationError, LinearHead, default_image_processor, processor_output_size
from .evaluation.common import unwrap

logger = logging.getLogger(__name__)


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
            f"only the CLS + mean-patch head ('cls_avgpool') has the Dinov2ForImageClassification layout, got "
            f"{head.feature!r}"
        )
    base = unwrap(backbone)
    if not isinstance(base, (Dinov2Model, Dinov2WithRegistersModel)):
        if not isinstance(base, DinoVisionModel):
            raise EvaluationError(
                f"cannot export a {type(base).__name__} as Dinov2ForImageClassification: only stock DINOv2 models "
                "and dinoforge's DinoVisionModel can be exported"
            )
        size = processor_output_size(image_processor) if image_processor is not None else None
        if not transformers_matches_at_all_sizes(base.config) and size is not None and \
                size != (base.config.image_size,) * 2:
            logger.warning(
                "exporting a backbone with interpolate_offset=0.1 probed at %s px: the stock transformers class "
                "equals it only at its native %d px, so the exported classifier's outputs differ slightly from the "
                "probe's", size, base.config.image_size,
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
            f"head weight {tuple(head.weight.shape)} does not match {len(class_names)} classes x "
            f"2*{config.hidden_size}"
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
