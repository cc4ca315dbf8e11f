"""Zero-shot classification of an image-text model (CLIP protocol): class names in prompt templates, no training.

Each class is embedded as the normalised mean of its normalised prompt embeddings (one per template, CLIP's
"prompt ensembling"); each image by the model's image embedding; an image's class scores are the cosine
similarities. Works with any model that has `get_image_features(pixel_values=...)` and
`get_text_features(input_ids=..., attention_mask=...)` — stock `VisionTextDualEncoderModel` / `CLIPModel`
(whose methods return a model output with the projected `pooler_output`) and dinoforge's `DualEncoderModel`
(tensors).

results.json of `probe.py --zero_shot`: `{"model", "dataset", "split", "num_test", "zero_shot": {"top1", "top5",
"num_classes", "num_templates", "templates"}}`, accuracies in percent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import EvaluationError, default_device
from .metrics import topk_accuracy
from .splits import check_image_column, load_split, resolve_labels

# CLIP's 7-template ImageNet ensemble (openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb: "the 7 best
# templates"), plus its default single prompt.
CLIP_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
TEMPLATE_SETS = {"clip": CLIP_TEMPLATES, "simple": SIMPLE_TEMPLATES}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """A named set ("clip" | "simple") or explicit templates, each with one `{}` for the class name."""
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise EvaluationError(f"unknown template set {templates!r}; use one of {sorted(TEMPLATE_SETS)} or a list")
        return TEMPLATE_SETS[templates]
    out = tuple(templates)
    if not out or any(t.count("{}") != 1 for t in out):
        raise EvaluationError(f"templates must each contain one '{{}}' for the class name, got {list(out)}")
    return out


def _features(output: Any) -> Tensor:
    """Stock dual encoders return a model output whose `pooler_output` is the projected embedding; ours a tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output


@torch.no_grad()
def class_embeddings(model: Any, tokenizer: Any, class_names: Sequence[str], templates: Sequence[str],
                     device: torch.device, max_length: int = 64) -> Tensor:
    """`[C, D]` L2-normalised class embeddings: the normalised mean of each class's normalised prompt embeddings."""
    rows = []
    for name in class_names:
        prompts = [t.format(name.replace("_", " ")) for t in templates]
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        tokens = {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        embeds = F.normalize(_features(model.get_text_features(**tokens)).float(), dim=-1)
        rows.append(F.normalize(embeds.mean(dim=0), dim=-1))
    return torch.stack(rows)


class _Images(torch.utils.data.Dataset):
    def __init__(self, dataset: Any, image_column: str, label_column: str, label_to_index: dict | None):
        self.dataset, self.image_column, self.label_column, self.label_to_index = (
            dataset, image_column, label_column, label_to_index)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        row = self.dataset[i]
        label = row[self.label_column]
        return row[self.image_column].convert("RGB"), int(self.label_to_index[label] if self.label_to_index else label)


class _Preprocess:
    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, batch: list[tuple[Any, int]]) -> tuple[Tensor, Tensor]:
        images, labels = zip(*batch)
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"], torch.tensor(labels)


@torch.no_grad()
def image_embeddings(model: Any, image_processor: Any, dataset: Any, *, image_column: str = "image",
                     label_column: str = "label", label_to_index: dict | None = None, batch_size: int = 64,
                     num_workers: int = 0, device: torch.device) -> tuple[Tensor, Tensor]:
    """(`[N, D]` L2-normalised image embeddings, `[N]` labels) of a labelled split, preprocessing in workers."""
    loader = torch.utils.data.DataLoader(_Images(dataset, image_column, label_column, label_to_index),
                                         batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_Preprocess(image_processor))
    embeds, labels = [], []
    for pixel_values, y in loader:
        out = _features(model.get_image_features(pixel_values=pixel_values.to(device)))
        embeds.append(F.normalize(out.float(), dim=-1).cpu())
        labels.append(y)
    if not embeds:
        raise EvaluationError("the evaluation split is empty")
    return torch.cat(embeds), torch.cat(labels)


