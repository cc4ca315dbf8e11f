"""The two-view methods' acceptance runs: each `configs/<method>_quickstart.yaml` (270 steps, 1.5-2 minutes on 2
CPU cores) trains on the sample images and its end-of-run kNN top-1 beats a random-init backbone of the same shape
by at least 10 points."""

import json

import pytest
import yaml
from two_view_helpers import ROOT, train


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov3", "barlow_twins", "densecl"])
def test_quickstart_beats_random_init(method, tmp_path):
    config = yaml.safe_load((ROOT / "configs" / f"{method}_quickstart.yaml").read_text())
    out = tmp_path / "run"
    train(config, tmp_path, f"train.output_dir={out}", timeout=900)
    knn = json.loads((out / "summary.json").read_text())["knn"]
    assert knn["trained"]["knn/top1"] >= knn["random_init"]["knn/top1"] + 10, knn
