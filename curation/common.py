"""Shared pieces: errors, step fingerprints, the on-disk step cache and the (optional) distributed state."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Bump when a step's output for the same inputs changes, so old caches are not reused.
CODE_VERSION = "curation-2"  # 2: ingest rows carry `error` (entries that could not be read)


class CurationError(ValueError):
    """Something the user can fix (bad path, bad source, offline Hub model, bad config combination)."""


def require_faiss() -> Any:
    """The `faiss` module, or an error saying which extra installs it (it is not a base dependency, because the
    CPU and GPU builds both install the module `faiss` and must not be installed together)."""
    try:
        import faiss as module
    except ImportError as e:
        raise CurationError(
            "curation needs Faiss: pip install 'dinoforge[cpu]' (faiss-cpu), or 'dinoforge[gpu]' (faiss-gpu-cu12) on "
            "a GPU machine — never both"
        ) from e
    return module


def fingerprint(*parts: Any) -> str:
    """Stable 16-hex key from JSON-able parts (step name, step config, input key, model identity)."""
    blob = json.dumps([CODE_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def kill_point(name: str) -> None:
    """Test hook: `DINOFORGE_CURATE_KILL_AT=name` SIGKILLs the process here (a real mid-step kill, no cleanup)."""
    if os.environ.get("DINOFORGE_CURATE_KILL_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class DistState:
    """Process rank/world for `accelerate launch`; a plain single process when accelerate is not launched."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._state = None
        if self.world_size > 1:
            import torch
            from accelerate import PartialState

            # CPU-only machines: gloo processes (accelerate would otherwise look for GPUs)
            self._state = PartialState(cpu=not torch.cuda.is_available())
            self.rank = self._state.process_index
            self.world_size = self._state.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        if self._state is not None:
            return str(self._state.device)
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()


class StepCache:
    """One folder per finished step result under `output.dir/cache/steps/<name>-<key>/`.

    A step writes into a temporary folder and renames it when complete, so a kill mid-step leaves nothing that
    looks finished; the re-run recomputes only that step. Under `accelerate launch` the main process computes
    and the others wait, then read the same files.
    """

    def __init__(self, root: str | Path, dist: DistState | None = None) -> None:
        self.root = Path(root)  # created by the first step that runs, not before the config is checked
        self.dist = dist or DistState()
        self.log: list[dict[str, Any]] = []

    def path(self, name: str, key: str) -> Path:
        return self.root / f"{name}-{key}"

    def done(self, name: str, key: str) -> bool:
        return (self.path(name, key) / "DONE").is_file()

    def run(self, name: str, key: str, compute: Callable[[Path], None]) -> Path:
        """Run `compute(tmp_dir)` unless this (name, key) finished before; return the finished folder."""
        final = self.path(name, key)
        cached = self.done(name, key)
        start = time.time()
        if not cached and self.dist.is_main:
            tmp = final.with_name(final.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            compute(tmp)
            (tmp / "DONE").write_text(json.dumps({"seconds": time.time() - start}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.dist.barrier()
        self.log.append({"step": name, "key": key, "cached": cached, "seconds": round(time.time() - start, 3)})
        return final


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
