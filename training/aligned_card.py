"""The model card (README.md) of a text-alignment export (`aligned/`): usage with stock transformers, the training
settings, and the zero-shot results with their before-training baseline in the card's model-index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from model_cards import is_hub_id, public_name

from .config import to_dict
from .model_card import (
    TRAINING_AND_EVALUATION,
    eval_results_from_results,
    evaluation_markdown,
    parse_results,
    training_and_evaluation_values,
)

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

An image-text dual encoder trained with dinoforge ({{ variant }}): a text tower aligned to a frozen image tower with
CLIP's contrastive loss. {{ loading }}

```python
from transformers import pipeline
classifier = pipeline("zero-shot-image-classification", model="{{ repo_id }}"{{ remote_code }})
classifier(image, candidate_labels=["a photo of a cat", "a photo of a dog"])
```

""" + TRAINING_AND_EVALUATION

NO_EVALUATION = ("No zero-shot evaluation was run for this export. Run `python probe.py --zero_shot --model "
                 "path/to/aligned --dataset <labelled dataset> --output_dir probe --update_model_card`.")


def render_aligned_card(model: Any, cfg: Any, results: dict | None = None, step: int | str = "?") -> str:
    """README.md text of an `aligned/` export; `results` as `evaluate_text_alignment` returns them."""
    config = to_dict(cfg) if not isinstance(cfg, dict) else cfg
    dataset = str((config.get("data") or {}).get("dataset") or "unknown")
    hub = (config.get("hub") or {}).get("model_id")
    stock = model.model.config.expressible_as_stock
    summary = parse_results(results) if results else None
    name = public_name(hub or f"dinoforge-{config.get('config_name', 'text-alignment')}")
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="zero-shot-image-classification", license="apache-2.0",
        tags=["dinoforge", "image-text", "zero-shot-image-classification", "lit" if stock else "dino.txt"],
        datasets=[dataset] if is_hub_id(dataset) else None, model_name=name if summary else None,
        eval_results=eval_results_from_results(summary) if summary else None,
    )
    loading = (
        "It is a stock `VisionTextDualEncoderModel`: it loads with `transformers` alone, no `trust_remote_code`."
        if stock else
        "Its class, `DualEncoderModel` (dino.txt's CLS ‖ mean-patch embedding and head blocks, which the stock "
        "`VisionTextDualEncoderModel` cannot express), ships in this folder: load it with `trust_remote_code=True`."
    )
    evaluation = evaluation_markdown(summary) if summary else NO_EVALUATION
    values = dict(
        model_name=name, variant="LiT" if stock else "dino.txt", loading=loading,
        repo_id=hub if hub and is_hub_id(hub) else "path/to/aligned",
        remote_code="" if stock else ", trust_remote_code=True",
        **training_and_evaluation_values(model, config, dataset, step, evaluation),
    )
    return str(ModelCard.from_template(card_data, template_str=TEMPLATE, **values))


def write_aligned_card(folder: str | Path, model: Any, cfg: Any, results: dict | None = None,
                       step: int | str = "?") -> Path:
    path = Path(folder) / "README.md"
    path.write_text(render_aligned_card(model, cfg, results, step), encoding="utf-8")
    return path
