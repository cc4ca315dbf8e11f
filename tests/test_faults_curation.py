"""Fault injection, curation side.

* every entry of a source folder (tests/fault_corpus.py: broken / looping links, FIFOs, devices, folders named like
  images, unreadable, vanishing and changing files, ...) is kept or in the removal manifest with its reason, and
  stats.json adds up (entries listed = kept + removed); nothing crashes or blocks the run;
* rows that are only paths are removed as `path_only` (their files never read) unless the source trusts them;
* outputs are published atomically: killed at every write of the commit, `output.dir` holds the complete previous
  output or the complete new one; a folder curate.py did not write is refused; leftovers are cleaned up.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
from pathlib import Path

import datasets
import numpy as np
import pytest
from fault_corpus import MIN_SIZE, OK, build_fault_corpus, read_faults
from PIL import Image

from curation import CurateConfig, CurationError, run_pipeline
from curation.outdir import MARKER, OUTPUT_NAMES
from curation.pipeline import check_invariants
from training.config import load_config

HASHES_ONLY = ["dedup.copy_detection.model=null", "embed.model=null", "decontaminate.model=null",
               "cluster.num_clusters=0", "select.mode=none"]


def config(out: Path, sources: str, *extra: str) -> CurateConfig:
    return load_config(CurateConfig, [f"sources={sources}", *HASHES_ONLY, f"output.dir={out}", *extra])


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading would block forever)."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: something blocked")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def manifest(out: Path) -> list[dict]:
    return datasets.load_from_disk(str(out / "removed")).to_list()


def test_every_entry_is_kept_or_removed_with_its_reason(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    entries = build_fault_corpus(root, tmp_path / "outside")
    out = tmp_path / "out"
    # Dedup off: this is about accounting for entries (sub/link_up.jpg is photo.jpg's bytes under another name).
    cfg = config(out, f"[{{name: odd, path: {root}}}]", f"validate.min_size={MIN_SIZE}", "dedup.exact=false",
                 "dedup.phash_max_distance=null")
    with read_faults(monkeypatch), deadline(120):
        stats = run_pipeline(cfg)
    kept = {i.split("/", 1)[1] for i in datasets.load_from_disk(str(out / "dataset"))["id"]}
    removed = {r["id"].split("/", 1)[1]: r["reason"] for r in manifest(out)}
    assert not kept & set(removed)
    assert kept | set(removed) == set(entries)  # every entry, split words and odd names included
    for rel, entry in entries.items():
        if entry.curation == OK:
            assert rel in kept, (rel, removed.get(rel))
        else:
            assert removed[rel].split(":", 1)[0] in entry.curation, (rel, removed.get(rel))
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["entries_listed"] == len(entries) == on_disk["num_rows"] + on_disk["num_removed"]
    assert on_disk["sources"]["odd"]["entries_listed"] == len(entries)
    assert on_disk["sources"]["odd"]["hidden_skipped"] == 3  # .DS_Store, .hidden.png, .git/
    assert sum(on_disk["removed_reasons"].values()) == on_disk["num_removed"]
    assert on_disk["removed_reasons"]["special_file"] == 4 and on_disk["removed_reasons"]["symlink_loop"] == 5
    assert stats["num_rows"] == len(kept)


def test_check_invariants_catches_unaccounted_entries():
    good = {"steps": [{"step": "ingest", "rows_in": 5, "rows_kept": 5, "rows_removed": 0}], "num_rows": 3,
            "num_removed": 2, "entries_listed": 5, "sources": {"a": {"entries_listed": 5}},
            "removed_reasons": {"zero_byte": 2}}
    check_invariants(good)
    for change, match in ((("entries_listed", 6), "entries listed"), (("sources", {"a": {"entries_listed": 4}}),
                          "per source"), (("removed_reasons", {"zero_byte": 1}), "reasons")):
        with pytest.raises(RuntimeError, match=match):
            check_invariants({**good, change[0]: change[1]})


# --------------------------------------------------------------------------------------------------------------
# Rows that are only paths


def png(seed: int, size: int = 24) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def crafted_parquet(path: Path, values: list) -> Path:
    """Exactly these image values (`to_parquet` would embed local files and look up URLs)."""
    import pyarrow.parquet as pq

    features = datasets.Features({"image": datasets.Image()})
    pq.write_table(datasets.Dataset.from_dict({"image": values}, features=features).data.table, str(path))
    return path


def test_path_only_rows_are_removed_unless_the_source_trusts_them(tmp_path):
    secret = tmp_path / "home" / "secret.png"  # a local file the crafted rows name
    secret.parent.mkdir()
    secret.write_bytes(png(1))
    rows = [{"bytes": png(0), "path": None}, {"bytes": None, "path": str(secret)},
            {"bytes": None, "path": "https://example.com/x.png"}]
    src = crafted_parquet(tmp_path / "crafted.parquet", rows)
    out = tmp_path / "out"
    run_pipeline(config(out, f"[{{name: c, path: {src}}}]", "validate.min_size=8"))
    reasons = {r["id"]: r["reason"] for r in manifest(out)}
    assert set(reasons) == {"c/000000001", "c/000000002"}
    assert all(r.startswith("path_only: ") for r in reasons.values())
    ds = datasets.load_from_disk(str(out / "dataset")).cast_column("image", datasets.Image(decode=False))
    assert ds["id"] == ["c/000000000"] and secret.read_bytes() not in [v["bytes"] for v in ds["image"]]
    # The user says the paths are trusted: local paths are read, URLs still never fetched.
    run_pipeline(config(out, f"[{{name: c, path: {src}, allow_local_paths: true}}]", "validate.min_size=8"))
    assert datasets.load_from_disk(str(out / "dataset"))["id"] == ["c/000000000", "c/000000001"]
    assert [r["id"] for r in manifest(out)] == ["c/000000002"]
    # Nothing but paths: an error that says what to set.
    only = crafted_parquet(tmp_path / "only.parquet", [{"bytes": None, "path": str(secret)}] * 2)
    with pytest.raises(CurationError, match=r"source 'p'.*every row.*allow_local_paths: true"):
        run_pipeline(config(out, f"[{{name: p, path: {only}}}]"))


# --------------------------------------------------------------------------------------------------------------
# Atomic outputs

COMMIT_POINTS = ["commit:dataset", "commit:manifest", "commit:stats", "commit:card", "commit:config", "commit:hub",
                 "commit:staged", "commit:links", "commit:switched", "commit:done"]
SWITCHED = {"commit:switched", "commit:done"}  # killed after the one rename that publishes


def image_folder(root: Path) -> Path:
    root.mkdir()
    for i in range(10):  # sizes 16..34: validate.min_size picks how many are kept
        (root / f"img_{i}.png").write_bytes(png(10 + i, 16 + 2 * i))
    return root


def snapshot(out: Path) -> dict | None:
    """What a reader of `output.dir` sees through the layout names: files, stats, rows, manifest, config."""
    if not (out / "stats.json").exists():
        assert not any((out / name).exists() for name in OUTPUT_NAMES), "a partial output is visible"
        return None
    files = sorted(str(p.relative_to(out / name)) for name in OUTPUT_NAMES if (out / name).is_dir()
                   for p in (out / name).rglob("*"))
    stats = json.loads((out / "stats.json").read_text())
    hub_rows = sum(len(datasets.Dataset.from_parquet(str(p))) for p in (out / "hub" / "data").glob("*.parquet"))
    return {
        "names": sorted(n for n in OUTPUT_NAMES if (out / n).exists()), "files": files,
        "stats": {k: stats[k] for k in ("num_rows", "num_removed", "entries_listed", "removed_reasons")},
        "ids": datasets.load_from_disk(str(out / "dataset"))["id"], "hub_rows": hub_rows,
        "removed": [r["id"] for r in manifest(out)],
        "min_size": next(line for line in (out / "config.yaml").read_text().splitlines() if "min_size" in line),
        "card": (out / "README.md").read_text(),
    }


def _killed_run(cfg: CurateConfig, point: str) -> None:
    os.environ["DINOFORGE_CURATE_KILL_AT"] = point
    run_pipeline(cfg)
    os._exit(0)  # not killed: the kill point was never reached


def run_killed(cfg: CurateConfig, point: str) -> None:
    """Run in a forked child (no re-import) that SIGKILLs itself at `point`."""
    child = multiprocessing.get_context("fork").Process(target=_killed_run, args=(cfg, point))
    child.start()
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, (point, child.exitcode)


def test_killed_at_every_write_of_the_commit_leaves_old_or_new_output(tmp_path):
    src = image_folder(tmp_path / "imgs")
    sources = f"[{{name: s, path: {src}}}]"
    old_cfg = config(tmp_path / "out", sources, "validate.min_size=8")
    new_cfg = config(tmp_path / "out", sources, "validate.min_size=30")
    run_pipeline(config(tmp_path / "ref", sources, "validate.min_size=30"))
    new = snapshot(tmp_path / "ref")
    out = tmp_path / "out"
    run_pipeline(old_cfg)
    old = snapshot(out)
    assert old["ids"] != new["ids"] and old["files"] == new["files"] and old["hub_rows"] == len(old["ids"])
    for point in COMMIT_POINTS:
        run_killed(new_cfg, point)
        assert snapshot(out) == (new if point in SWITCHED else old), point
        run_pipeline(old_cfg)  # back to the old output; also cleans the killed run's leftovers
        assert snapshot(out) == old
        hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
        assert len(hidden) == 3 and hidden[0] == ".current" and hidden[1] == MARKER, hidden  # + one .out-*
    run_pipeline(new_cfg)
    assert snapshot(out) == new


def test_first_output_killed_shows_no_output_then_completes(tmp_path):
    src = image_folder(tmp_path / "imgs")
    cfg = config(tmp_path / "out", f"[{{name: s, path: {src}}}]", "validate.min_size=8")
    run_killed(cfg, "commit:links")  # links made, not yet switched: they dangle
    assert snapshot(tmp_path / "out") is None
    run_pipeline(cfg)
    assert snapshot(tmp_path / "out")["stats"]["num_rows"] == 10
    assert not list((tmp_path / "out").glob(".staging-*"))


def test_output_dir_not_written_by_curate_is_refused(tmp_path):
    src = image_folder(tmp_path / "imgs")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(CurationError, match=r"non-empty folder that curate.py did not write.*notes.txt"):
        run_pipeline(config(mine, f"[{{name: s, path: {src}}}]"))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # nothing written
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CurationError, match="not a folder"):
        run_pipeline(config(tmp_path / "a_file", f"[{{name: s, path: {src}}}]"))
    empty = tmp_path / "empty"
    empty.mkdir()
    run_pipeline(config(empty, f"[{{name: s, path: {src}}}]", "validate.min_size=8"))
    assert (empty / MARKER).is_file() and (empty / "dataset").is_symlink()


def test_older_curate_output_is_adopted(tmp_path):
    """A folder an older curate.py wrote (real dataset/, stats.json, cache/steps, a dataset.tmp leftover)."""
    src = image_folder(tmp_path / "imgs")
    out = tmp_path / "legacy"
    (out / "cache" / "steps").mkdir(parents=True)
    (out / "dataset.tmp").mkdir()
    datasets.Dataset.from_dict({"id": ["old"]}).save_to_disk(str(out / "dataset"))
    (out / "stats.json").write_text("{}")
    (out / "README.md").write_text("old card")
    run_pipeline(config(out, f"[{{name: s, path: {src}}}]", "validate.min_size=8"))
    assert (out / MARKER).is_file() and all((out / n).is_symlink() for n in OUTPUT_NAMES)
    assert len(datasets.load_from_disk(str(out / "dataset"))) == 10
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("."))[:2] == [".current", MARKER]
    assert not (out / ".out-legacy").exists() and not (out / "dataset.tmp").exists()


def test_nothing_kept_or_nothing_removed_still_loads(tmp_path):
    """datasets writes 0 shards for an empty dataset, which load_from_disk cannot read back: both outputs are
    written loadable when empty."""
    src = tmp_path / "bad"
    src.mkdir()
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    stats = run_pipeline(config(out, f"[{{name: b, path: {src}}}]"))
    assert stats["num_rows"] == 0 and len(datasets.load_from_disk(str(out / "dataset"))) == 0
    assert len(manifest(out)) == stats["entries_listed"] == 2


def test_leftovers_of_dead_runs_are_removed_live_ones_kept(tmp_path):
    src = image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    cfg = config(out, f"[{{name: s, path: {src}}}]", "validate.min_size=8")
    run_pipeline(cfg)
    dead, live = 999_999_999, os.getppid()  # no such process / a running one (another run's, say)
    for name in (f".staging-{dead}", f".out-1-{dead}", f".staging-{live}"):
        (out / name).mkdir()
    os.symlink("x", out / f".link-dataset.tmp{dead}")
    run_pipeline(cfg)
    left = sorted(p.name for p in out.iterdir() if p.name.startswith((".staging", ".link", ".out-1-")))
    assert left == [f".staging-{live}"]
