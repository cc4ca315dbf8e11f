"""Near-duplicate detection on real photos with copies made by *held-out* edits: pHash alone vs pHash + a trained
copy detector, as curate.py's dedup combines them (an edge from either, duplicates = connected components).

    python benchmarks/copy_detection.py --model OUT/backbone --threshold 0.8 [--tile 128] [--copies 2] [--seed 0]

Originals: non-overlapping tiles of scikit-image photos that the `sample` training set does not use (files
inside the installed package). Copies: `copies` per original by the edit chain with `style="heldout"` (TrueType
fonts, star / ring / stripe logos, striped borders, corner-anchored crops: families the training edits never
draw), a quarter of them with another original pasted in. Reported: pairwise precision / recall of "same
component" against "same original", for pHash (Hamming ≤ `--phash_max_distance`, also against the mirrored hash,
as curate.py), the detector alone, and both; plus the detector's own best-F1 threshold for reference.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# run as a script: the repository root, not benchmarks/ (whose curation.py would shadow the package)
sys.path[:1] = [str(Path(__file__).resolve().parents[1])]

PHOTOS = ("brick", "clock", "cell", "colorwheel", "grass", "page", "text")  # not in training/sample_data.py


def originals(tile: int) -> list[Image.Image]:
    import skimage.data

    out = []
    for name in PHOTOS:
        photo = Image.fromarray(np.ascontiguousarray(getattr(skimage.data, name)())).convert("RGB")
        for y in range(0, photo.height - tile + 1, tile):
            for x in range(0, photo.width - tile + 1, tile):
                out.append(photo.crop((x, y, x + tile, y + tile)))
    return out


def near_duplicate_set(tile: int, copies: int, seed: int) -> tuple[list[Image.Image], np.ndarray]:
    """(images, group of each image): the originals then their held-out copies."""
    from training.data.copy_edits import CopyEditAugmentation, paste_image

    base = originals(tile)
    augmentation = CopyEditAugmentation(style="heldout")
    images, groups = list(base), list(range(len(base)))
    for i, image in enumerate(base):
        for c in range(copies):
            s = 9_000_000_000 + seed * 100_003 + i * copies + c
            copy = augmentation.edit_image(image, s)
            rng = random.Random(s)
            if rng.random() < 0.25:
                copy = paste_image(copy, base[(i + rng.randint(1, len(base) - 1)) % len(base)], rng)
            images.append(copy)
            groups.append(i)
    return images, np.array(groups)


def components(n: int, edges: np.ndarray) -> np.ndarray:
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in edges:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[ra] = rb
    return np.array([find(i) for i in range(n)])


def pairwise(labels: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    iu = np.triu_indices(len(groups), k=1)
    predicted = (labels[:, None] == labels[None])[iu]
    truth = (groups[:, None] == groups[None])[iu]
    tp = int((predicted & truth).sum())
    return {"precision": tp / max(1, int(predicted.sum())), "recall": tp / max(1, int(truth.sum())),
            "predicted_pairs": int(predicted.sum()), "true_pairs": int(truth.sum())}


def phash_pairs(images: list[Image.Image], max_distance: int) -> np.ndarray:
    from curation.validate import phash_int

    h = np.array([phash_int(im) for im in images], dtype=np.uint64)
    hf = np.array([phash_int(ImageOps.mirror(im)) for im in images], dtype=np.uint64)

    def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        x = a[:, None] ^ b[None]
        return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)

    close = (hamming(h, h) <= max_distance) | (hamming(h, hf) <= max_distance)
    a, b = np.nonzero(np.triu(close, k=1))
    return np.stack([a, b], 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threshold", type=float, required=True, help="cosine > threshold: a duplicate edge")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phash_max_distance", type=int, default=6)
    args = parser.parse_args(argv)

    from curation.embed import Embedder, resolve_model

    images, groups = near_duplicate_set(args.tile, args.copies, args.seed)
    n = len(images)
    ph = phash_pairs(images, args.phash_max_distance)
    embedder = Embedder(resolve_model(args.model, "--model"))
    v = np.concatenate([embedder(images[i : i + 64]) for i in range(0, n, 64)])
    sims = v @ v.T
    a, b = np.nonzero(np.triu(sims > args.threshold, k=1))
    cd = np.stack([a, b], 1)
    result = {"images": n, "originals": int(groups.max() + 1), "seed": args.seed, "threshold": args.threshold,
              "phash_only": pairwise(components(n, ph), groups),
              "detector_only": pairwise(components(n, cd), groups),
              "phash_and_detector": pairwise(components(n, np.concatenate([ph, cd])), groups)}
    iu = np.triu_indices(n, k=1)
    truth, scores = (groups[:, None] == groups[None])[iu], sims[iu]
    best = (0.0, 0.0, 0.0, 0.0)
    for t in np.unique(np.round(scores, 3)):
        flagged = scores > t
        tp = (flagged & truth).sum()
        p, r = tp / max(1, flagged.sum()), tp / truth.sum()
        f1 = 2 * p * r / max(1e-9, p + r)
        best = max(best, (f1, float(t), float(p), float(r)))
    result["detector_edges_best_f1"] = dict(zip(("f1", "threshold", "precision", "recall"), best))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
