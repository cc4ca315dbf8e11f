"""Model and dataset cards: built with huggingface_hub, parse back, model-index from either results shape, no local
paths or placeholder links, templates shipped in the `model_cards` package."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import DatasetCard, ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from training.model_card import (
    EVAL_BEGIN,
    evaluation_markdown,
    model_index_from_results,
    parse_results,
    render_model_card,
    update_model_card,
)

ROOT = Path(__file__).resolve().parents[1]

PROBE_RESULTS = {
    "model": "outputs/vits14/backbone", "dataset": "my-org/labelled", "num_train": 100, "num_test": 50,
    "knn": {k: {"top1": 10.0 + i, "top5": 50.0 + i} for i, k in enumerate(["10", "20", "100", "200"])},
    "linear": {"cls": {"top1": 70.123, "top5": 90.0}, "cls_avgpool": {"top1": 72.0, "top5": 91.0}},
}


def training_results(dataset: str = "sample") -> dict:
    """The shape `training/run.py` passes: the flat dicts of `knn_eval` for the trained and a random-init backbone."""
    trained = {"knn/top1": 61.25, "knn/top5": 93.5, "knn/k10/top1": 60.0, "knn/k10/top5": 92.0,
               "knn/k20/top1": 61.25, "knn/k20/top5": 93.5}
    baseline = {"knn/top1": 33.33, "knn/top5": 80.0, "knn/k10/top1": 31.0, "knn/k10/top5": 79.0,
                "knn/k20/top1": 33.33, "knn/k20/top5": 80.0}
    return {"dataset": dataset, "split": "test", "knn": trained, "random_init": baseline}


def assert_public(text: str, *local: Path) -> None:
    """No local absolute path and no placeholder link anywhere in a card."""
    for path in local:
        assert str(path) not in text
    for prefix in ("/home", "/tmp", "/root", "/work"):
        assert not re.search(rf"(?<![\w.-]){re.escape(prefix)}/", text), prefix
    assert "https://github.com/" not in text


def tiny_model():
    from test_pretraining import tiny_config

    from modeling import DinoForPretraining

    torch.manual_seed(0)
    return DinoForPretraining(tiny_config())


def run_info(tmp_path: Path, **hub) -> dict:
    """What training/run.py passes, with local absolute paths where a user's run has them."""
    return {
        "config": {
            "config_name": "quickstart", "data": {"dataset": str(tmp_path / "my_images")},
            "crops": {"global_size": 28, "local_size": 14, "local_number": 2}, "train": {"seed": 0},
            "hub": {"push": False, "model_id": None, "private": False, **hub},
        },
        "step": 3, "global_batch": 8, "model_name": hub.get("model_id") or "dinoforge-quickstart",
        "repo_id": hub.get("model_id") or str(tmp_path / "run" / "backbone"),
        "last_log": {"step": 3, "loss": 10.5, "dino_local_loss": 6.25, "ibot_loss": 4.0, "lr": 1e-4,
                     "images_per_s": 12.3456, "teacher_entropy": 4.1},
    }


# --------------------------------------------------------------------------------------------------------------
# model-index


def test_model_index_from_probe_results_follows_hub_schema(tmp_path):
    from huggingface_hub import ModelCardData

    index = model_index_from_results(PROBE_RESULTS, model_name="dinoforge-vits14")
    assert index[0]["name"] == "dinoforge-vits14"
    (entry,) = index[0]["results"]
    assert entry["task"] == {"type": "image-classification", "name": "Image Classification"}
    assert entry["dataset"] == {"name": "labelled", "type": "my-org/labelled", "split": "test"}
    metrics = {m["config"]: m for m in entry["metrics"]}
    assert set(metrics) == {"knn-k20-top1", "knn-k20-top5", "linear-cls-top1", "linear-cls-top5",
                            "linear-cls_avgpool-top1", "linear-cls_avgpool-top5"}
    assert metrics["knn-k20-top1"]["value"] == 11.0 and metrics["knn-k20-top1"]["type"] == "accuracy"
    assert metrics["linear-cls-top1"]["value"] == 70.12
    name, evals = model_index_to_eval_results(index)  # parses back with huggingface_hub's own reader
    assert name == "dinoforge-vits14" and len(evals) == 6
    assert "k-NN top-1 (k=20, frozen)" in ModelCardData(model_name=name, eval_results=evals).to_yaml()
    path = tmp_path / "results.json"
    path.write_text(json.dumps(PROBE_RESULTS))
    assert model_index_from_results(path)[0]["name"] == "backbone"  # a path's folder name, never the path


