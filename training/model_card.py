"""Model cards of exported backbones, built with `huggingface_hub` (`ModelCard` + `ModelCardData`).

The card's metadata is validated by `ModelCardData` (library, pipeline tag, tags, license, `datasets` only for a
Hub id, `model-index` from `EvalResult`s); its text comes from the `model_cards/model_card.md` template. Cards are
public: local paths are reduced to their last component (`model_cards.public_name`).

Evaluation results: every function here that takes `results` accepts either shape.

1. A probe `results.json` dict, or the path of the file (`probe.py`):
   `{"model", "dataset", "num_train", "num_test", "knn": {"10": {"top1", "top5"}, "20": {...}, ...},
   "linear": {"cls": {"top1", "top5"}, "cls_avgpool": {...}}}`, optional `"split"` (default "test").
2. A training run's end-of-run k-NN summary (the flat dicts `training.evaluation.knn_eval` returns):
   `{"dataset": "<eval dataset>", "split": "test", "knn": {"knn/top1": x, "knn/top5": y, "knn/k10/top1": ...,
   ...}, "random_init": {same flat keys}}`; `"random_init"` (a random-weight backbone of the same architecture,
   the baseline) is optional.
3. Zero-shot classification of an image-text model (`probe.py --zero_shot`, or a text-alignment run's end-of-run
   evaluation): `{"dataset", "split", "zero_shot": {"top1", "top5", "num_classes", "num_templates", ...}}`, with
   optional `"before_training"` (same keys: the model before training, the baseline) — alone or beside "knn".

Accuracies are in percent. The `model-index` holds k-NN k = 20 top-1/top-5 and, for a probe, both linear probes;
the random-init baseline is shown in the card's results table only (it is not a result of this model).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import eval_results_to_model_index

from model_cards import MODEL_CARD, is_hub_id, load_template, public_name

from .evaluation import HEADLINE_K, KNN_TEMPERATURE, unflatten_knn

TAGS = ["dinov2", "dinoforge", "self-supervised-learning", "vision"]
# The card's Evaluation section sits between these markers, so `update_model_card` can replace it.
EVAL_BEGIN = "<!-- dinoforge:evaluation:begin -->"
EVAL_END = "<!-- dinoforge:evaluation:end -->"

# The training table and evaluation block shared by the cards of the method-specific exports (aligned/, detector/).
TRAINING_AND_EVALUATION = """## Training

| | |
|---|---|
| recipe | `{{ config_name }}` |
| data | {{ dataset }} |
| optimizer steps | {{ steps }} |
{% for label, value in rows %}| {{ label }} | {{ value }} |
{% endfor %}| seed | {{ seed }} |

## Evaluation

{{ evaluation }}
"""

def training_and_evaluation_values(model: Any, config: dict, dataset: str, step: int | str, evaluation: str) -> dict:
    """The values `TRAINING_AND_EVALUATION` takes: recipe, data (a Hub id as is, a local path by its public name),
    steps, the method's own rows, seed, and the evaluation markdown between the markers probe.py rewrites."""
    return dict(
        config_name=public_name(config.get("config_name"), default="custom"),
        dataset=f"`{dataset}`" if is_hub_id(dataset) else f"`{public_name(dataset)}` (local)",
        steps=step, rows=list(model.model_card_rows(config).items()), seed=(config.get("train") or {}).get("seed", "?"),
        evaluation=f"{EVAL_BEGIN}\n{evaluation}\n{EVAL_END}",
    )


USAGE_PLACEHOLDER = "path/to/backbone"
# The training metrics a card shows (in this order, when logged), besides every "*_loss" term.
_METRIC_KEYS = ("step", "loss")
_METRIC_TAIL = ("images_per_s",)
_LINEAR_NAMES = {"cls": "CLS", "cls_avgpool": "CLS+mean-patch"}

ResultsLike = dict[str, Any] | str | os.PathLike


