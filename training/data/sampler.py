"""Which samples each process reads, in which order, and at which resolution — all resumable exactly.

* :class:`ResumableSampler` — a DistributedSampler-like per-epoch permutation that can start mid-epoch; it yields
  ``(epoch, index)`` keys (``(epoch, index, resolution)`` with multi-resolution), so persistent workers know the
  epoch without ever seeing a ``set_epoch`` made in the main process.
* :func:`choose_resolution` — one resolution per batch, a function of (seed, epoch, batch) alone: the same on every
  process and again on resume (DINOv3 high-res adaptation).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from training.augment import derive_seed

__all__ = ["ResumableSampler", "check_resolution_probabilities", "choose_resolution"]

# Mixed into seeds so the resolution stream is unrelated to the augmentation streams of the same samples.
_RESOLUTION_STREAM = 0x7265736F


def choose_resolution(probabilities: Sequence[float], seed: int, epoch: int, batch_index: int) -> int:
    """Which resolution (index into ``probabilities``) batch ``batch_index`` of ``epoch`` uses.

    A function of its arguments alone, so every process (and a resumed run) picks the same one for the same batch.
    """
    u = random.Random(derive_seed(_RESOLUTION_STREAM, seed, epoch, batch_index)).random() * sum(probabilities)
    for choice, p in enumerate(probabilities):
        u -= p
        if u < 0:
            return choice
    return len(probabilities) - 1



def check_resolution_probabilities(
    num_transforms: int, probabilities: Sequence[float] | None
) -> tuple[float, ...] | None:
    """Validate per-resolution probabilities against the transforms (one per resolution)."""
    if probabilities is None:
        if num_transforms > 1:
            raise ValueError(
                f"{num_transforms} transforms (one per resolution) need resolution_probabilities "
                "(config: crops.resolutions rows [global_size, local_size, probability])"
            )
        return None
    probabilities = tuple(float(p) for p in probabilities)
    if len(probabilities) != num_transforms:
        raise ValueError(
            f"got {len(probabilities)} resolution probabilities for {num_transforms} transforms; "
            "give one per resolution"
        )
    if min(probabilities) < 0 or abs(sum(probabilities) - 1.0) > 1e-6:
        raise ValueError(
            f"resolution probabilities must be >= 0 and sum to 1, got {list(probabilities)} "
            f"(sum {sum(probabilities):g}); fix the third column of crops.resolutions"
        )
    return probabilities


class ResumableSampler(Sampler[tuple[int, int]]):
    """Deterministic, sharded, resumable sampler for map-style datasets; yields ``(epoch, index)`` keys.

    Epoch ``e`` visits ``torch.randperm(dataset_size)`` drawn from a generator seeded with ``seed + e``, cut to a
    multiple of ``num_replicas`` and dealt round-robin to the ranks — the same order as
    ``torch.utils.data.DistributedSampler(shuffle=True, drop_last=True, seed=seed)``.

    Resume: the training loop knows how many batches it consumed in the current epoch (the sampler cannot: the
    DataLoader prefetches). ``state_dict(batches_consumed)`` records that; ``load_state_dict`` (or
    ``set_epoch(e); skip(k)``) makes the next iteration start at batch ``k`` of epoch ``e``, computed by index
    arithmetic so skipped samples are never loaded. A skip applies to one iteration; ``set_epoch`` with a new
    epoch clears it (calling it again with the same epoch, as a loop does after loading a state, keeps it).

    With ``resolution_probabilities`` the keys are ``(epoch, index, resolution)``: one resolution per batch of
    ``batch_size`` keys, drawn by :func:`choose_resolution` (the same on every rank and on resume).
    """

    def __init__(
        self,
        dataset_size: int,
        *,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        resolution_probabilities: Sequence[float] | None = None,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.resolution_probabilities = None if resolution_probabilities is None else tuple(resolution_probabilities)
        self.epoch = 0
        self._skip_batches = 0
        # drop_last like DistributedSampler: every rank gets the same number of samples per epoch.
        self.samples_per_replica = dataset_size // num_replicas
        if self.samples_per_replica < batch_size:
            raise ValueError(
                f"{dataset_size} samples over {num_replicas} process(es) is fewer than one batch of {batch_size}: "
                f"use a smaller batch size or a larger dataset."
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_replica // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip_batches = 0
        self.epoch = epoch

    def skip(self, n_batches: int) -> None:
        """Start the next iteration after the first ``n_batches`` batches of the current epoch."""
        if not 0 <= n_batches <= self.batches_per_epoch:
            raise ValueError(f"cannot skip {n_batches} batches of an epoch that has {self.batches_per_epoch}")
        self._skip_batches = n_batches

    def state_dict(self, batches_consumed: int) -> dict[str, int | bool]:
        """Where to resume: epoch, batches consumed in it, and what must match for the order to be the same."""
        return {
            "epoch": self.epoch,
            "batches_consumed": batches_consumed,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_replicas": self.num_replicas,
            "batch_size": self.batch_size,
            "dataset_size": self.dataset_size,
        }

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        for name in ("seed", "shuffle", "num_replicas", "batch_size", "dataset_size"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"cannot resume the data order exactly: the checkpoint has {name}={state[name]}, this run "
                    f"{getattr(self, name)}. Keep it the same, or start the data order afresh by not loading the "
                    f"sampler state."
                )
        self.set_epoch(int(state["epoch"]))
        self.skip(int(state["batches_consumed"]))

    def _epoch_indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        total = self.samples_per_replica * self.num_replicas
        return order[self.rank : total : self.num_replicas]

    def __len__(self) -> int:
        return self.samples_per_replica - self._skip_batches * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        start = self._skip_batches * self.batch_size
        self._skip_batches = 0  # a skip is for one pass only
        epoch, indices = self.epoch, self._epoch_indices()
        if self.resolution_probabilities is None:
            return ((epoch, index) for index in indices[start:])
        return self._with_resolutions(epoch, indices, start)

    def _with_resolutions(self, epoch: int, indices: list[int], start: int) -> Iterator[tuple[int, int, int]]:
        resolution = 0
        for position in range(start, len(indices)):
            if position % self.batch_size == 0:
                batch = position // self.batch_size
                resolution = choose_resolution(self.resolution_probabilities, self.seed, epoch, batch)
            yield epoch, indices[position], resolution
