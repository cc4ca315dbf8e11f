"""Near-duplicate detection on real photos with copies made by *held-out* edits: pHash alone vs pHash + a trained
copy detector, as curate.py's dedup and decontamination combine them (an edge from either; duplicates = connected
components; a pool image is contaminated when linked to an eval image).

    python benchmarks/copy_detection.py --write_pool POOL                   # the set as an image folder
    python benchmarks/copy_detection.py --model OUT/backbone --threshold 0.8 [--copies 3] [--stack] [--seed 0]

Originals: non-overlapping tiles of scikit-image photos (files inside the installed package; see PHOTOS for which
and why). The detector may be trained on the pool itself (self-supervised: it never sees which image is a copy
of which). Copies: `copies` per original, each made by one edit of `style="heldout"` (TrueType fonts, star / ring /
stripe logos, striped borders, corner-anchored crops: families the training edits never draw; 13 kinds, dealt
evenly), or with `--stack` by the whole chain at once. Reported: pairwise precision / recall of "same component" against
"same original" for pHash (Hamming ≤ `--phash_max_distance`, also against the mirrored hash, as curate.py), the
detector alone and both; recall per edit; decontamination precision / recall (eval set = the even-numbered
originals, pool = the rest); and the detector's own best-F1 threshold for reference.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# run as a script: the repository root, not benchmarks/ (whose curation.py would shadow the package)
sys.path[:1] = [str(Path(__file__).resolve().parents[1])]

# Photos of scenes, objects and documents inside the installed scikit-image. Texture photos (brick, grass, gravel,
# moon) are left out: a crop of one brick tile is, pixel for pixel, a crop of another, so "which original" has no
# answer (ORB + RANSAC matching found the right original for only 32 % of the copies on such a set).
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
          "stereo_motorcycle", "retina", "rocket", "page", "text", "colorwheel", "clock")


def originals(tile: int, per_photo: int = 16, min_std: float = 0.06) -> list[Image.Image]:
    """Non-overlapping `tile`-px tiles of PHOTOS; flat tiles (grey-level std < `min_std`: sky, black space, the
    empty background of a document) are not distinct images and are skipped; at most `per_photo` tiles per photo
    (a seeded choice), so no photo dominates."""
    from training.sample_data import _load_photo

    out = []
    for name in PHOTOS:
        photo = _load_photo(name).convert("RGB")
        grey = np.asarray(photo.convert("L"), dtype=np.float32) / 255
        tiles = [(x, y) for y in range(0, photo.height - tile + 1, tile) for x in range(0, photo.width - tile + 1, tile)
                 if grey[y:y + tile, x:x + tile].std() >= min_std]
        rng = random.Random(name)
        for x, y in sorted(rng.sample(tiles, min(per_photo, len(tiles)))):
            out.append(photo.crop((x, y, x + tile, y + tile)))
    return out


def near_duplicate_set(tile: int, copies: int, seed: int, stack: bool = False,
                       ) -> tuple[list[Image.Image], np.ndarray, list[list[str]]]:
    """(images, group of each image, edits made to each image): the originals (no edits) then `copies` held-out
    copies of each. Default: each copy made by one edit (the training edits' EDIT_KINDS, plus "mix": another original
    pasted in), the kinds
    dealt round-robin from a seeded shuffle so every edit gets the same number of copies. `stack`: every copy
    by the whole chain (a crop always, each other edit with its training probability, a mix a quarter of the
    time), much harder than most copies found in the wild."""
    from training.data.copy_edits import EDIT_KINDS, CopyEditAugmentation, paste_image

    base = originals(tile)
    augmentation = CopyEditAugmentation(style="heldout")
    images, groups, edits = list(base), list(range(len(base))), [[] for _ in base]
    kinds = (*EDIT_KINDS, "mix")
    deck = [kinds[j % len(kinds)] for j in range(len(base) * copies)]
    random.Random(seed).shuffle(deck)
    for i, image in enumerate(base):
        for c in range(copies):
            s = 9_000_000_000 + seed * 100_003 + i * copies + c
            rng = random.Random(s)
            applied: list[str] = []
            if stack:
                copy = augmentation.edit_image(image, s, applied=applied)
                mix = rng.random() < 0.25
            else:
                kind = deck[i * copies + c]
                mix = kind == "mix"
                copy = image if mix else augmentation.edit_image(image, s, kinds=[kind], applied=applied)
            if mix:
                copy = paste_image(copy, base[(i + rng.randint(1, len(base) - 1)) % len(base)], rng)
                applied.append("mix")
            images.append(copy)
            groups.append(i)
            edits.append(applied)
    return images, np.array(groups), edits


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


def recall_per_edit(labels: np.ndarray, groups: np.ndarray, edits: list[list[str]]) -> dict[str, str]:
    """For each edit: found / copies made with it, a copy being found when it shares a component with its
    original (row `groups[i]`: the originals come first)."""
    found = labels == labels[groups]
    out = {}
    for kind in sorted({k for e in edits for k in e}):
        rows = [i for i, e in enumerate(edits) if kind in e]
        out[kind] = f"{int(found[rows].sum())}/{len(rows)} = {found[rows].mean():.2f}"
    return out


def decontamination(close: np.ndarray, groups: np.ndarray, n_originals: int) -> dict[str, float]:
    """Eval set = the even-numbered originals; pool = everything else. A pool image is flagged when `close`
    links it to an eval image; it is contaminated when it is a copy of one."""
    is_eval = np.zeros(len(groups), dtype=bool)
    is_eval[:n_originals] = np.arange(n_originals) % 2 == 0
    pool = ~is_eval
    flagged = close[:, is_eval].any(axis=1) & pool
    truth = pool & (groups % 2 == 0)
    tp = int((flagged & truth).sum())
    return {"precision": tp / max(1, int(flagged.sum())), "recall": tp / max(1, int(truth.sum())),
            "flagged": int(flagged.sum()), "contaminated": int(truth.sum())}


def phash_close(images: list[Image.Image], max_distance: int) -> np.ndarray:
    """[n, n] bool: pHash Hamming distance ≤ max_distance, also against the mirrored hash (as curate.py)."""
    from curation.validate import phash_int

    h = np.array([phash_int(im) for im in images], dtype=np.uint64)
    hf = np.array([phash_int(ImageOps.mirror(im)) for im in images], dtype=np.uint64)

    def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        x = a[:, None] ^ b[None]
        return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)

    return (hamming(h, h) <= max_distance) | (hamming(h, hf) <= max_distance)


def pairs(close: np.ndarray) -> np.ndarray:
    a, b = np.nonzero(np.triu(close, k=1))
    return np.stack([a, b], 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="the detector (OUT/backbone); without it only the pool is written")
    parser.add_argument("--threshold", type=float, default=0.9, help="cosine > threshold: a duplicate edge")
    parser.add_argument("--write_pool", help="write the originals and copies (shuffled names) as an image folder")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--stack", action="store_true", help="every copy by the whole edit chain (see near_duplicate_set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phash_max_distance", type=int, default=6)
    parser.add_argument("--verify_min_inliers", type=int, default=None,
                        help="also join each image's --verify_top nearest neighbours below the threshold when this many "
                             "ORB keypoint matches fit one similarity transform (curation/verify.py; off by default)")
    parser.add_argument("--verify_top", type=int, default=10)
    parser.add_argument("--verify_dense_min_inliers", type=int, default=None,
                        help="pairs below this many inliers are checked again with 800 keypoints per image and join "
                             "when this many fit (curate.py's verify_dense_min_inliers; off by default)")
    args = parser.parse_args(argv)

    from curation.embed import Embedder, resolve_model

    images, groups, edits = near_duplicate_set(args.tile, args.copies, args.seed, args.stack)
    n, n_originals = len(images), int(groups.max() + 1)
    if args.write_pool:
        pool = Path(args.write_pool)
        pool.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(np.random.default_rng(args.seed).permutation(n)):
            images[p].save(pool / f"{i:05d}.png")
        print(f"wrote {n} images to {pool}")
    if not args.model:
        return {}
    ph_close = phash_close(images, args.phash_max_distance)
    embedder = Embedder(resolve_model(args.model, "--model"))
    v = np.concatenate([embedder(images[i : i + 64]) for i in range(0, n, 64)])
    sims = v @ v.T
    cd_close = sims > args.threshold
    dc_close = cd_close.copy()  # decontamination: every verified match counts (a collage holding an eval image)
    verify = None
    if args.verify_min_inliers is not None:
        from curation.verify import candidate_pairs, collage_safe_joins, geometric_veto, verify_pairs

        t0 = time.time()
        ranked = sims - 3 * np.eye(n)  # self last
        order = np.argsort(-ranked, axis=1)[:, : args.verify_top]
        a, b, w = candidate_pairs(order, np.take_along_axis(sims, order, 1), 0, args.verify_top, args.threshold)
        ca, cb = pairs(cd_close).T
        inliers, fewest = verify_pairs(lambda row: images[row], np.concatenate([ca, a]), np.concatenate([cb, b]),
                                       return_keypoints=True, dense_min_inliers=args.verify_dense_min_inliers)
        # dedup, as curate.py: cosine edges geometry contradicts are dropped; groups of the hash and cosine edges
        # then join verified partners by collage_safe_joins
        vetoed = geometric_veto(inliers[: len(ca)], fewest[: len(ca)])
        cd_close[ca[vetoed], cb[vetoed]] = cd_close[cb[vetoed], ca[vetoed]] = False
        inliers = inliers[len(ca):]
        verified = inliers >= args.verify_min_inliers
        dc_close[a[verified], b[verified]] = dc_close[b[verified], a[verified]] = True
        groups_before = components(n, np.concatenate([pairs(ph_close), pairs(cd_close)]))
        joined = verified.copy()
        joined[verified] = collage_safe_joins(groups_before, np.bincount(groups_before, minlength=n), a[verified],
                                              b[verified], w[verified])
        cd_close[a[joined], b[joined]] = cd_close[b[joined], a[joined]] = True
        verify = {"min_inliers": args.verify_min_inliers, "dense_min_inliers": args.verify_dense_min_inliers,
                  "top": args.verify_top, "pairs_checked": len(a),
                  "pairs_verified": int(verified.sum()), "pairs_joined": int(joined.sum()),
                  "cosine_edges_vetoed": int(vetoed.sum()), "seconds": round(time.time() - t0, 1)}
    ph, cd = pairs(ph_close), pairs(cd_close)
    ph_only, both = components(n, ph), components(n, np.concatenate([ph, cd]))
    result = {"images": n, "originals": n_originals, "seed": args.seed, "stack": args.stack, "threshold": args.threshold,
              "verify": verify, "phash_only": pairwise(ph_only, groups),
              "detector_only": pairwise(components(n, cd), groups),
              "phash_and_detector": pairwise(both, groups),
              "recall_per_edit": {"phash_only": recall_per_edit(ph_only, groups, edits),
                                  "phash_and_detector": recall_per_edit(both, groups, edits)},
              "decontamination": {"phash_only": decontamination(ph_close, groups, n_originals),
                                  "phash_and_detector": decontamination(ph_close | dc_close, groups, n_originals)}}
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
