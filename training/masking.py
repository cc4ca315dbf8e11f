"""iBOT block masking: which patches of the global crops the student sees as mask tokens.

Two pieces, following the official DINOv2 data pipeline (``dinov2/data/masking.py`` and the masking half of
``dinov2/data/collate.py``):

* :class:`BlockMaskGenerator` draws one ``[h, w]`` bool mask made of rectangular blocks until a requested number
  of patches is masked. Each block has a target area of at least ``min_num_patches`` (4) patches and an aspect
  ratio drawn log-uniformly from ``[min_aspect, 1 / min_aspect]`` (0.3 .. 3.33); a single block never adds more
  than ``max_num_patches`` (default: half the grid, as the official ``train.py`` builds it).
* :func:`sample_batch_masks` decides how much of each image in a batch is masked: only
  ``int(B * sample_probability)`` images get a mask, their ratios spread over ``linspace(min, max, n + 1)`` bins
  (one uniform draw inside each bin, so a batch always covers the whole range), the rest get an empty mask, and
  the order is shuffled.

Randomness always comes from a ``random.Random`` passed in, never from the global RNG, so the collate can derive
it from the samples in the batch and a resumed run masks exactly as the original one did. The calls on that
``Random`` are made in the same order, with the same arguments, as the official code makes them on the global
``random`` module: seeded alike, both produce bit-identical masks (``tests/test_masking.py`` checks this when the
official code is available).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

__all__ = ["BlockMaskGenerator", "sample_batch_masks"]


class BlockMaskGenerator:
    """Draw block-shaped iBOT masks on a ``height x width`` patch grid.

    Args:
        grid_size: patches per side (``global_size // patch_size``), or ``(height, width)``.
        min_num_patches: smallest target area of one block.
        max_num_patches: largest number of patches one block may add; default half the grid, which is what the
            official ``train.py`` passes (``0.5 * n_patches``).
        min_aspect: smallest height/width ratio of a block; ``max_aspect`` defaults to ``1 / min_aspect``.

    Note on block sizes: as in the official generator, height and width are each rounded from the target area,
    so a 4-patch target can come out as a 1x3 block (aspect ~0.5); with targets >= 4 a block is never smaller
    than 3 patches. Near the end of a mask, when fewer than ``min_num_patches`` patches are still wanted, a block
    may add only what is left (it then has to overlap earlier blocks or come out small), which is how the
    requested count is (almost always) reached exactly.
    """

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if isinstance(grid_size, int):
            grid_size = (grid_size, grid_size)
        self.height, self.width = grid_size
        if self.height < 1 or self.width < 1:
            raise ValueError(f"grid_size must be positive, got {grid_size}")
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        # Aspect ratios are drawn uniformly in log space so that tall and wide blocks are equally likely.
        self.log_aspect_range = (math.log(min_aspect), math.log(max_aspect))

    @classmethod
    def for_crop(cls, crop_size: int, patch_size: int, **kwargs) -> BlockMaskGenerator:
        """Generator for square global crops of ``crop_size`` pixels cut into ``patch_size`` patches."""
        return cls(crop_size // patch_size, **kwargs)

    def __repr__(self) -> str:
        lo, hi = (math.exp(v) for v in self.log_aspect_range)
        return (
            f"BlockMaskGenerator(grid={self.height}x{self.width}, block patches>={self.min_num_patches}, "
            f"block patches<={self.max_num_patches:g}, aspect {lo:.3f}..{hi:.3f})"
        )

    def _add_block(
        self,
        mask: np.ndarray,
        max_new_patches: float,
        rng: random.Random,
        blocks: list[tuple[int, int, int, int]] | None,
    ) -> int:
        """Try (up to 10 times) to place one rectangle that masks 1..max_new_patches new patches.

        Returns the number of newly masked patches (0 when every try failed).
        """
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_new_patches)
            aspect = math.exp(rng.uniform(*self.log_aspect_range))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            # A block must leave at least one row and one column free (strict <, as the official code).
            if w >= self.width or h >= self.height:
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            # Accept only blocks that add something and do not overshoot the budget (overlap is allowed).
            if 0 < new <= max_new_patches:
                window[...] = True
                if blocks is not None:
                    blocks.append((top, left, h, w))
                return new
        return 0

    def __call__(
        self,
        num_masking_patches: int,
        rng: random.Random,
        blocks: list[tuple[int, int, int, int]] | None = None,
    ) -> np.ndarray:
        """A ``[height, width]`` bool mask with (at most, and almost always exactly) ``num_masking_patches`` set.

        ``blocks``, when given, receives ``(top, left, h, w)`` of every rectangle placed (for tests/debugging).
        """
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng, blocks)
            if added == 0:  # the grid is too crowded for another block: stop short rather than loop forever
                break
            count += added
        return mask


def sample_batch_masks(
    generator: BlockMaskGenerator,
    num_images: int,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    sample_probability: float = 0.5,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Masks for ``num_images`` global crops as the official collate draws them: bool ``[num_images, num_patches]``.

    ``int(num_images * sample_probability)`` images are masked; image ``i`` of those gets a ratio drawn uniformly
    from bin ``i`` of ``linspace(min, max, n_masked + 1)``; the others stay unmasked; then the list is shuffled.
    """
    if rng is None:
        raise ValueError("sample_batch_masks needs an explicit random.Random (no global RNG, for exact resume)")
    n_masked = int(num_images * sample_probability)
    # float32 bin edges and a uniform draw between two float32 values, exactly like the official
    # `torch.linspace` + `random.uniform(probs[i], probs[i + 1])`, so the patch counts agree bit for bit.
    edges = torch.linspace(float(ratio_min_max[0]), float(ratio_min_max[1]), n_masked + 1)
    masks = []
    for i in range(n_masked):
        ratio = rng.uniform(edges[i], edges[i + 1])
        masks.append(generator(int(generator.num_patches * ratio), rng))
    masks.extend(generator(0, rng) for _ in range(n_masked, num_images))
    rng.shuffle(masks)
    if not masks:
        return torch.zeros(0, generator.num_patches, dtype=torch.bool)
    return torch.from_numpy(np.stack(masks)).flatten(1)
