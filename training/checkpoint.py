"""Atomic, resumable checkpoints: `output_dir/checkpoint-<step>/` written via a temporary directory + rename.

A checkpoint holds Accelerate's full state (model weights as safetensors; optimizer, RNG and scaler in
Accelerate's formats, only ever read back from the user's own output directory) plus `trainer_state.json`
(step, data position, counters). A directory without `trainer_state.json` or still named `.tmp-*` is
incomplete and ignored, so a kill during saving never leaves a broken latest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """`auto` → latest complete checkpoint (or None), `never` → None, else a checkpoint path that must exist."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"train.resume={resume!r} is not a complete checkpoint (no {TRAINER_STATE}); "
            f"pass a checkpoint-<step> directory, 'auto' or 'never'"
        )
    return path


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    keep_last: int,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save the full state to `checkpoint-<step>` atomically and prune to the `keep_last` newest.

    All processes must call this (Accelerate saves sharded state from every rank). `extra_files` (name → text,
    e.g. the model's `config.json`) are written inside the checkpoint before it is renamed into place.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # trainer_state.json is the completion marker: written last, inside the temporary directory.
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        state_file = tmp / TRAINER_STATE
        state_file.write_text(json.dumps(trainer_state, indent=2))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        for old in checkpoint_dirs(output_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
