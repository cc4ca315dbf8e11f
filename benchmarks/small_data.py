"""Does a recipe learn *content* on a small dataset? kNN top-1 on the `objects` set against strong baselines.

    python benchmarks/small_data.py [--config configs/small_data.yaml] [--seeds 0 1 2] [--out outputs/small_data]
    python benchmarks/small_data.py --config configs/dinov2_small_data.yaml   # the DINOv2 attempt

The `objects` set (training/objects_data.py, built offline) labels each image by the shape pasted on it; the
backgrounds are crops of real photos, disjoint between train and test, and colour, scale, rotation and position are
random — so colour/texture statistics and photo identity do not solve it. Rows of the table (kNN, k = 20, the
official weighted-vote protocol, on the same preprocessed test images):

- raw pixels (flattened, mean-centred per image) and HOG (scikit-image, 8×8-px cells) — strong non-learned
  baselines;
- a randomly initialised backbone of the recipe's architecture (seed 0);
- the recipe trained with `train.py` once per seed (its own end-of-run kNN, the same protocol), with wall time.

Chance is 10 % (ten classes). Never part of the test run: a recipe run takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.evaluation import default_image_processor, knn_classify  # noqa: E402


def _pixels(dataset, processor) -> tuple[np.ndarray, torch.Tensor]:
    """uint8 HxWx3 arrays after the evaluation's own resize + centre crop (no normalisation), and the labels."""
    from training.data import decode_image

    images, labels = [], []
    for row in dataset:
        out = processor(images=[decode_image(row["image"])], return_tensors="np", do_rescale=False,
                        do_normalize=False)["pixel_values"][0]
        images.append(np.clip(np.rint(out.transpose(1, 2, 0)), 0, 255).astype(np.uint8))
        labels.append(row["label"])
    return np.stack(images), torch.tensor(labels)


def _knn_top1(train: np.ndarray, train_labels, test: np.ndarray, test_labels) -> float:
    result = knn_classify(torch.from_numpy(train).float(), train_labels, torch.from_numpy(test).float(), test_labels,
                          ks=(20,))
    return result["20"]["top1"]


def baselines(image_size: int) -> dict[str, float]:
    from skimage.feature import hog

    from training.data import load_image_dataset

    processor = default_image_processor(image_size)
    train, y_train = _pixels(load_image_dataset("objects", "train"), processor)
    test, y_test = _pixels(load_image_dataset("objects", "test"), processor)

    def raw(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1).astype(np.float32)
        return flat - flat.mean(1, keepdims=True)

    def hog_features(x: np.ndarray) -> np.ndarray:
        return np.stack([hog(im.mean(-1), orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2))
                         for im in x]).astype(np.float32)

    return {"raw pixels": _knn_top1(raw(train), y_train, raw(test), y_test),
            "HOG": _knn_top1(hog_features(train), y_train, hog_features(test), y_test)}


def train_recipe(config: Path, seed: int, out: Path, overrides: list[str]) -> dict:
    output_dir = out / f"{config.stem}-seed{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(config), f"train.seed={seed}",
           f"train.output_dir={output_dir}", "train.resume=never", "data.eval_dataset=objects", *overrides]
    start = time.time()
    # Passive OpenMP waits: the main process's threads sleep instead of spinning while the data worker has a core
    # (a small CNN on 2 cores: 0.22 s a step instead of 0.30; docs/small_data.md). Must be set before torch loads.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    if res.returncode != 0:
        raise SystemExit(f"training failed:\n{res.stderr[-4000:]}")
    knn = json.loads((output_dir / "summary.json").read_text())["knn"]
    return {"seed": seed, "seconds": seconds, "trained": knn["trained"]["knn/top1"],
            "random_init": knn["random_init"]["knn/top1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "small_data.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "small_data")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for the recipe")
    args = parser.parse_args()

    from training.methods import load_train_config

    cfg = load_train_config(["--config", str(args.config), *args.overrides])
    rows = [(name, value, "") for name, value in baselines(cfg.crops.global_size).items()]
    runs = [train_recipe(args.config, seed, args.out, args.overrides) for seed in args.seeds]
    rows.append(("random-init backbone", runs[0]["random_init"], "same architecture, seed 0"))
    for run in runs:
        gain = run["trained"] - run["random_init"]
        rows.append((f"{args.config.stem} (seed {run['seed']})", run["trained"],
                     f"{run['seconds'] / 60:.1f} min; its random init {run['random_init']:.1f} ({gain:+.1f})"))
    print(f"\nkNN top-1 (k=20) on objects/test, 10 classes (chance 10 %); image size {cfg.crops.global_size}")
    print(f"{'features':<34}{'top-1 %':>9}  note")
    for name, value, note in rows:
        print(f"{name:<34}{value:>9.1f}  {note}")
    (args.out / "small_data.json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
