"""Local files, listed so that every entry is accounted for and read so that no entry can hang, crash or escape a run.

Listing (:func:`walk`, used by the resolver for every local folder, so training, the probe and curation see the
same entries):

* regular files — and symbolic links to regular files *wherever they point*: the user pointed at the folder, so its
  links are part of it (a link out of the folder is followed; its path stays the one inside the folder) -> ``files``;
* folders are walked, symbolic links to folders too, except a link back to a folder that contains it (a loop),
  which is an entry of its own; a folder reached twice by different non-looping links is listed twice (under each
  name), like any other copy;
* every other entry is a :class:`Fault` with a reason code (:data:`FILE_REASONS`): ``broken_symlink``,
  ``symlink_loop`` (a link cycle, or a folder link back to an ancestor), ``not_a_file`` (a folder named like a file,
  such as ``photo.jpg/``; its content is still listed), ``special_file`` (FIFO, socket, device: never opened),
  ``unreadable`` (no permission to look at it or list it), ``vanished`` (gone while the folder was listed);
* hidden names (a leading ``.``, e.g. ``.DS_Store``, ``.git/``) are skipped, as ``datasets``' own folder loaders
  skip them, but kept in ``hidden`` so they can be counted and reported.

Reading (:func:`read_file`) checks what a path is before and after opening it — without blocking: a FIFO is opened
non-blocking and refused — and raises :class:`FileFault` with the same reason codes, plus ``vanished`` (the file
is gone) and ``changed`` (size or modification time differ from the listing, or the file changed while read).

Untrusted paths. A dataset row whose image is only a path (no bytes) must not make a run read any local file it
likes (a crafted parquet naming ``~/.ssh/id_rsa`` would otherwise end up in a curated, pushed dataset). A
:class:`PathPolicy` says which paths such a row may open: by default only files under the local image folders (or
matching the glob, or the single file) that the user pointed at as a data source in this process —
:func:`training.data.sources.resolve_source` registers them with :func:`trust_local_source`. URLs (any
``scheme://``, archive chains ``...::...``) are never opened by the decoder.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "FILE_REASONS",
    "Fault",
    "FileFault",
    "Listing",
    "PathPolicy",
    "is_url",
    "os_fault",
    "path_policy",
    "read_file",
    "trust_local_source",
    "walk",
]

FILE_REASONS = ("broken_symlink", "symlink_loop", "not_a_file", "special_file", "unreadable", "vanished", "changed")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# Open flags: never block on a FIFO, never make a terminal the controlling one, never leak the fd to children.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


class FileFault(Exception):
    """A local entry that cannot be read as a file: ``reason`` (one of :data:`FILE_REASONS`), ``detail``, ``path``."""

    def __init__(self, reason: str, detail: str, path: str | os.PathLike) -> None:
        self.reason, self.detail, self.path = reason, detail, str(path)
        super().__init__(f"{self.path}: {reason}: {detail}")

    def __reduce__(self):  # picklable across worker processes
        return type(self), (self.reason, self.detail, self.path)


@dataclass(frozen=True)
class Fault:
    """A listed entry that is not a readable file, and why."""

    path: Path
    reason: str
    detail: str


@dataclass
class Listing:
    """What :func:`walk` found: ``files`` (sorted by path string) with their ``stats`` (size, mtime in ns) as
    listed, ``faults`` and ``hidden`` entries (each sorted)."""

    files: list[Path] = field(default_factory=list)
    stats: list[tuple[int, int]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def os_fault(path: str | os.PathLike, err: OSError) -> FileFault:
    """The :class:`FileFault` (reason code) for an OSError met while looking at or opening ``path``."""
    code = err.errno
    if code == errno.ELOOP:
        return FileFault("symlink_loop", "a cycle of symbolic links", path)
    if code == errno.ENOENT or isinstance(err, FileNotFoundError):
        if os.path.islink(path):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return FileFault("broken_symlink", f"symbolic link to {target!r}, which does not exist", path)
        return FileFault("vanished", "no longer exists (removed after it was listed)", path)
    if code in (errno.EACCES, errno.EPERM) or isinstance(err, PermissionError):
        return FileFault("unreadable", f"permission denied ({err.strerror or err})", path)
    if code == errno.EISDIR:
        return FileFault("not_a_file", "a folder, not a file", path)
    if code == errno.ENXIO:
        return FileFault("special_file", "a special file that cannot be opened for reading", path)
    return FileFault("unreadable", f"{type(err).__name__}: {err.strerror or err}", path)


def _scandir(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return list(entries)


def walk(root: str | os.PathLike, file_suffixes: Iterable[str] = ()) -> Listing:
    """List every entry under ``root`` as the module docstring says; never raises for an odd entry.

    ``file_suffixes`` (lower case, with the dot): a folder whose name ends with one of them is also reported as a
    ``not_a_file`` fault (e.g. ``photo.jpg/``), since the user surely meant a file there.
    """
    suffixes = {s.lower() for s in file_suffixes}
    out = Listing()
    files: list[tuple[Path, tuple[int, int]]] = []
    root = Path(root)
    top = os.stat(root)
    stack: list[tuple[Path, frozenset[tuple[int, int]]]] = [(root, frozenset({(top.st_dev, top.st_ino)}))]
    while stack:  # iterative: deep nesting cannot hit the recursion limit
        folder, ancestors = stack.pop()
        try:
            entries = _scandir(folder)
        except OSError as err:
            fault = os_fault(folder, err)
            out.faults.append(Fault(folder, fault.reason, f"cannot list the folder: {fault.detail}"))
            continue
        for entry in entries:
            path = folder / entry.name
            if entry.name.startswith("."):
                out.hidden.append(path)
                continue
            try:
                st = os.stat(path)  # follows symbolic links
            except OSError as err:
                fault = os_fault(path, err)
                out.faults.append(Fault(path, fault.reason, fault.detail))
                continue
            if stat.S_ISDIR(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if ident in ancestors:
                    out.faults.append(Fault(path, "symlink_loop", "links back to a folder that contains it"))
                    continue
                if path.suffix.lower() in suffixes:
                    out.faults.append(Fault(path, "not_a_file", "a folder named like a file (its content is listed)"))
                stack.append((path, ancestors | {ident}))
            elif stat.S_ISREG(st.st_mode):
                files.append((path, (st.st_size, st.st_mtime_ns)))
            else:
                out.faults.append(Fault(path, "special_file", f"a {_kind(st.st_mode)}, not a regular file; never opened"))
    files.sort(key=lambda item: str(item[0]))
    out.files = [f for f, _ in files]
    out.stats = [s for _, s in files]
    out.faults.sort(key=lambda f: str(f.path))
    out.hidden.sort(key=str)
    return out


def _open_fd(path: str) -> int:
    """``os.open`` for reading (a seam: tests simulate unreadable files here, since root ignores permissions)."""
    return os.open(path, _OPEN_FLAGS)


def read_file(path: str | os.PathLike, expected: tuple[int, int] | None = None) -> bytes:
    """The bytes of the regular file ``path`` (symbolic links followed), or :class:`FileFault`.

    Never blocks and never opens a FIFO, socket or device for reading: the entry is checked before it is opened,
    and again on the opened descriptor (it may have been swapped in between). ``expected`` = (size, mtime in ns) as
    listed: a different file at read time is a ``changed`` fault, so a cache keyed on the listing stays true.
    """
    path = os.fspath(path)
    try:
        before = os.stat(path)
    except OSError as err:
        raise os_fault(path, err) from err
    if stat.S_ISDIR(before.st_mode):
        raise FileFault("not_a_file", "a folder, not a file", path)
    if not stat.S_ISREG(before.st_mode):
        raise FileFault("special_file", f"a {_kind(before.st_mode)}, not a regular file; never opened", path)
    try:
        fd = _open_fd(path)
    except OSError as err:
        raise os_fault(path, err) from err
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise FileFault("special_file", f"became a {_kind(st.st_mode)} after it was listed; not read", path)
        listed = expected if expected is not None else (before.st_size, before.st_mtime_ns)
        if (st.st_size, st.st_mtime_ns) != tuple(listed):
            raise FileFault("changed", f"size/mtime {st.st_size}/{st.st_mtime_ns} differ from the listing "
                                       f"{listed[0]}/{listed[1]}", path)
        try:
            data = f.read()
        except OSError as err:
            raise os_fault(path, err) from err
    if len(data) != st.st_size:
        raise FileFault("changed", f"read {len(data)} bytes of a file of {st.st_size}: it changed while read", path)
    return data


def is_url(path: str) -> bool:
    """True for ``scheme://...`` and fsspec chains (``zip://a::b``), which the decoder never opens."""
    return bool(_URL.match(path)) or "::" in path


