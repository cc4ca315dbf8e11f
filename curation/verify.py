"""Local-feature verification of copy candidates: ORB keypoints matched between two images, RANSAC similarity fit.

A global descriptor ranks well but thresholds poorly: a corner crop, a rotation or a screenshot frame of an image
often has its original among its nearest neighbours at a cosine that unrelated tiles of one photo also reach.
Geometry separates them: a copy's keypoints map onto its original's by one similarity transform (scale, rotation,
shift), an unrelated image's do not. So the nearest neighbours of each image that the cosine threshold did not
join are checked here, and a pair is a copy when at least `min_inliers` keypoint matches agree with one transform
(also tried against the mirrored image, for flips). Classical copy-detection systems verify candidates the same
way; it costs a keypoint extraction per candidate image and a RANSAC fit per pair, so only the top few neighbours
are checked. Deterministic: fixed RANSAC seed, no threading.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

__all__ = ["Keypoints", "candidate_pairs", "count_inliers", "orb_keypoints", "unique_pairs", "verify_pairs"]


@dataclass(frozen=True)
class Keypoints:
    points: np.ndarray  # [n, 2] (row, col) in the resized grey image
    descriptors: np.ndarray  # [n, 256] bool (ORB's binary tests)


def orb_keypoints(image: Image.Image, size: int = 256, n_keypoints: int = 400) -> Keypoints:
    """ORB keypoints of `image` converted to grey and resized so its longer side is `size` px."""
    from skimage.feature import ORB

    grey = ImageOps.grayscale(image)
    f = size / max(grey.size)
    grey = grey.resize((max(8, round(grey.width * f)), max(8, round(grey.height * f))), Image.BILINEAR)
    orb = ORB(n_keypoints=n_keypoints, fast_threshold=0.03, downscale=1.3, n_scales=6)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orb.detect_and_extract(np.asarray(grey, dtype=np.float64) / 255)
    except RuntimeError:  # flat image: no keypoint at all
        return Keypoints(np.zeros((0, 2)), np.zeros((0, 256), dtype=bool))
    return Keypoints(orb.keypoints, orb.descriptors)


def count_inliers(a: Keypoints, b: Keypoints, residual: float = 4.0, max_trials: int = 300) -> int:
    """Matches (mutual nearest, ratio 0.85) between a and b that one similarity transform explains."""
    from skimage.feature import match_descriptors
    from skimage.measure import ransac
    from skimage.transform import SimilarityTransform

    if len(a.points) < 3 or len(b.points) < 3:
        return 0
    matches = match_descriptors(a.descriptors, b.descriptors, cross_check=True, max_ratio=0.85)
    if len(matches) < 4:
        return 0
    src, dst = a.points[matches[:, 0]][:, ::-1], b.points[matches[:, 1]][:, ::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no inliers found" is an answer here, not a problem
        try:
            _, inliers = ransac((src, dst), SimilarityTransform, min_samples=3, residual_threshold=residual,
                                max_trials=max_trials, rng=0)
        except (ValueError, np.linalg.LinAlgError):
            return 0
    return 0 if inliers is None else int(inliers.sum())


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
                 load_b: Callable[[int], Image.Image] | None = None) -> np.ndarray:
    """Inlier count of each pair (a[i], b[i]): the larger of a's image and a's mirrored image against b's.
    `load_a(row)` gives the image of row a[i], `load_b` that of b[i] (default: `load_a`, pairs within one set).
    Keypoints are cached (up to 8,192 images)."""
    cache: dict[tuple[bool, int, bool], Keypoints] = {}

    def keypoints(side_b: bool, row: int, mirrored: bool) -> Keypoints:
        key = (side_b and load_b is not None, row, mirrored)
        if key not in cache:
            if len(cache) >= 8192:  # bounded memory on big candidate sets (~110 kB per entry)
                cache.clear()
            image = (load_b if key[0] else load_a)(row)
            cache[key] = orb_keypoints(ImageOps.mirror(image) if mirrored else image)
        return cache[key]

    out = np.zeros(len(a), dtype=np.int64)
    for i, (x, y) in enumerate(zip(a.tolist(), b.tolist())):
        target = keypoints(True, y, False)
        out[i] = max(count_inliers(keypoints(False, x, False), target), count_inliers(keypoints(False, x, True), target))
    return out
