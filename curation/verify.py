"""Local-feature verification of copy candidates: ORB keypoints matched between two images, RANSAC similarity fit.

A global descriptor ranks well but thresholds poorly: a corner crop, a rotation or a screenshot frame of an image
often has its original among its nearest neighbours at a cosine that unrelated tiles of one photo also reach.
Geometry separates them: a copy's keypoints map onto its original's by one similarity transform (scale, rotation,
shift), an unrelated image's do not. So the nearest neighbours of each image that the cosine threshold did not
join are checked here, and a pair is a copy when at least `min_inliers` keypoint matches agree with one transform
(also tried against the mirrored image, for flips). Classical copy-detection systems verify candidates the same
way; it costs a keypoint extraction per candidate image and a RANSAC fit per pair, so only the top few neighbours
are checked. A match is not transitive (a collage matches both of its sources), so `collage_safe_joins` decides
which verified pairs may join duplicate groups. Deterministic: fixed RANSAC seed, no threading.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DENSE_KEYPOINTS", "KEYPOINTS", "Keypoints", "candidate_pairs", "collage_safe_joins", "count_inliers", "geometric_veto", "orb_keypoints",
           "unique_pairs", "verify_pairs"]


KEYPOINTS = 400  # ORB keypoints per image in the first check
DENSE_KEYPOINTS = 800  # ... and in the dense second check (`verify_pairs(dense_min_inliers=...)`)


@dataclass(frozen=True)
class Keypoints:
    points: np.ndarray  # [n, 2] (row, col) in the resized grey image
    descriptors: np.ndarray  # [n, 256] bool (ORB's binary tests)


def orb_keypoints(image: Image.Image, size: int = 256, n_keypoints: int = KEYPOINTS) -> Keypoints:
    """ORB keypoints of `image` converted to grey, resized so its longer side is `size` px and contrast-stretched."""
    from skimage.feature import ORB

    grey = ImageOps.grayscale(image)
    f = size / max(grey.size)
    grey = grey.resize((max(8, round(grey.width * f)), max(8, round(grey.height * f))), Image.BILINEAR)
    orb = ORB(n_keypoints=n_keypoints, fast_threshold=0.03, downscale=1.3, n_scales=6)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orb.detect_and_extract(_stretch_contrast(np.asarray(grey, dtype=np.float64) / 255))
    except RuntimeError:  # flat image: no keypoint at all
        return Keypoints(np.zeros((0, 2)), np.zeros((0, 256), dtype=bool))
    return Keypoints(orb.keypoints, orb.descriptors)


def _stretch_contrast(grey: np.ndarray) -> np.ndarray:
    """Grey levels mapped so the 1st..99th percentiles span [0, 1]. FAST's corner threshold is absolute, so a dim,
    blurred or low-contrast image (and its copies) would otherwise yield few or no keypoints at all."""
    lo, hi = np.percentile(grey, (1, 99))
    return grey if hi - lo < 1 / 255 else np.clip((grey - lo) / (hi - lo), 0, 1)


def count_inliers(a: Keypoints, b: Keypoints, residual: float = 4.0, trials: int = 1000) -> int:
    """Matches (mutual nearest, ratio 0.85) between a and b that one similarity transform explains.

    RANSAC with 2-point samples (a similarity transform is fixed by two point pairs), all `trials` hypotheses
    scored at once: with few true matches among many (a small crop) a 2-point sample is clean far more often than
    a 3-point one. Seeded, so the count is deterministic."""
    from skimage.feature import match_descriptors

    if len(a.points) < 3 or len(b.points) < 3:
        return 0
    matches = match_descriptors(a.descriptors, b.descriptors, cross_check=True, max_ratio=0.85)
    if len(matches) < 4:
        return 0
    # points as complex numbers x + iy: a similarity transform is then z -> s * z + t
    src = a.points[matches[:, 0]] @ np.array([1j, 1.0])
    dst = b.points[matches[:, 1]] @ np.array([1j, 1.0])
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(src), trials), rng.integers(0, len(src), trials)
    distinct = np.abs(src[j] - src[i]) > 1e-6
    i, j = i[distinct], j[distinct]
    if not len(i):
        return 0
    s = (dst[j] - dst[i]) / (src[j] - src[i])
    t = dst[i] - s * src[i]
    errors = np.abs(s[:, None] * src[None] + t[:, None] - dst[None])
    return int((errors < residual).sum(1).max())


def candidate_pairs(indices: np.ndarray, sims: np.ndarray, query_offset: int, top: int, threshold: float,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, cosine), a < b, unique: each query's `top` nearest neighbours that the cosine threshold did not join,
    from a self-kNN result block (queries query_offset .. query_offset+len-1)."""
    rows = np.arange(len(indices), dtype=np.int64)[:, None] + query_offset
    idx, s = indices[:, :top], sims[:, :top]
    mask = (idx >= 0) & (idx != rows) & ~(s > threshold)
    q = np.broadcast_to(rows, idx.shape)[mask]
    n = idx[mask].astype(np.int64)
    return unique_pairs(np.minimum(q, n), np.maximum(q, n), s[mask].astype(np.float64))


