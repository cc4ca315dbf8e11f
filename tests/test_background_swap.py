"""Background swap: the minimum-barrier foreground mask finds a flat object on a real-photo background, a swap
keeps the object's pixels and replaces the rest, draws are reproducible per seed, and undecodable bank rows are
counted, not fatal."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pytest
import torch
from curation_fixtures import encode
from PIL import Image, ImageDraw

from training.data.background_swap import BackgroundSwap, foreground_masks, minimum_barrier_saliency
from training.data.two_views import TwoViewAugmentation


def _photo(seed: int, size: int = 64) -> Image.Image:
    import skimage.data

    photo = Image.fromarray(skimage.data.astronaut() if seed % 2 else skimage.data.coffee())
    rng = np.random.default_rng(seed)
    left, top = (int(v) for v in rng.integers(0, 140, 2))  # coffee is 400 px high
    return photo.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + 256, top + 256))


def _disc_on_photo(seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    image = _photo(seed)
    ImageDraw.Draw(image).ellipse([18, 14, 46, 42], fill=(40, 220, 60))
    truth = np.zeros((64, 64), dtype=bool)
    yy, xx = np.mgrid[0:64, 0:64]
    truth[((xx - 32) / 14) ** 2 + ((yy - 28) / 14) ** 2 <= 1] = True
    return image, truth


def test_mask_finds_a_flat_object_on_a_photo():
    """The disc is always found; salient parts of the photo (a spoon, a collar) sometimes come along with it."""
    ious = []
    for seed in range(4):
        image, truth = _disc_on_photo(seed)
        mask = foreground_masks([image])[0]
        assert (mask & truth).sum() / truth.sum() > 0.95
        ious.append((mask & truth).sum() / (mask | truth).sum())
    assert np.mean(ious) > 0.75, ious


def test_saliency_is_the_barrier_to_the_border():
    x = torch.zeros(1, 1, 7, 7)
    x[..., 2:5, 2:5] = 1.0  # a plateau: every path from its inside to the border climbs 0 -> 1
    s = minimum_barrier_saliency(x)[0]
    assert s[3, 3] == 1.0 and s[2:5, 2:5].min() == 1.0
    assert s[0].max() == 0 and s[1, 1] == 0  # border and the flat ring around the plateau


def test_swap_keeps_the_object_and_replaces_the_background():
    image, truth = _disc_on_photo()
    others = [_photo(s) for s in range(1, 5)]
    swap = BackgroundSwap.from_images([image, *others], probability=1.0)
    torch.manual_seed(0)
    out = np.asarray(swap(image)).astype(int)
    src = np.asarray(image).astype(int)
    inner = np.zeros_like(truth)
    inner[18:38, 22:42] = truth[18:38, 22:42]  # well inside the disc: alpha 1 after upsampling
    assert np.abs(out[inner] - src[inner]).max() <= 1
    far = ~truth
    far[8:50, 10:54] = False  # well outside
    assert np.abs(out[far] - src[far]).mean() > 20  # the photo behind was replaced


def test_no_swap_without_a_foreground_and_aligned_draws():
    flat = Image.new("RGB", (64, 64), (120, 80, 40))
    swap = BackgroundSwap.from_images([flat, _photo(1)], probability=1.0)
    assert not swap.mask(flat).any()
    torch.manual_seed(0)
    assert swap(flat) is flat  # nothing to paste: the image is kept whole
    after_swap = torch.rand(1)
    torch.manual_seed(0)
    BackgroundSwap(swap.backgrounds, {}, probability=0.0)(flat)
    assert torch.rand(1) == after_swap  # same draws whether or not the swap happens


def test_two_views_with_swap_are_reproducible_per_seed():
    image, _ = _disc_on_photo()
    swap = BackgroundSwap.from_images([image, *(_photo(s) for s in range(1, 4))], probability=0.5)
    augment = TwoViewAugmentation(size=32, scale=(0.5, 1.0), background_swap=swap)
    a, b = augment(image, seed=7), augment(image, seed=7)
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
    c = augment(image, seed=8)
    assert not torch.equal(a["view1"], c["view1"])


def test_from_dataset_counts_undecodable_rows(caplog):
    good = [_photo(s) for s in range(3)]
    # an Image column, as an image folder or a parquet of images has; the last file is a truncated JPEG
    rows = [{"bytes": encode(im), "path": None} for im in good] + [{"bytes": b"\xff\xd8\xff\xe0 cut", "path": None}]
    ds = datasets.Dataset.from_dict({"image": rows}, features=datasets.Features({"image": datasets.Image()}))
    with caplog.at_level(logging.WARNING):
        swap = BackgroundSwap.from_dataset(ds, 0.5)
    assert len(swap.backgrounds) == 3
    assert "1 of 4 bank rows did not decode" in caplog.text


def test_probability_is_checked():
    with pytest.raises(ValueError, match="probability"):
        BackgroundSwap(np.zeros((1, 8, 8, 3), dtype=np.uint8), {}, probability=1.5)