# ---------------------------------------------------------------------------------------------------------------
# Which paths an image value that is only a path may open


_TRUSTED_FOLDERS: set[str] = set()
_TRUSTED_FILES: set[str] = set()
_TRUSTED_PATTERNS: set[str] = set()
_TRUSTED_URL_PREFIXES: set[str] = set()


def _norm(path: str | os.PathLike) -> str:
    # Lexical (no symlink resolution): a link inside a trusted folder stays trusted, as the listing follows it.
    return os.path.abspath(os.fspath(path))


def trust_local_source(folder: str | os.PathLike | None = None, files: Iterable[str | os.PathLike] = (),
                       pattern: str | None = None) -> None:
    """Record what the user pointed at as a data source: a local folder (everything under it), exact files, or a
    glob pattern (kept as a pattern, so a policy stays small enough to hand to every DataLoader worker)."""
    if folder is not None:
        _TRUSTED_FOLDERS.add(_norm(folder))
    if pattern is not None:
        _TRUSTED_PATTERNS.add(_norm(pattern))
    _TRUSTED_FILES.update(_norm(f) for f in files)


def trust_hub_dataset(repo_id: str) -> None:
    """Record a Hub dataset the user pointed at: its files, which `datasets` downloads into the Hub cache (and
    extracts archives of into its extraction folder), may be opened by path, and its own `hf://datasets/<repo>`
    URLs (what a streamed image folder holds) may be fetched. Nothing else of the Hub is."""
    from datasets import config
    from huggingface_hub import constants

    _TRUSTED_FOLDERS.add(_norm(os.path.join(constants.HF_HUB_CACHE, "datasets--" + repo_id.replace("/", "--"))))
    _TRUSTED_FOLDERS.add(_norm(config.EXTRACTED_DATASETS_PATH))  # shared by every dataset's archives
    _TRUSTED_URL_PREFIXES.update({f"hf://datasets/{repo_id}/", f"hf://datasets/{repo_id}@"})


