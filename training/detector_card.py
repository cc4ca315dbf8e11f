"""The model card (README.md) of a grounding export (`detector/`): usage with stock transformers, the training
settings and the box recall with its before-training baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from model_cards import is_hub_id, public_name

from .config import to_dict
from .model_card import TRAINING_AND_EVALUATION, training_and_evaluation_values

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

An open-vocabulary detector trained with dinoforge: transformers' Grounding DINO with a dinoforge backbone
(features of several of its blocks). It is a stock `GroundingDinoForObjectDetection` with its tokenizer and image
processor: it loads with `transformers` alone.

```python
from transformers import pipeline
detector = pipeline("zero-shot-object-detection", model="{{ repo_id }}")
detector(image, candidate_labels=["circle", "star"])
```

Prompts are phrases; for several at once, separate them with " ." (`"circle . star ."`), as Grounding DINO does.

""" + TRAINING_AND_EVALUATION


def _evaluation(results: dict | None) -> str:
    if not results:
        return "No evaluation was run for this export."
    r, base = results["box_recall"], results.get("before_training")
    lines = [
        f"Box recall on `{public_name(results['dataset'], default='local images')}` (split `{results['split']}`, "
        f"{r['num_images']} images, {r['num_objects']} objects): every image is prompted with all category names; an "
        f"object counts as found when one of the top-{r['top_k']} boxes for its phrase has IoU ≥ {r['iou']} with it.",
        "",
        "| model | recall (%) |",
        "|---|---:|",
        f"| this model | {r['recall']:.2f} |",
    ]
    if base:
        lines.append(f"| before training (same backbone, fresh neck, heads and text tower) | {base['recall']:.2f} |")
    return "\n".join(lines)


def render_detector_card(model: Any, cfg: Any, results: dict | None = None, step: int | str = "?") -> str:
    config = to_dict(cfg) if not isinstance(cfg, dict) else cfg
    dataset = str((config.get("data") or {}).get("dataset") or "unknown")
    hub = (config.get("hub") or {}).get("model_id")
    name = public_name(hub or f"dinoforge-{config.get('config_name', 'grounding')}")
    evals = None
    if results:
        r = results["box_recall"]
        evals = [EvalResult(task_type="zero-shot-object-detection", task_name="Zero-Shot Object Detection",
                            dataset_type=public_name(results["dataset"]), dataset_name=public_name(results["dataset"]),
                            dataset_split=results["split"], metric_type="recall", metric_value=round(r["recall"], 2),
                            metric_name=f"box recall (IoU {r['iou']}, top-{r['top_k']} per phrase)",
                            metric_config=f"recall-iou{r['iou']}-top{r['top_k']}")]
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="zero-shot-object-detection", license="apache-2.0",
        tags=["dinoforge", "grounding-dino", "zero-shot-object-detection"],
        datasets=[dataset] if is_hub_id(dataset) else None, model_name=name if evals else None, eval_results=evals,
    )
    values = dict(
        model_name=name, repo_id=hub if hub and is_hub_id(hub) else "path/to/detector",
        **training_and_evaluation_values(model, config, dataset, step, _evaluation(results)),
    )
    return str(ModelCard.from_template(card_data, template_str=TEMPLATE, **values))


def write_detector_card(folder: str | Path, model: Any, cfg: Any, results: dict | None = None,
                        step: int | str = "?") -> Path:
    path = Path(folder) / "README.md"
    path.write_text(render_detector_card(model, cfg, results, step), encoding="utf-8")
    return path