@dataclass
class EvalSummary:
    """Evaluation results in one form, whichever accepted shape they came in (see the module docstring)."""

    dataset: str
    split: str
    knn: dict[str, dict[str, float]]  # {"20": {"top1": .., "top5": ..}, ...}
    linear: dict[str, dict[str, float]] = field(default_factory=dict)
    random_init: dict[str, dict[str, float]] | None = None
    zero_shot: dict[str, Any] | None = None  # {"top1", "top5", "num_classes", "num_templates", ...}
    zero_shot_baseline: dict[str, Any] | None = None  # the model before training
    model: str | None = None
    num_train: int | None = None
    num_test: int | None = None
    source: str = "probe"  # "probe" | "training"


def parse_results(results: ResultsLike) -> EvalSummary:
    """`EvalSummary` of a probe results.json (dict or path) or of a training run's k-NN summary."""
    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text())
    knn = results.get("knn")
    zero_shot = results.get("zero_shot") if isinstance(results.get("zero_shot"), dict) else None
    if zero_shot is not None and "dataset" in results and not knn:
        return EvalSummary(dataset=str(results["dataset"]), split=str(results.get("split") or "test"), knn={},
                           zero_shot=zero_shot, zero_shot_baseline=results.get("before_training"),
                           model=results.get("model"), num_test=results.get("num_test"))
    if "dataset" not in results or not isinstance(knn, dict) or not knn:
        raise ValueError(
            "results must be a probe results.json dict ({'model', 'dataset', 'num_train', 'num_test', 'knn': "
            "{'20': {'top1', 'top5'}, ...}, 'linear': {...}}) or a training k-NN summary ({'dataset', 'split', "
            f"'knn': {{'knn/top1': .., 'knn/k20/top1': .., ...}}, 'random_init': {{...}}}}); got keys {sorted(results)}"
        )
    common = dict(dataset=str(results["dataset"]), split=str(results.get("split") or "test"))
    if all(isinstance(v, dict) for v in knn.values()):  # probe: {"20": {"top1": ..}}
        return EvalSummary(
            **common, knn={str(k): dict(v) for k, v in knn.items()}, linear=dict(results.get("linear") or {}),
            model=results.get("model"), num_train=results.get("num_train"), num_test=results.get("num_test"),
            zero_shot=zero_shot, zero_shot_baseline=results.get("before_training"),
        )
    baseline = results.get("random_init")
    return EvalSummary(
        **common, knn=unflatten_knn(knn), random_init=unflatten_knn(baseline) if baseline else None,
        model=results.get("model"), source="training",
    )


def _dataset_fields(dataset: str) -> dict[str, str]:
    # A Hub id links the dataset page; a local path is shown by its folder name only.
    if is_hub_id(dataset):
        return {"dataset_type": dataset, "dataset_name": dataset.split("/")[-1]}
    name = public_name(dataset, default="local images")
    return {"dataset_type": name, "dataset_name": name}


def _metric_label(metric: str) -> str:
    return f"{metric[:3]}-{metric[3:]}"  # "top1" -> "top-1"


def eval_results_from_results(
    results: ResultsLike | EvalSummary, *, dataset_split: str | None = None, dataset_config: str | None = None,
    knn_ks: Sequence[int] = (HEADLINE_K,),
) -> list[EvalResult]:
    """`huggingface_hub.EvalResult`s: k-NN at `knn_ks` and the linear probes (if any), top-1 and top-5."""
    s = results if isinstance(results, EvalSummary) else parse_results(results)
    common = dict(
        task_type="image-classification", task_name="Image Classification", **_dataset_fields(s.dataset),
        dataset_split=dataset_split or s.split, dataset_config=dataset_config, metric_type="accuracy",
    )
    out = []
    for k in knn_ks:
        for m, value in s.knn.get(str(k), {}).items():
            if m in ("top1", "top5"):
                out.append(EvalResult(**common, metric_value=round(float(value), 2), metric_config=f"knn-k{k}-{m}",
                                      metric_name=f"k-NN {_metric_label(m)} (k={k}, frozen)"))
    for kind, metrics in s.linear.items():
        for m in ("top1", "top5"):
            if m in metrics:
                out.append(EvalResult(
                    **common, metric_value=round(float(metrics[m]), 2), metric_config=f"linear-{kind}-{m}",
                    metric_name=f"linear {_metric_label(m)} ({_LINEAR_NAMES.get(kind, kind)}, frozen)",
                ))
    for m in ("top1", "top5"):
        if s.zero_shot and m in s.zero_shot:
            out.append(EvalResult(
                **{**common, "task_type": "zero-shot-image-classification", "task_name": "Zero-Shot Image Classification"},
                metric_value=round(float(s.zero_shot[m]), 2), metric_config=f"zero-shot-{m}",
                metric_name=f"zero-shot {_metric_label(m)} (class-name prompts)",
            ))
    if not out:
        raise ValueError(f"the results have no k-NN result at k in {list(knn_ks)}, no linear probe and no zero-shot "
                         "result to report")
    return out