def test_model_index_from_training_knn_summary(tmp_path):
    results = training_results(str(tmp_path / "eval_images"))
    index = model_index_from_results(results, model_name="dinoforge-quickstart")
    name, evals = model_index_to_eval_results(index)
    assert name == "dinoforge-quickstart"
    assert {(e.metric_config, e.metric_value) for e in evals} == {("knn-k20-top1", 61.25), ("knn-k20-top5", 93.5)}
    assert {(e.dataset_type, e.dataset_name, e.dataset_split) for e in evals} == {("eval_images",) * 2 + ("test",)}
    assert 33.33 not in {e.metric_value for e in evals}  # the random-init baseline is not a result of this model
    table = evaluation_markdown(results)
    assert "| k-NN k=20 (headline) | 61.25 | 93.50 | 33.33 | 80.00 |" in table
    assert "| k-NN k=10 | 60.00 | 92.00 | 31.00 | 79.00 |" in table
    assert_public(json.dumps(index) + table, tmp_path)
    summary = parse_results({k: v for k, v in results.items() if k != "random_init"})
    assert summary.random_init is None and summary.knn["20"] == {"top1": 61.25, "top5": 93.5}
    with pytest.raises(ValueError, match="probe results.json dict .* or a training k-NN summary"):
        parse_results({"trained": results["knn"]})


# --------------------------------------------------------------------------------------------------------------
# model card of an export