def unique_pairs(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first occurrence of each (a, b), sorted."""
    if not len(a):
        return a.astype(np.int64), b.astype(np.int64), w.astype(np.float64)
    _, first = np.unique(np.stack([a, b], 1), axis=0, return_index=True)
    return a[first], b[first], w[first]


def verify_pairs(load_a: Callable[[int], Image.Image], a: np.ndarray, b: np.ndarray,
                 load_b: Callable[[int], Image.Image] | None = None, return_keypoints: bool = False,
                 dense_min_inliers: int | None = None, dense_keypoints: int = DENSE_KEYPOINTS,
                 ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Inlier count of each pair (a[i], b[i]): the larger of a's image and a's mirrored image against b's.
    `load_a(row)` gives the image of row a[i], `load_b` that of b[i] (default: `load_a`, pairs within one set).
    `return_keypoints`: also the keypoint count of the poorer image of each pair.

    `dense_min_inliers`: a pair with fewer inliers than this is checked again with `dense_keypoints` per image,
    and that count replaces the first when it reaches `dense_min_inliers`. A small crop holds few of its
    original's 400 keypoints; with twice as many some crops match, but so do repetitive structures (girders,
    print), hence the stricter count for the dense check. Keypoints are cached (up to 8,192 images)."""
    cache: dict[tuple[bool, int, bool, int], Keypoints] = {}

    def keypoints(side_b: bool, row: int, mirrored: bool, n: int = KEYPOINTS) -> Keypoints:
        key = (side_b and load_b is not None, row, mirrored, n)
        if key not in cache:
            if len(cache) >= 8192:  # bounded memory on big candidate sets (~110 kB per entry)
                cache.clear()
            image = (load_b if key[0] else load_a)(row)
            cache[key] = orb_keypoints(ImageOps.mirror(image) if mirrored else image, n_keypoints=n)
        return cache[key]

    def inliers(x: int, y: int, n: int = KEYPOINTS) -> int:
        target = keypoints(True, y, False, n)
        return max(count_inliers(keypoints(False, x, False, n), target),
                   count_inliers(keypoints(False, x, True, n), target))

    out = np.zeros(len(a), dtype=np.int64)
    fewest = np.zeros(len(a), dtype=np.int64)
    for i, (x, y) in enumerate(zip(a.tolist(), b.tolist())):
        out[i] = inliers(x, y)
        if dense_min_inliers is not None and out[i] < dense_min_inliers:
            dense = inliers(x, y, dense_keypoints)
            if dense >= dense_min_inliers:
                out[i] = dense
        fewest[i] = min(len(keypoints(False, x, False).points), len(keypoints(True, y, False).points))
    return (out, fewest) if return_keypoints else out


def geometric_veto(inliers: np.ndarray, keypoints: np.ndarray, min_keypoints: int = 80, max_inliers: int = 3,
                   ) -> np.ndarray:
    """Which cosine edges to drop: both images rich in keypoints (the poorer has >= `min_keypoints`), yet at most
    `max_inliers` of their matches fit one transform. The descriptor then says "same image" where geometry says
    "different": a detector error (seen on tiles of one photo). Keypoint-poor images (flat, blurred) keep their
    cosine edges, because there geometry has nothing to say."""
    return (np.asarray(keypoints) >= min_keypoints) & (np.asarray(inliers) <= max_inliers)


def collage_safe_joins(labels: np.ndarray, sizes: np.ndarray, a: np.ndarray, b: np.ndarray, similarity: np.ndarray,
                       ) -> np.ndarray:
    """Which verified pairs (a[i], b[i]) join their groups: bool mask.

    A keypoint match means "one image holds a transformed part of the other". That is a copy, but it is not
    transitive: a collage (one image pasted into another) matches both of its sources, and joining on every
    match would make the two sources, and all their copies, one duplicate group. Groups start as `labels` (the
    components the hash and cosine edges formed; `sizes[label]`: images per group) and grow in rounds:
    - a single image joins one verified partner group and no other: the one it is most similar to
      (`similarity`: curate.py passes the cosine, a whole-image judgement; inlier counts would favour the image
      pasted into a collage) among the partner groups of several images, or among single images when it has no
      such partner. An established group (images the hash or cosine edges already joined) is the safer anchor: a
      lone partner may itself be a collage, or a crop about to join the original's group in the same round,
      and a chain of single joins through it would strand the image or carry it into the wrong group;
    - two groups of several images join when their matches involve at least two images on each side. A
      collage's matches to its second source all go through the collage alone, so that source stays apart.
    Pairs inside one group are not needed and not selected. Deterministic (ties: the first pair)."""
    uniq, group = np.unique(labels, return_inverse=True)
    parent = np.arange(len(uniq))
    size = np.asarray(sizes, dtype=np.float64)[uniq]

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    keep = np.zeros(len(a), dtype=bool)
    while True:
        ga = np.array([find(group[x]) for x in a.tolist()], dtype=np.int64)
        gb = np.array([find(group[x]) for x in b.tolist()], dtype=np.int64)
        cross = np.nonzero(ga != gb)[0]
        best: dict[int, tuple[tuple[bool, float], int]] = {}  # group -> ((partner has several, similarity), partner)
        touching: dict[tuple[int, int], set[int]] = {}  # (group, partner group) -> the group's images in matches
        for i in cross.tolist():
            p, q, w = int(ga[i]), int(gb[i]), float(similarity[i])
            for s, t, image in ((p, q, int(a[i])), (q, p, int(b[i]))):
                rank = (bool(size[t] > 1), w)
                if rank > best.get(s, ((False, -np.inf), -1))[0]:
                    best[s] = (rank, t)
                touching.setdefault((s, t), set()).add(image)
        joins = [i for i in cross.tolist()
                 if any(size[s] == 1 and best[s][1] == t for s, t in ((ga[i], gb[i]), (gb[i], ga[i])))
                 or min(len(touching[(ga[i], gb[i])]), len(touching[(gb[i], ga[i])])) >= 2]
        if not joins:
            return keep
        keep[joins] = True
        for i in joins:
            p, q = find(int(ga[i])), find(int(gb[i]))
            if p != q:
                parent[max(p, q)] = min(p, q)
                size[min(p, q)] += size[max(p, q)]