def _model_name(s: EvalSummary, model_name: str | None) -> str:
    return public_name(model_name or s.model, default="dinoforge-backbone")


def model_index_from_results(
    results: ResultsLike, model_name: str | None = None, *, dataset_split: str | None = None,
    dataset_config: str | None = None, knn_ks: Sequence[int] = (HEADLINE_K,),
) -> list[dict[str, Any]]:
    """The `model-index` value (Hub metadata schema) for evaluation results (either accepted shape).

    Task `image-classification`, dataset `type` = the Hub id (or a local dataset's folder name), metrics of type
    `accuracy` in percent, named e.g. "k-NN top-1 (k=20, frozen)". `model_name` defaults to the results' model
    (its folder name for a local path).
    """
    s = parse_results(results)
    evals = eval_results_from_results(s, dataset_split=dataset_split, dataset_config=dataset_config, knn_ks=knn_ks)
    return eval_results_to_model_index(_model_name(s, model_name), evals)


def _fmt(block: dict[str, float] | None, metric: str) -> str:
    value = (block or {}).get(metric)
    return "–" if value is None else f"{value:.2f}"


def evaluation_markdown(results: ResultsLike | EvalSummary) -> str:
    """The card's Evaluation section body (between the markers): a sentence on the protocol and a results table."""
    s = results if isinstance(results, EvalSummary) else parse_results(results)
    if not s.knn and s.zero_shot:
        return zero_shot_markdown(s)
    counts = f"; {s.num_train} train / {s.num_test} test images" if s.num_train and s.num_test else ""
    when = "at the end of training" if s.source == "training" else "with `probe.py`"
    lines = [
        f"Frozen features evaluated {when} on `{public_name(s.dataset, default='local images')}` (split "
        f"`{s.split}`{counts}): weighted k-NN as in the official DINOv2 evaluation (cosine on L2-normalised CLS "
        f"tokens, softmax(similarity / {KNN_TEMPERATURE}) votes; k = {HEADLINE_K} is the headline number, also in "
        "this card's metadata)" + (", and linear probes on the CLS token and on CLS + mean patch token." if s.linear
                                   else "."),
        "",
    ]
    baseline = s.random_init is not None
    header = "| protocol | top-1 (%) | top-5 (%) |" + (" random-init top-1 (%) | random-init top-5 (%) |" if baseline else "")
    lines += [header, "|---|---:|---:|" + ("---:|---:|" if baseline else "")]
    for k, block in sorted(s.knn.items(), key=lambda kv: int(kv[0])):
        row = f"| k-NN k={k}{' (headline)' if k == str(HEADLINE_K) else ''} | {_fmt(block, 'top1')} | {_fmt(block, 'top5')} |"
        if baseline:
            other = s.random_init.get(k)
            row += f" {_fmt(other, 'top1')} | {_fmt(other, 'top5')} |"
        lines.append(row)
    for kind, block in s.linear.items():
        lines.append(f"| linear {_LINEAR_NAMES.get(kind, kind)} | {_fmt(block, 'top1')} | {_fmt(block, 'top5')} |"
                     + (" – | – |" if baseline else ""))
    if baseline:
        lines += ["", "random-init: a backbone of the same architecture with random weights, evaluated the same way: "
                  "the baseline the pretraining has to beat."]
    return "\n".join(lines)


