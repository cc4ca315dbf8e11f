"""probe.py end to end on a tiny stock Dinov2Model and an image folder: results.json, cache, export, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import evaluation as ev
from training.evaluation import features as ev_features

ROOT = Path(__file__).resolve().parents[1]


def _load_probe_script():
    """probe.py is a script at the repository root, not an installed module: load it by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_cli", ROOT / "probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = _load_probe_script()


def make_imagefolder(root: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """root/<split>/<class>/*.png: random crops of skimage photos that load offline (class = photo)."""
    import skimage.data as data

    photos = {"astronaut": data.astronaut(), "cat": data.chelsea(), "coffee": data.coffee()}
    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for name, array in photos.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            h, w = array.shape[:2]
            for i in range(n):
                s = int(rng.integers(min(h, w) // 3, min(h, w)))
                y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
                Image.fromarray(array[y : y + s, x : x + s]).resize((40, 36)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    tmp = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(tmp / "model")
    ev.default_image_processor(28).save_pretrained(tmp / "model")  # like an exported backbone/ folder
    data = make_imagefolder(tmp / "data", {"train": 8, "test": 4})
    return tmp, tmp / "model", data


def test_probe_cli_writes_results_and_reuses_cached_features(setup, capsys, monkeypatch):
    tmp, model, data = setup
    args = ["--model", str(model), "--dataset", str(data), "--output_dir", str(tmp / "out"), "--num_workers", "0",
            "--batch_size", "8", "--cache_dir", str(tmp / "cache"), "--no_progress", "--linear_epochs", "20"]
    assert probe.main(args) == 0
    results = json.loads((tmp / "out" / "results.json").read_text())
    assert list(results) == ["model", "dataset", "num_train", "num_test", "knn", "linear"]
    assert results["num_train"] == 24 and results["num_test"] == 12
    assert list(results["knn"]) == ["10", "20", "100", "200"]
    assert list(results["linear"]) == ["cls", "cls_avgpool"]
    for block in [*results["knn"].values(), *results["linear"].values()]:
        assert set(block) == {"top1", "top5"} and 0.0 <= block["top1"] <= block["top5"] <= 100.0
    details = json.loads((tmp / "out" / "details.json").read_text())
    assert details["class_names"] == ["astronaut", "cat", "coffee"]
    assert details["image_processor"]["crop_size"] == {"height": 28, "width": 28}  # the folder's own processor
    table = capsys.readouterr().out
    assert "k-NN k=20" in table and "linear CLS+mean-patch" in table

    cached = sorted((tmp / "cache").iterdir())
    assert len(cached) == 2  # train + test

    def no_forward(*a, **k):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(ev_features, "forward_features", no_forward)
    assert probe.main(args) == 0
    assert json.loads((tmp / "out" / "results.json").read_text()) == results
    assert sorted((tmp / "cache").iterdir()) == cached


def test_exported_classifier_matches_probe_in_pipeline(setup):
    from transformers import AutoModelForImageClassification, pipeline

    tmp, model, data = setup
    out = ev.run_probe(ev.ProbeConfig(
        model=model, dataset=data, output_dir=tmp / "out_export", num_workers=0, use_cache=False, progress=False,
        export_classifier=True, linear=ev.LinearProbeConfig(epochs=20, min_steps=200),
    ))
    folder = tmp / "out_export" / "classifier"
    clf = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(clf).__name__ == "Dinov2ForImageClassification"
    assert clf.config.id2label == {0: "astronaut", 1: "cat", 2: "coffee"}

    head = out.heads["cls_avgpool"]
    test = out.features["test"]
    expected = [out.class_names[i] for i in ev.rank_classes(head(test.features("cls_avgpool")), 1)[:, 0].tolist()]
    import datasets

    images = list(datasets.load_dataset("imagefolder", data_dir=str(data), split="test")["image"])
    classify = pipeline("image-classification", model=str(folder), device="cpu")
    predicted = [r[0]["label"] for r in classify(images, top_k=1)]
    assert predicted == expected
    processor = classify.image_processor
    with torch.no_grad():
        logits = clf(**processor(images, return_tensors="pt")).logits
    torch.testing.assert_close(logits, head(test.features("cls_avgpool")), atol=1e-4, rtol=1e-4)


def test_probe_cli_clear_errors(setup, tmp_path, capsys):
    import datasets

    _, model, data = setup
    unlabelled = datasets.load_dataset("imagefolder", data_dir=str(data)).remove_columns("label")
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    common = ["--model", str(model), "--output_dir", str(tmp_path / "o"), "--num_workers", "0", "--no_cache"]
    assert probe.main([*common, "--dataset", str(tmp_path / "unlabelled")]) == 2
    assert "no label column 'label'" in capsys.readouterr().err
    assert probe.main([*common, "--dataset", str(data), "--image_size", "30"]) == 2
    assert "not a multiple of the patch size 14" in capsys.readouterr().err
    assert probe.main([*common, "--dataset", str(data), "--test_split", "validation"]) == 2
    assert "validation" in capsys.readouterr().err
    assert probe.main([*common, "--dataset", str(data), "--model", str(tmp_path / "missing")]) == 2
    assert "could not load model" in capsys.readouterr().err


def test_probe_script_runs_from_anywhere(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "probe.py"), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--output_dir" in proc.stdout and "--label_column" in proc.stdout


def test_probe_cli_cache_limit_and_clear(setup, tmp_path):
    tmp, model, data = setup
    cache = tmp_path / "cache"
    common = ["--model", str(model), "--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--num_workers",
              "0", "--batch_size", "12", "--no_progress", "--linear_epochs", "5", "--cache_dir", str(cache)]
    assert probe.main([*common, "--cache_max_gb", "1e-9"]) == 0  # ~1 byte: only the newest entry (test) stays
    (kept,) = cache.iterdir()
    assert json.loads((tmp_path / "out" / "details.json").read_text())["num_classes"] == 3
    (cache / "features-stale.safetensors").write_bytes(b"from an older run")
    (cache / "keep.txt").write_text("not a cache file")
    assert probe.main([*common, "--clear_cache"]) == 0
    names = sorted(p.name for p in cache.iterdir())
    assert "features-stale.safetensors" not in names and "keep.txt" in names
    assert len([n for n in names if n.startswith("features-")]) == 2  # train + test, recomputed
    assert probe.main([*common, "--cache_max_gb", "-1"]) == 2


def test_probe_cli_update_model_card(setup, tmp_path, capsys):
    from huggingface_hub import ModelCard

    tmp, model, data = setup
    common = ["--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--num_workers", "0", "--no_cache",
              "--no_progress", "--linear_epochs", "5", "--update_model_card"]
    assert probe.main([*common, "--model", "my-org/not-a-folder"]) == 2  # refused before any work
    assert "needs a local model folder" in capsys.readouterr().err
    import shutil

    folder = tmp_path / "backbone"
    shutil.copytree(model, folder)
    assert probe.main([*common, "--model", str(folder)]) == 0
    card = ModelCard((folder / "README.md").read_text())
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    metrics = {r.metric_config: r.metric_value for r in card.data.eval_results}
    assert metrics["knn-k20-top1"] == round(results["knn"]["20"]["top1"], 2)
    assert metrics["linear-cls_avgpool-top5"] == round(results["linear"]["cls_avgpool"]["top5"], 2)
    assert str(tmp_path) not in str(card)