def test_export_card_parses_back_with_run_knn_and_no_local_paths(tmp_path):
    from training.export import export_run

    paths = export_run(tiny_model(), tmp_path / "run", run_info(tmp_path), training_results())
    text = (paths["backbone"] / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: transformers")
    card = ModelCard.load(paths["backbone"] / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-feature-extraction"
    assert data.license == "apache-2.0" and "dinov2" in data.tags
    assert data.datasets is None  # a local training folder is not a Hub dataset
    assert data.model_name == "dinoforge-quickstart"
    assert {e.metric_config: e.metric_value for e in data.eval_results} == {"knn-k20-top1": 61.25,
                                                                           "knn-k20-top5": 93.5}
    assert 'AutoModel.from_pretrained("path/to/backbone")' in text
    assert "| data | `my_images` (local) |" in text
    assert "| loss | 10.5 |" in text and "| dino local loss | 6.25 |" in text and "| images per s | 12.35 |" in text
    assert "teacher_entropy" not in text and '"loss": 10.5' not in text  # a few keys as a table, not a JSON dump
    assert "No evaluation was run" not in text and "| k-NN k=20 (headline) | 61.25 | 93.50 | 33.33 | 80.00 |" in text
    assert_public(text, tmp_path)


def test_card_with_hub_ids_links_them():
    run = run_info(Path("/home/someone/runs"), model_id="my-org/dino-tiny")
    run["config"]["data"]["dataset"] = "my-org/images"
    card = ModelCard(render_model_card(model := tiny_model(), model.teacher_backbone, run))
    assert card.data.datasets == ["my-org/images"]
    assert 'AutoModel.from_pretrained("my-org/dino-tiny")' in card.text
    assert card.data.eval_results is None and "No evaluation was run" in card.text
    assert_public(str(card))


def test_update_model_card_accepts_both_shapes_and_replaces_its_section(tmp_path):
    (tmp_path / "README.md").write_text("---\nlibrary_name: transformers\nlicense: mit\n---\n\n# My model\n\nText.\n")
    update_model_card(tmp_path, training_results())
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "mit" and "# My model" in card.text and "Text." in card.text
    assert card.data.model_name == "My model"  # from the card's title
    assert {e.metric_config for e in card.data.eval_results} == {"knn-k20-top1", "knn-k20-top5"}
    assert "33.33" in card.text

    update_model_card(tmp_path, PROBE_RESULTS, model_name="renamed")  # a later probe replaces the run's k-NN
    text = (tmp_path / "README.md").read_text()
    card = ModelCard(text)
    assert text.count(EVAL_BEGIN) == 1 and text.count("## Evaluation") == 1 and "33.33" not in text
    assert card.data.model_name == "renamed" and len(card.data.eval_results) == 6
    assert "| linear CLS+mean-patch | 72.00 | 91.00 |" in text

    fresh = tmp_path / "fresh"  # no card yet: one is created
    fresh.mkdir()
    assert ModelCard.load(update_model_card(fresh, PROBE_RESULTS)).data.model_name == "backbone"


# --------------------------------------------------------------------------------------------------------------
# dataset card


def test_dataset_card_parses_back_without_local_paths(tmp_path):
    from curation.config import CurateConfig, SourceConfig
    from curation.output import render_card

    cfg = CurateConfig(
        sources=[SourceConfig(name="web", path=str(tmp_path / "crawl")), SourceConfig(name="hub", dataset="org/imgs")],
        seeds=[SourceConfig(name="seedset", path=str(tmp_path / "seeds" / "imagenet_like"))],
    )
    stats = {"num_rows": 7, "steps": [{"step": "validate", "rows_in": 10, "rows_kept": 9, "rows_removed": 1}]}
    models = {"copy_detection": str(tmp_path / "models" / "sscd"), "embed": "facebook/dinov2-base"}
    text = render_card(cfg, stats, models)
    card = DatasetCard(text)
    assert card.data.license == "other" and card.data.size_categories == ["n<1K"]
    assert card.data.configs[0]["data_files"][0]["path"] == "data/train-*.parquet"
    assert card.data.to_dict()["dinoforge"] == {"copy_detection": "sscd", "embed": "facebook/dinov2-base"}
    assert "`web` (local: crawl)" in text and "`hub` (org/imgs)" in text and "`seedset` (local: imagenet_like)" in text
    assert "| validate | 10 | 9 | 1 |" in text
    assert_public(text, tmp_path)


# --------------------------------------------------------------------------------------------------------------
# templates ship inside the package


def test_templates_load_from_the_installed_package_not_the_repo(tmp_path):
    """Copy `model_cards` into a zip (as an installed, zipped package would be) and render both cards from it in a
    fresh interpreter: any repo-relative template path would still read the repo, importlib.resources reads the zip."""
    archive = tmp_path / "cards.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in (ROOT / "model_cards").iterdir():
            if f.is_file() and f.suffix in (".py", ".md"):
                text = f.read_text()
                if f.suffix == ".md":
                    text = text.replace("## Evaluation", "## Evaluation (zipped template)")
                    text = text.replace("## Settings", "## Settings (zipped template)")
                z.writestr(f"model_cards/{f.name}", text)
    code = f"""
import sys
sys.path[:0] = [{str(archive)!r}, {str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import model_cards
assert model_cards.__file__.startswith({str(archive)!r}), model_cards.__file__
from test_cards import tiny_model, run_info
from pathlib import Path
from training.model_card import render_model_card
from curation.config import CurateConfig
from curation.output import render_card
assert "## Evaluation (zipped template)" in render_model_card(m := tiny_model(), m.teacher_backbone, run_info(Path("/x")))
stats = {{"num_rows": 1, "steps": []}}
assert "## Settings (zipped template)" in render_card(CurateConfig(), stats, {{}})
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")
