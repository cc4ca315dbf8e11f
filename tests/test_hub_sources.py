"""A Hub image-folder dataset (served by a local olah Hub) trains as the user expects: its rows are paths into the
Hub cache (or `hf://` URLs when streamed) and are opened because they are the pointed-at repo's own files."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from local_hub import local_hub
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import sys
from training.data import ImageDataset, ImageStream, load_image_dataset

def size(image, seed):
    return {"size": image.size}

ds = load_image_dataset("test-org/pics", "train")
wrapped = ImageDataset(ds, size)
sizes = [wrapped[(0, i)]["size"] for i in range(len(wrapped))]
print("map", len(sizes), sorted(set(sizes)), sorted(set(ds["label"])))
stream = ImageStream(load_image_dataset("test-org/pics", "train", streaming=True), size)
samples = list(stream)
print("stream", len(samples), sorted({s["size"] for s in samples if s}))
"""


@pytest.mark.slow  # a local Hub server and two dataset loads: about a minute
def test_hub_image_folder_rows_open(tmp_path):
    repo = tmp_path / "pics"
    for label in ("cat", "dog"):
        (repo / "train" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(repo / "train" / label / f"{label}_{i}.png")
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# pics\n")
    with local_hub(tmp_path, {("datasets", "test-org/pics"): repo}) as env:
        res = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in res.stdout.strip().splitlines())
    assert lines["map"] == "6 [(30, 20)] [0, 1]"  # every row decoded (a path into the Hub cache), labels kept
    assert lines["stream"] == "6 [(30, 20)]"  # streamed rows are hf:// URLs of this repo: fetched