class PathPolicy:
    """Which local paths (and URLs) an image value holding only a path may open. Picklable: take it in the main
    process (:func:`path_policy`) and hand it to DataLoader workers, which may not share this process's memory."""

    def __init__(self, folders: Iterable[str] = (), files: Iterable[str] = (), any_local: bool = False,
                 patterns: Iterable[str] = (), url_prefixes: Iterable[str] = ()) -> None:
        self.folders = tuple(sorted({_norm(f) for f in folders}))
        self.files = frozenset(_norm(f) for f in files)
        self.patterns = tuple(sorted({_norm(p) for p in patterns}))
        self.url_prefixes = tuple(sorted(set(url_prefixes)))
        self.any_local = any_local

    def allows(self, path: str | os.PathLike) -> bool:
        if is_url(os.fspath(path)):
            return os.fspath(path).startswith(self.url_prefixes)
        if self.any_local:
            return True
        return _under(_norm(path), self.folders, self.files, self.patterns)

    def __repr__(self) -> str:
        if self.any_local:
            return "PathPolicy(any_local=True)"
        return f"PathPolicy(folders={list(self.folders)}, files={len(self.files)}, patterns={list(self.patterns)})"


def _under(path: str, folders: Iterable[str], files: Iterable[str], patterns: Iterable[str]) -> bool:
    if path in files:
        return True
    if any(path.startswith(f if f.endswith(os.sep) else f + os.sep) for f in folders):
        return True
    # fnmatch's `*` also matches `/`: a little wider than the glob, never outside its fixed leading folders.
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


AllowPaths = bool | PathPolicy | Sequence[str | os.PathLike] | None


def path_policy(allow_paths: AllowPaths = None) -> PathPolicy:
    """``None``: the local sources registered so far (a snapshot); ``True``: any local path (the user trusts the
    dataset's paths); ``False``: none; a :class:`PathPolicy` as is; a list: those folders (and files)."""
    if isinstance(allow_paths, PathPolicy):
        return allow_paths
    if allow_paths is None:
        return PathPolicy(_TRUSTED_FOLDERS, _TRUSTED_FILES, patterns=_TRUSTED_PATTERNS,
                          url_prefixes=_TRUSTED_URL_PREFIXES)
    if isinstance(allow_paths, bool):
        return PathPolicy(any_local=allow_paths, url_prefixes=_TRUSTED_URL_PREFIXES if allow_paths else ())
    items = [os.fspath(p) for p in allow_paths]
    return PathPolicy([p for p in items if os.path.isdir(p)], [p for p in items if not os.path.isdir(p)])


def allows_path(path: str, allow_paths: AllowPaths) -> bool:
    """:meth:`PathPolicy.allows` without building a policy (``None`` reads the live registry)."""
    if allow_paths is None:
        if is_url(path):
            return path.startswith(tuple(_TRUSTED_URL_PREFIXES))
        return _under(_norm(path), _TRUSTED_FOLDERS, _TRUSTED_FILES, _TRUSTED_PATTERNS)
    return path_policy(allow_paths).allows(path)
