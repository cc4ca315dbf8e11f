"""Training on data it cannot learn from ends, loudly, on every process at once.

The data pipeline drops undecodable images and reports them in each batch (`num_skipped`, and `skipped`: a list
of `(image name or row id, reason code)`). The loop agrees on these counts across processes with one all-reduce
per batch (`agree_on_batch`), and `DataGuard` — fed the same global counts on every process, so every process
reaches the same verdict at the same batch — stops the run when

* the share of undecodable images among the last `data.skip_window` images (all processes together) passes
  `data.max_skipped_fraction` (judged once a window is full, or at the end of an epoch that held fewer images);
* a whole window's worth of batches in a row had nothing to train on (some process's batch was entirely
  undecodable): this holds even with `max_skipped_fraction=1`, so a run never spins on data that yields nothing;
* an epoch went by without a single usable batch (e.g. fewer images than one batch: incomplete batches are
  dropped).

The same all-reduce carries an "out of data" flag, so processes whose shards hold different numbers of batches
end each epoch together: no process waits in a collective for one that has moved on, and a verdict taken at
the end of an epoch is taken by all.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

SHOW_REASONS = 5  # (name, reason) pairs quoted in messages


class BadDataError(RuntimeError):
    """The training data is too broken to train on (see `DataGuard`)."""


@dataclass(frozen=True)
class BatchCounts:
    """One batch of every process, agreed across processes."""

    usable: bool  # every process has at least one image: all step (else none does)
    local_images: int  # images kept in this process's batch
    images: int  # images kept, all processes
    skipped: int  # images dropped as undecodable, all processes
    exhausted: bool  # some process's loader ran out: every process ends the epoch


def agree_on_batch(accelerator: Any, batch: dict | None) -> BatchCounts:
    """Counts of this batch on every process (`batch=None`: this process's loader ran out), one all-reduce."""
    kept = int(batch["batch_size"]) if batch is not None else 0
    skipped = int(batch["num_skipped"]) if batch is not None else 0
    flags = [float(kept > 0), float(kept), float(skipped), float(batch is None)]
    if accelerator.num_processes > 1:
        t = accelerator.reduce(torch.tensor(flags, device=accelerator.device), reduction="sum")
        flags = t.tolist()
    have, images, dropped, exhausted = flags
    return BatchCounts(usable=have == accelerator.num_processes and not exhausted, local_images=kept,
                       images=round(images), skipped=round(dropped), exhausted=exhausted > 0)


def gather_reasons(accelerator: Any, reasons: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The first `SHOW_REASONS` reasons of every process (collective: call it on all processes at once)."""
    if accelerator.num_processes == 1:
        return list(reasons[:SHOW_REASONS])
    from accelerate.utils import gather_object

    gathered = gather_object([[tuple(r) for r in reasons[:SHOW_REASONS]]])
    return [r for rank in gathered for r in rank][:SHOW_REASONS]


def format_reasons(reasons: list[tuple[str, str]]) -> str:
    if not reasons:
        return "the data pipeline reported no reasons; see the 'Skipping row' warnings in the log"
    return ", ".join(f"{name} ({reason})" for name, reason in reasons)


class DataGuard:
    """Decides when the data is too broken to go on. Fed global counts (`BatchCounts`), so its verdicts are the
    same on every process; `state_dict` goes into checkpoints so a resumed run judges the same window."""

    def __init__(self, dataset: str, max_skipped_fraction: float, skip_window: int, images_per_batch: int) -> None:
        self.dataset = dataset
        self.max_fraction = max_skipped_fraction
        self.window = skip_window
        # A window's worth of batches (all processes) with nothing to train on ends the run whatever the share says.
        self.max_empty_in_a_row = max(1, math.ceil(skip_window / images_per_batch))
        self.recent: deque[tuple[int, int]] = deque()  # (images seen, images skipped) per batch, newest last
        self.seen = self.skipped = 0  # in `recent`
        self.empty_in_a_row = 0
        self.total_seen = self.total_skipped = 0
        self.reasons: list[tuple[str, str]] = []  # this process's first few
        self.epoch_batches = self.epoch_usable = 0
        self.epoch_from_start = True

    # ---- feeding
    def start_epoch(self, from_start: bool) -> None:
        """`from_start=False` when a resumed run joins an epoch part-way (its first batches are not judged)."""
        self.epoch_batches = self.epoch_usable = 0
        self.epoch_from_start = from_start

    def observe(self, counts: BatchCounts, skipped: list | None = None) -> str | None:
        """Account one batch; returns why the run must stop, or None."""
        if skipped and len(self.reasons) < SHOW_REASONS:
            self.reasons += [(str(name), str(reason)) for name, reason in skipped][: SHOW_REASONS - len(self.reasons)]
        seen = counts.images + counts.skipped
        self.total_seen += seen
        self.total_skipped += counts.skipped
        self.recent.append((seen, counts.skipped))
        self.seen += seen
        self.skipped += counts.skipped
        while len(self.recent) > 1 and self.seen - self.recent[0][0] >= self.window:
            old_seen, old_skipped = self.recent.popleft()
            self.seen -= old_seen
            self.skipped -= old_skipped
        self.epoch_batches += 1
        self.epoch_usable += counts.usable
        self.empty_in_a_row = 0 if counts.usable else self.empty_in_a_row + 1
        if self.empty_in_a_row >= self.max_empty_in_a_row:
            return (f"{self.empty_in_a_row} batches in a row had no decodable image on some process "
                    f"({self.skipped} of the last {self.seen} images could not be decoded)")
        if self.seen >= self.window:
            return self._share_problem()
        return None

    def end_epoch(self) -> str | None:
        """At the end of an epoch (on every process together): a verdict the batches alone could not give."""
        if not self.epoch_from_start:
            return None
        if self.epoch_batches == 0:
            return ("the epoch held no complete batch (incomplete batches are dropped): the dataset has fewer "
                    "images per process than optim.batch_size")
        if self.epoch_usable == 0:
            return f"a whole epoch went by without one usable batch ({self._counts()})"
        if self.seen < self.window:  # a small dataset: the epoch is the window
            return self._share_problem()
        return None

    def _counts(self) -> str:
        return f"{self.skipped} of the last {self.seen} images could not be decoded"

    def _share_problem(self) -> str | None:
        if self.seen and self.skipped / self.seen > self.max_fraction:
            return (f"{self._counts()} ({100 * self.skipped / self.seen:.0f}% > data.max_skipped_fraction="
                    f"{self.max_fraction:g}, measured over data.skip_window={self.window} images)")
        return None

    # ---- reporting
    def message(self, problem: str, reasons: list[tuple[str, str]], checkpoint: str | None) -> str:
        saved = f" A checkpoint was saved in {checkpoint}." if checkpoint else ""
        return (
            f"stopping: data.dataset={self.dataset!r} is too broken to train on: {problem}. First undecodable "
            f"images: {format_reasons(reasons)}.{saved} Fix or remove the broken images (curate.py validates a "
            "collection and drops them, with a manifest of why), or, if this share of broken images is expected, "
            "raise data.max_skipped_fraction (1 = never stop for it) or data.skip_window."
        )

    def summary(self, reasons: list[tuple[str, str]]) -> dict[str, Any]:
        """What was skipped over the whole run (this session), for logs and summary.json."""
        return {"images_seen": self.total_seen, "skipped_images": self.total_skipped, "first_skipped": reasons}

    # ---- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"recent": [list(r) for r in self.recent], "empty_in_a_row": self.empty_in_a_row,
                "total_seen": self.total_seen, "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque((int(a), int(b)) for a, b in state.get("recent", []))
        self.seen = sum(a for a, _ in self.recent)
        self.skipped = sum(b for _, b in self.recent)
        self.empty_in_a_row = int(state.get("empty_in_a_row", 0))
        self.total_seen = int(state.get("total_seen", 0))
        self.total_skipped = int(state.get("total_skipped", 0))