def zero_shot_markdown(s: EvalSummary) -> str:
    """The Evaluation section of zero-shot results: the protocol and a table (with the before-training baseline)."""
    z, base = s.zero_shot or {}, s.zero_shot_baseline
    classes = z.get("num_classes")
    lines = [
        f"Zero-shot classification on `{public_name(s.dataset, default='local images')}` (split `{s.split}`"
        + (f", {z.get('num_test')} images" if z.get("num_test") else "")
        + (f", {classes} classes, chance {100 / classes:.1f}%" if classes else "") + "): each class is embedded as "
        f"the mean of its class name in {z.get('num_templates', '?')} prompt templates (CLIP's prompt ensemble), "
        "each image is assigned the most similar class. No training on this dataset's labels.",
        "",
        "| model | top-1 (%) | top-5 (%) |",
        "|---|---:|---:|",
        f"| this model | {_fmt(z, 'top1')} | {_fmt(z, 'top5')} |",
    ]
    if base:
        lines.append(f"| before training (random-init text tower, same image tower) | {_fmt(base, 'top1')} | "
                     f"{_fmt(base, 'top5')} |")
    return "\n".join(lines)


def _evaluation_section(body: str) -> str:
    return f"{EVAL_BEGIN}\n{body}\n{EVAL_END}"


NO_EVALUATION = (
    "No evaluation was run for this export. Evaluate it (k-NN and linear probes on a labelled dataset) with\n"
    f"`python probe.py --model {USAGE_PLACEHOLDER} --dataset <labelled dataset> --output_dir probe "
    "--update_model_card`, which writes the results here and into the card's metadata."
)


def update_model_card(
    model_dir: str | os.PathLike, results: ResultsLike, model_name: str | None = None
) -> Path:
    """Write evaluation results (either accepted shape) into `model_dir/README.md`, created if missing.

    The card's `model-index` is replaced by these results (validated through `ModelCardData`) and its Evaluation
    section by their table; the rest of the card (other metadata, text) is kept. A card without dinoforge's
    Evaluation markers gets the section appended. `model_name` defaults to the card's current model-index name,
    then the results' model, then the folder name.
    """
    path = Path(model_dir) / "README.md"
    card = ModelCard(path.read_text(encoding="utf-8")) if path.is_file() else ModelCard("---\n---\n")
    s = parse_results(results)
    card.data.model_name = (
        model_name or card.data.model_name or _card_title(card.text)
        or public_name(s.model or Path(model_dir).resolve().name)
    )
    card.data.eval_results = eval_results_from_results(s)
    card.text = _replace_section(card.text, _evaluation_section(evaluation_markdown(s)))
    card.save(path)
    return path


def _card_title(text: str) -> str | None:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip() or None
    return None


def _replace_section(text: str, section: str) -> str:
    start, end = text.find(EVAL_BEGIN), text.find(EVAL_END)
    if start != -1 and end > start:
        return text[:start] + section + text[end + len(EVAL_END):]
    return text.rstrip() + "\n\n## Evaluation\n\n" + section + "\n"