def zero_shot_classify(model: Any, tokenizer: Any, image_processor: Any, dataset: Any, class_names: Sequence[str],
                       *, templates: str | Sequence[str] = "clip", image_column: str = "image",
                       label_column: str = "label", label_to_index: dict | None = None, batch_size: int = 64,
                       num_workers: int = 0, device: torch.device | str | None = None) -> dict[str, Any]:
    """Zero-shot top-1 / top-5 (percent) of `model` on a labelled split: `{"top1", "top5", "num_test",
    "num_classes", "num_templates", "templates"}`."""
    device = torch.device(device) if device is not None else default_device()
    chosen = resolve_templates(templates)
    was_training = getattr(model, "training", False)
    model.eval().to(device)
    try:
        classes = class_embeddings(model, tokenizer, class_names, chosen, device)
        images, labels = image_embeddings(model, image_processor, dataset, image_column=image_column,
                                          label_column=label_column, label_to_index=label_to_index,
                                          batch_size=batch_size, num_workers=num_workers, device=device)
    finally:
        model.train(was_training)
    scores = images @ classes.cpu().T
    accuracy = topk_accuracy(scores, labels)
    return {**accuracy, "num_test": len(labels), "num_classes": len(class_names), "num_templates": len(chosen),
            "templates": list(chosen)}


@dataclass
class ZeroShotConfig:
    """`probe.py --zero_shot`: an image-text model folder (or Hub id) and a labelled split; class names are the
    label column's names (ClassLabel, or the sorted string labels of the train split)."""

    model: str | os.PathLike
    dataset: Any
    output_dir: str | os.PathLike | None = None
    train_split: str = "train"  # only read for string labels (the class list)
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    templates: str | Sequence[str] = "clip"
    batch_size: int = 64
    num_workers: int = 0
    device: str | None = None
    trust_remote_code: bool = False  # dinoforge's own DualEncoderModel loads without it once `modeling` is imported


def load_image_text_model(source: str | os.PathLike, trust_remote_code: bool = False) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor) of an exported image-text folder or Hub id."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    import modeling  # noqa: F401  (registers DualEncoderModel with AutoModel)

    try:
        model = AutoModel.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        processor = AutoImageProcessor.from_pretrained(str(source))
    except (OSError, ValueError, KeyError) as e:
        raise EvaluationError(f"could not load an image-text model (model, tokenizer and image processor) from "
                              f"{str(source)!r}: {e}. Pass an `aligned/` folder of a text-alignment run") from e
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise EvaluationError(f"{str(source)!r} is a {type(model).__name__}, not an image-text model (it has no "
                              "get_image_features / get_text_features): --zero_shot needs e.g. an aligned/ export")
    return model, tokenizer, processor


def run_zero_shot(config: ZeroShotConfig) -> dict[str, Any]:
    """Zero-shot results of `config.model` on `config.dataset`; writes `output_dir/results.json` when set."""
    c = config
    model, tokenizer, processor = load_image_text_model(c.model, c.trust_remote_code)
    test = check_image_column(load_split(c.dataset, c.test_split, image_column=c.image_column), c.image_column,
                              f"the {c.test_split!r} split")
    try:
        train = load_split(c.dataset, c.train_split, image_column=c.image_column)
    except EvaluationError:
        train = test  # class names of a ClassLabel column are the same in every split
    class_names, label_to_index = resolve_labels(train, {c.test_split: test}, c.label_column)
    scores = zero_shot_classify(model, tokenizer, processor, test, class_names, templates=c.templates,
                                image_column=c.image_column, label_column=c.label_column,
                                label_to_index=label_to_index, batch_size=c.batch_size, num_workers=c.num_workers,
                                device=c.device)
    results = {"model": str(c.model), "dataset": str(c.dataset) if isinstance(c.dataset, (str, os.PathLike)) else
               type(c.dataset).__name__, "split": c.test_split, "num_test": scores["num_test"], "zero_shot": scores}
    if c.output_dir is not None:
        out = Path(c.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_zero_shot_table(results: dict[str, Any]) -> str:
    z = results["zero_shot"]
    return "\n".join([
        f"model:   {results['model']}",
        f"dataset: {results['dataset']}  (split {results['split']}, {results['num_test']} images, "
        f"{z['num_classes']} classes, {z['num_templates']} prompt templates)",
        "",
        f"{'zero-shot':<28}{'top-1':>8}{'top-5':>8}",
        "-" * 44,
        f"{'class-name prompts':<28}{z['top1']:>8.2f}{z['top5']:>8.2f}",
    ])
