"""Atomic, resumable checkpoints: `output_dir/checkpoint-<step>/` written via a temporary directory + rename.

A checkpoint holds Accelerate's full state (model weights as safetensors; optimizer, RNG and scaler in
Accelerate's formats, only ever read back from the user's own output directory) plus `trainer_state.json`
(step, data position, counters). A directory without `trainer_state.json` or still named `.tmp-*` is
incomplete and ignored, so a kill during saving never leaves a broken latest checkpoint.

With several processes, `train.output_dir` must be one directory shared by all of them (Accelerate writes each
process's RNG state into the checkpoint; only the main process renames it into place). `check_shared_output_dir`
verifies this at start-up, and `agree_on_resume` has the main process pick the checkpoint and every process
confirm it reads that same checkpoint, so all resume at the same step or all stop with one clear error.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from .config import atomic_write_text

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"


class ResumeError(RuntimeError):
    """`train.resume` names no checkpoint, or the processes of a run cannot resume from one and the same."""


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
        raise ResumeError(
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


# ---- several processes: one output directory, one checkpoint ------------------------------------------------


_SHARED_HELP = (
    "train.output_dir must be one directory that every process reads and writes (a shared or network filesystem "
    "on several machines), because each process writes its part of every checkpoint there."
)


def agree_on_resume(accelerator, resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint every process resumes from (None: start fresh), decided by the main process.

    The main process resolves `train.resume` (`resolve_resume`) and broadcasts its choice: for `auto`, the
    checkpoint's name inside `train.output_dir` (each process looks in its own view of that directory), for a
    path, the path. Every process then checks it reads the same `trainer_state.json`; if any cannot, all raise
    `ResumeError` naming the processes and the fix, together (no process waits for another that failed).
    """
    if accelerator.num_processes == 1:
        return resolve_resume(resume, output_dir)
    from accelerate.utils import broadcast_object_list, gather_object

    decision: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            chosen = resolve_resume(resume, output_dir)
            if chosen is not None:
                relative = resume == "auto"
                decision = [{"path": chosen.name if relative else str(chosen), "relative": relative,
                             "state": (chosen / TRAINER_STATE).read_text()}]
        except (OSError, ResumeError) as e:  # every process raises it, not only this one
            decision = [{"error": str(e)}]
    broadcast_object_list(decision)
    choice = decision[0]
    if choice is None:
        return None
    if "error" in choice:
        raise ResumeError(choice["error"])
    checkpoint = Path(output_dir) / choice["path"] if choice["relative"] else Path(choice["path"])
    state_file = checkpoint / TRAINER_STATE
    try:
        same = state_file.read_text() == choice["state"]
        problem = None if same else f"process {accelerator.process_index} reads another {state_file}"
    except OSError as e:
        problem = f"process {accelerator.process_index} cannot read it ({e.strerror or e}: {state_file})"
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        where = f"{choice['path']} in train.output_dir" if choice["relative"] else choice["path"]
        raise ResumeError(
            f"the main process resumes from {where}, but " + "; ".join(problems) + ". " + _SHARED_HELP
            + " Point every process at the same train.output_dir, or start afresh with train.resume=never."
        )
    return checkpoint


def check_shared_output_dir(accelerator, output_dir: str | Path, wait_s: float = 5.0) -> None:
    """Raise on every process (together) unless all of them see the same `output_dir`.

    The main process writes a fresh token into it; each process reads it back (retrying for `wait_s`, since a
    network filesystem may show a new file a little late)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    marker = Path(output_dir) / ".shared-output-dir"
    sent: list[Any] = [None]
    if accelerator.is_main_process:
        sent = [(uuid.uuid4().hex, str(output_dir))]
        atomic_write_text(marker, sent[0][0])
    broadcast_object_list(sent)
    token, main_dir = sent[0]
    deadline = time.monotonic() + wait_s
    while True:
        try:
            seen = marker.read_text()
        except OSError:
            seen = None
        if seen == token or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    blind = [rank for rank, ok in enumerate(gather_object([seen == token])) if not ok]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    if blind:
        raise ResumeError(
            f"process(es) {blind} do not see the train.output_dir {main_dir!r} that the main process writes (no "
            f"{marker.name} from it after {wait_s:g} s). " + _SHARED_HELP
        )


# ---- metrics.jsonl ------------------------------------------------------------------------------------------


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the rows of `metrics.jsonl` logged at steps <= `step` (the step a run starts from), atomically.

    A resumed run logs the steps after its checkpoint again; without this they would appear twice. Returns how
    many rows were dropped (a half-written last line of a killed run counts as one)."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        logger.info("metrics.jsonl: dropped %d row(s) logged after step %d, which this run logs again", dropped, step)
    return dropped


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