def _metrics_table(last_log: dict[str, Any] | None) -> str:
    """The last logged training metrics as a small table: step, loss terms, throughput."""
    log = {k: v for k, v in (last_log or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    keys = [k for k in _METRIC_KEYS if k in log]
    keys += [k for k in log if k.endswith("_loss") and k not in keys]
    keys += [k for k in _METRIC_TAIL if k in log]
    if not keys:
        return "No training metrics were logged."
    rows = [f"| {k.replace('_', ' ')} | {log[k] if isinstance(log[k], int) else f'{log[k]:.4g}'} |" for k in keys]
    return "\n".join(["Last logged training metrics:", "", "| metric | value |", "|---|---:|", *rows])


def _usage_id(run: dict[str, Any]) -> str:
    """What the usage snippet loads: the Hub repo when the run has one, else a neutral placeholder path."""
    hub = ((run.get("config") or {}).get("hub") or {})
    for candidate in (hub.get("model_id"), run.get("repo_id")):
        if candidate and is_hub_id(candidate):
            return str(candidate)
    return USAGE_PLACEHOLDER


def _architecture(backbone: Any) -> tuple[str, list[tuple[str, str]], str, bool]:
    """(stock class name, rows, interpolation note, is a ViT) of an exported backbone."""
    from modeling import DinoVisionModel
    from modeling.convert import transformers_matches_at_all_sizes

    if not isinstance(backbone, DinoVisionModel):
        return type(backbone).__name__, [], "", False
    bc = backbone.config
    grid = bc.image_size // bc.patch_size
    rows = [
        ("width / depth / heads", f"{bc.hidden_size} / {bc.num_hidden_layers} / {bc.num_attention_heads}"),
        ("patch size", str(bc.patch_size)),
        ("FFN", str(bc.ffn)),
        ("register tokens", str(bc.num_register_tokens)),
        ("position-embedding grid", f"{bc.image_size} px ({grid}×{grid})"),
    ]
    note = "" if transformers_matches_at_all_sizes(bc) else (
        "Note: this model interpolates position embeddings with the official DINOv2 0.1 offset; stock "
        "`transformers` `Dinov2Model` interpolates without it, so at resolutions other than the native grid its "
        "outputs differ slightly from the original model's (max |Δ| ≈ 0.03 measured on a small random model)."
    )
    return ("Dinov2WithRegistersModel" if bc.num_register_tokens else "Dinov2Model"), rows, note, True


def render_model_card(model: Any, backbone: Any, run: dict[str, Any], results: ResultsLike | None = None) -> str:
    """The README.md of an exported backbone (see the module docstring for `results`).

    `model` is the run's pretraining model (its `model_card_rows` describe the method's settings, its `exports`
    say whether a `pretraining/` folder sits beside), `backbone` the exported module. `run` carries the resolved
    config (`"config"`: dict) and summary values (`"model_name"`, `"step"`, `"global_batch"`, `"last_log"`,
    `"method_description"`, optionally `"repo_id"`, `"license"`).
    """
    cfg = run.get("config") or {}
    data = cfg.get("data") or {}
    dataset = str(data.get("dataset") or "unknown")
    name = public_name(run.get("model_name"), default="dinoforge backbone")
    summary = parse_results(results) if results else None
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-feature-extraction", license=run.get("license", "apache-2.0"),
        tags=list(TAGS), datasets=[dataset] if is_hub_id(dataset) else None,
        model_name=name if summary else None, eval_results=eval_results_from_results(summary) if summary else None,
    )
    hf_class, architecture, note, vit = _architecture(backbone)
    # a class of ours that is exported as itself (not converted to a transformers one) travels with its code
    remote_code = not vit and getattr(type(backbone), "_auto_class", None) is not None
    method_rows = model.model_card_rows(cfg) if hasattr(model, "model_card_rows") else {}
    exports = model.exports() if hasattr(model, "exports") else {}
    values = dict(
        model_name=name, repo_id=_usage_id(run), hf_class=hf_class, architecture=architecture, vit=vit,
        remote_code=remote_code, remote_args=", trust_remote_code=True" if remote_code else "",
        interpolation_note=note, method=cfg.get("method", "dinov2"),
        method_description=run.get("method_description") or "self-supervised pretraining",
        config_name=public_name(cfg.get("config_name"), default="custom"),
        dataset=f"`{dataset}`" if is_hub_id(dataset) else f"`{public_name(dataset)}` (local)",
        steps=run.get("step", "?"), global_batch=run.get("global_batch", "?"),
        method_rows=list(method_rows.items()), seed=(cfg.get("train") or {}).get("seed", "?"),
        pretraining_class=type(exports["pretraining"]).__name__ if "pretraining" in exports else "",
        last_metrics=_metrics_table(run.get("last_log")),
        evaluation=_evaluation_section(evaluation_markdown(summary) if summary else NO_EVALUATION),
    )
    return str(ModelCard.from_template(card_data, template_str=load_template(MODEL_CARD), **values))
