"""`output.dir`: claimed with a marker, written through a staging folder, published with one atomic rename.

Layout (the DESIGN.md names stay the public paths; they are fixed relative symbolic links):

    output.dir/
      .dinoforge-curate           marker: curate.py owns this folder (a non-empty folder without it is refused)
      .current -> .out-<id>       THE switch: one symbolic link, replaced by a single os.replace per publication
      .out-<id>/                  one complete output: dataset/ removed/ removed.parquet stats.json README.md hub/
                                  config.yaml
      dataset -> .current/dataset, removed -> .current/removed, stats.json -> .current/stats.json, ... (created
                                  once, never changed; they dangle until the first output is published)
      cache/                      the step cache, in place (never part of an output)
      .staging-<pid>/             an output being written

A run writes every piece into `.staging-<pid>/`, renames that folder to `.out-<id>` and then replaces `.current`
with one `os.replace` of a symbolic link: whoever reads through the layout names sees the previous complete output
or the new complete one, whenever the process is killed. The previous output is deleted after the switch;
leftovers of a killed run (a staging folder, an unpublished `.out-*`, a temporary link) are deleted when the next
run claims the folder, unless the process that made them is still running.

An `output.dir` written by an older curate.py (real `dataset/`, `stats.json`, ... next to `cache/steps` or
`cache/ingest`, no marker) is adopted: its outputs are moved into `.out-legacy/` and published as the current one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from .common import CurationError, kill_point

__all__ = ["MARKER", "OUTPUT_NAMES", "OutputDir"]

MARKER = ".dinoforge-curate"
CURRENT = ".current"
LEGACY = ".out-legacy"
OUTPUT_NAMES = ("dataset", "removed", "removed.parquet", "stats.json", "README.md", "hub", "config.yaml")
_LEFTOVER = re.compile(r"^(?:\.staging-|\.out-\d+-|\.current\.tmp-|\.link-.+\.tmp)(\d+)$")
_SHOW = 5


def _alive(pid: int) -> bool:
    """Whether another process with this id runs (our own id on a leftover means a reused id: not alive)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


class OutputDir:
    """The curate.py side of `output.dir` (see the module docstring). Only the main process writes."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # ---------- ownership ----------

    def _is_legacy(self, names: set[str]) -> bool:
        allowed = {*OUTPUT_NAMES, "cache", "dataset.tmp", CURRENT, LEGACY}
        ours = (self.root / "cache" / "steps").is_dir() or (self.root / "cache" / "ingest").is_dir()
        return names <= allowed and (ours or LEGACY in names)

    def check(self) -> None:
        """Raise `CurationError` unless `output.dir` is absent, empty, curate.py's (marker) or an older curate.py
        output. Reads only; safe on every process."""
        root = self.root
        if not os.path.lexists(root):
            return
        if not root.is_dir():
            raise CurationError(f"output.dir {str(root)!r} exists and is not a folder; set output.dir to a new or "
                                "empty folder")
        if (root / MARKER).is_file():
            return
        names = set(os.listdir(root))
        if not names or self._is_legacy(names):
            return
        shown = ", ".join(sorted(names)[:_SHOW]) + (", ..." if len(names) > _SHOW else "")
        raise CurationError(
            f"output.dir {str(root)!r} is a non-empty folder that curate.py did not write (no {MARKER} marker; it "
            f"holds {shown}). curate.py replaces its outputs there, so it does not write into other folders: set "
            "output.dir to a new or empty folder (or delete this one if it is disposable)")

    def claim(self) -> None:
        """Make `output.dir` curate.py's (main process): create it, adopt an older output, mark it, and delete the
        leftovers of killed runs."""
        self.check()
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER
        if not marker.is_file():
            if self._is_legacy(set(os.listdir(self.root))):
                self._adopt_legacy()
            # Its existence is what counts (a torn write is still a marker), so no temporary file to leave behind.
            marker.write_text(json.dumps({"written_by": "dinoforge curate.py", "layout": 1}) + "\n")
        self._clean_leftovers()

    def _adopt_legacy(self) -> None:
        # Resumable: each move is one rename, and a re-run finds the rest to do.
        legacy = self.root / LEGACY
        legacy.mkdir(exist_ok=True)
        if self.current() is None:
            self._switch(legacy)
        for name in OUTPUT_NAMES:
            path = self.root / name
            if os.path.lexists(path) and not path.is_symlink():
                os.replace(path, legacy / name)
        _remove(self.root / "dataset.tmp")
        self._ensure_links()

    def _clean_leftovers(self) -> None:
        current = self.current()
        for entry in self.root.iterdir():
            match = _LEFTOVER.match(entry.name)
            if match and entry != current and not _alive(int(match.group(1))):
                _remove(entry)

    # ---------- publishing ----------

    def current(self) -> Path | None:
        """The published output folder (`None` before the first publication)."""
        link = self.root / CURRENT
        return self.root / os.readlink(link) if link.is_symlink() else None

    def staging(self) -> Path:
        """A fresh folder to write the next output into."""
        path = self.root / f".staging-{os.getpid()}"
        _remove(path)
        path.mkdir(parents=True)
        return path

    def _ensure_links(self) -> None:
        for name in OUTPUT_NAMES:
            link, target = self.root / name, f"{CURRENT}/{name}"
            if link.is_symlink() and os.readlink(link) == target:
                continue
            if os.path.lexists(link) and not link.is_symlink() and link.is_dir():
                raise CurationError(f"{link} is a folder where curate.py keeps a link to its output; move it away")
            tmp = link.with_name(f".link-{name}.tmp{os.getpid()}")
            _remove(tmp)
            os.symlink(target, tmp)
            os.replace(tmp, link)  # atomic, also over a stray file of that name

    def _switch(self, version: Path) -> None:
        tmp = self.root / f"{CURRENT}.tmp-{os.getpid()}"
        _remove(tmp)
        os.symlink(version.name, tmp)
        os.replace(tmp, self.root / CURRENT)  # the one atomic step that publishes `version`

    def publish(self, staging: Path) -> Path:
        """Publish a complete staging folder as the current output; returns its final folder."""
        version = self.root / f".out-{time.time_ns()}-{os.getpid()}"
        os.replace(staging, version)
        kill_point("commit:staged")
        self._ensure_links()  # before the switch: dangling until the first one, then always resolving
        kill_point("commit:links")
        old = self.current()
        self._switch(version)
        kill_point("commit:switched")
        if old is not None and old != version:
            _remove(old)
        return version
