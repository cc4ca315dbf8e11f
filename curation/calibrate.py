"""Copy-detection thresholds from data: plant edited copies of pool images and pick the cosine threshold that
reaches a target precision on them.

    python -m curation.calibrate --model OUT/backbone --dataset FOLDER [--target_precision 0.99] [--output t.json]

`--num_images` images are sampled from the pool, minus those that curate.py's earlier steps would already have
merged or that are the same picture anyway (pixel-identical, pHash within `--phash_max_distance` of an earlier one,
or a 16x16 grey thumbnail within 2/255 on average, e.g. two flat black images whose pHash is noise): as
"non-pairs" they would cap the reachable precision); each gets one copy made by the training edits
(`training/data/copy_edits.py`, seeds far from any training seed; with `--mix_probability` another pool image is
pasted in). Every (original, copy) similarity is scored: the planted pairs are positives, every other
(original, copy) pair and every pair of distinct originals a negative. The threshold is the lowest one at which the
pairs scoring above it (curation flags `cosine > threshold`) are at least `target_precision` planted pairs; the
json records it with its precision and recall, and the command prints the `curate.py` override to use. The
threshold is only a starting point, as any threshold in `configs/curate.yaml`: the override can still be changed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Calibration copies use seeds from here on: training derives its per-sample seeds with `derive_seed`, so the
# planted copies are other draws of the same edit distribution.
CALIBRATION_SEED_BASE = 7_000_000_000


@dataclass
class Calibration:
    threshold: float
    target_precision: float
    precision: float
    recall: float
    num_images: int
    num_positive_pairs: int
    num_negative_pairs: int
    model: str
    dataset: str
    seed: int
    reached: bool  # False: no threshold reaches the target; the threshold then flags nothing
    dropped_duplicates: int = 0  # sampled images dropped as exact / pHash duplicates of another sampled one

    def override(self, key: str = "dedup.copy_detection.threshold") -> str:
        return f"{key}={self.threshold:.4f}"


def pick_threshold(positive: np.ndarray, negative: np.ndarray, target_precision: float) -> tuple[float, float, float,
                                                                                                bool]:
    """(threshold, precision, recall, reached): the lowest threshold t such that the pairs with score > t are at
    least `target_precision` positives (maximum recall at that precision). When even the top-scoring pair is a
    negative, t = the highest score (nothing flagged), precision 1 (vacuous), recall 0, reached False."""
    scores = np.concatenate([positive, negative]).astype(np.float64)
    labels = np.concatenate([np.ones(len(positive), bool), np.zeros(len(negative), bool)])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    tp = np.cumsum(labels)
    precision = tp / np.arange(1, len(scores) + 1)
    # a cut after position k flags exactly the top k + 1 only where the next score is strictly lower
    distinct = np.append(scores[:-1] > scores[1:], True)
    ok = np.flatnonzero((precision >= target_precision) & distinct)
    if len(ok) == 0:
        return float(scores[0]) if len(scores) else 1.0, 1.0, 0.0, False
    k = int(ok[-1])
    below = scores[k + 1] if k + 1 < len(scores) else scores[k] - 1e-3
    threshold = float((scores[k] + below) / 2)  # midway: robust to the fp16 rounding of stored embeddings
    return threshold, float(precision[k]), float(tp[k] / max(1, len(positive))), True


def planted_copies(images: list[Any], seed: int, mix_probability: float = 0.0, style: str = "train") -> list[Any]:
    """One edited copy of each image (the training edits), deterministic in `seed`."""
    from training.data.copy_edits import CopyEditAugmentation, paste_image

    augmentation = CopyEditAugmentation(style=style)  # type: ignore[arg-type]
    copies = []
    for i, image in enumerate(images):
        s = CALIBRATION_SEED_BASE + seed * 1_000_003 + i
        copy = augmentation.edit_image(image, s)
        rng = random.Random(s)
        if mix_probability and len(images) > 1 and rng.random() < mix_probability:
            copy = paste_image(copy, images[(i + rng.randint(1, len(images) - 1)) % len(images)], rng)
        copies.append(copy)
    return copies


def sample_images(dataset: str, num_images: int, seed: int, image_column: str = "image",
                  split: str = "train") -> list[Any]:
    """`num_images` decoded RGB images drawn without replacement (all when the pool is smaller)."""
    from training.data import load_image_dataset
    from training.data.decode import decode_image

    ds = load_image_dataset(dataset, split=split, image_column=image_column)
    import datasets

    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    rows = sorted(random.Random(seed).sample(range(len(ds)), min(num_images, len(ds))))
    return [decode_image(ds[r][image_column], max_pixels=None) for r in rows]


def distinct_images(images: list[Any], phash_max_distance: int | None = 6) -> list[Any]:
    """`images` without those pixel-identical to, (with a distance) pHash-close to (also against the mirrored
    hash), or with nearly the same 16x16 grey thumbnail as an earlier one."""
    import hashlib

    from PIL import ImageOps

    from .validate import phash_int

    kept, seen, hashes, thumbs = [], set(), [], []
    for image in images:
        rgb = image.convert("RGB")
        digest = hashlib.sha256(rgb.tobytes() + repr(rgb.size).encode()).hexdigest()
        thumb = np.asarray(rgb.convert("L").resize((16, 16)), dtype=np.float32)
        if digest in seen or any(np.abs(thumb - t).mean() <= 2.0 for t in thumbs):
            continue
        if phash_max_distance is not None:
            h, hf = phash_int(rgb), phash_int(ImageOps.mirror(rgb))
            if any(min(bin(h ^ o).count("1"), bin(hf ^ o).count("1")) <= phash_max_distance for o in hashes):
                continue
            hashes.append(h)
        seen.add(digest)
        thumbs.append(thumb)
        kept.append(image)
    return kept


def calibrate(model: str, dataset: str, target_precision: float = 0.99, num_images: int = 200, seed: int = 0,
              mix_probability: float = 0.15, batch_size: int = 64, device: str = "cpu",
              images: list[Any] | None = None, style: str = "train",
              phash_max_distance: int | None = 6) -> Calibration:
    """Plant copies, embed originals and copies with `model` (as curate.py does), pick the threshold."""
    from .embed import Embedder, resolve_model

    if images is None:
        images = sample_images(dataset, num_images, seed)
    sampled = len(images)
    images = distinct_images(images, phash_max_distance)
    if len(images) < 2:
        raise ValueError(f"calibration needs at least 2 images, got {len(images)}")
    copies = planted_copies(images, seed, mix_probability, style)
    embedder = Embedder(resolve_model(model, "--model"), device=device)

    def embed(batch: list[Any]) -> np.ndarray:
        return np.concatenate([embedder(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)])

    originals, planted = embed(images), embed(copies)
    cross = originals @ planted.T  # [original, copy]
    among = originals @ originals.T
    n = len(images)
    positive = np.diag(cross)
    off = ~np.eye(n, dtype=bool)
    negative = np.concatenate([cross[off], among[np.triu_indices(n, k=1)]])
    threshold, precision, recall, reached = pick_threshold(positive, negative, target_precision)
    return Calibration(threshold=threshold, target_precision=target_precision, precision=precision, recall=recall,
                       num_images=n, num_positive_pairs=len(positive), num_negative_pairs=len(negative),
                       model=str(model), dataset=str(dataset), seed=seed, reached=reached,
                       dropped_duplicates=sampled - n)


def main(argv: list[str] | None = None) -> Calibration:
    parser = argparse.ArgumentParser(prog="python -m curation.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (e.g. a copy_detection run's OUT/backbone)")
    parser.add_argument("--dataset", required=True, help="pool images: folder, save_to_disk dir, shards, 'sample'")
    parser.add_argument("--target_precision", type=float, default=0.99)
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--mix_probability", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phash_max_distance", type=int, default=6, help="as dedup.phash_max_distance; -1: off")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="copy_detection_threshold.json", help="json written here")
    args = parser.parse_args(argv)
    result = calibrate(args.model, args.dataset, args.target_precision, args.num_images, args.seed,
                       args.mix_probability, args.batch_size, args.device,
                       phash_max_distance=None if args.phash_max_distance < 0 else args.phash_max_distance)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**asdict(result), "override": result.override()}, indent=2) + "\n")
    if not result.reached:
        print(f"[calibrate] no threshold reaches precision {args.target_precision}: the highest-scoring pair is "
              f"not a planted copy; the threshold flags nothing", file=sys.stderr)
    print(f"[calibrate] threshold {result.threshold:.4f}: precision {result.precision:.4f}, recall "
          f"{result.recall:.4f} on {result.num_positive_pairs} planted / {result.num_negative_pairs} other pairs "
          f"-> {out}", file=sys.stderr)
    print(result.override())
    return result


if __name__ == "__main__":
    main()
