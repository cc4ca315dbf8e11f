"""Fault injection, training and probe side.

* a folder of odd real-world entries (tests/fault_corpus.py, >= 40 kinds) is one dataset whatever its names: every
  image file is read, the unusable ones are skipped and reported per batch with their reason, nothing blocks;
* rows that are only a path (parquet / save_to_disk) are never opened unless trusted, URLs never fetched, and a
  dataset with nothing else says to set data.allow_local_paths=true;
* streamed sources shuffle (data.shuffle_buffer) as a function of seed + epoch only, so replaying an epoch on
  resume is exact, with 0 or 2 workers.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from fault_corpus import OK, build_fault_corpus, image_files, read_faults
from PIL import Image

from training.augment import MultiCropAugmentation
from training.data import (
    FILE_REASONS,
    ImageDataset,
    ImageDecodeError,
    SampleCollator,
    build_dataloader,
    build_loader,
    decode_image,
    fix_for,
    load_image_dataset,
    path_policy,
    resolve_source,
    set_loader_epoch,
)
from training.train_config import TrainConfig

LISTING_REASONS = {"broken_symlink", "symlink_loop", "not_a_file", "special_file"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "corpus"
    return root, build_fault_corpus(root, tmp_path / "outside")


def rel_paths(ds: datasets.Dataset, root: Path) -> list[str]:
    values = ds.cast_column("image", datasets.Image(decode=False))["image"]
    return sorted(Path(v["path"]).relative_to(root).as_posix() for v in values)


def test_corpus_has_at_least_40_kinds(corpus):
    _, entries = corpus
    assert len({e.kind for e in entries.values()}) >= 40


def test_listing_accounts_for_every_entry(corpus):
    root, entries = corpus
    local = resolve_source(root).local
    files = {f.relative_to(root).as_posix() for f in local.files}
    faults = {f.path.relative_to(root).as_posix(): f.reason for f in local.faults}
    expected_faults = {rel: next(iter(e.curation)) for rel, e in entries.items()
                       if e.curation != OK and e.curation <= LISTING_REASONS}
    assert faults == expected_faults
    assert files == set(entries) - set(faults)  # everything else is a readable file, links followed
    assert sorted(p.name for p in local.hidden) == [".DS_Store", ".git", ".hidden.png"]
    assert set(FILE_REASONS) >= set(faults.values())


def test_training_reads_every_image_file_and_reports_the_rest(corpus, monkeypatch, tmp_path, caplog):
    root, entries = corpus
    expected = image_files(entries)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        ds = load_image_dataset(root, cache_dir=str(tmp_path / "hf"))
    assert rel_paths(ds, root) == expected  # split words in names: still one dataset, every image file
    assert "entries are not readable files" in caplog.text and "fifo.png (special_file)" in caplog.text
    augmentation = MultiCropAugmentation(global_size=28, local_size=14, local_number=1)
    with read_faults(monkeypatch):  # unreadable / vanished / changed at read time
        batches = list(build_dataloader(ds, augmentation, 1))
    skipped = {Path(name).relative_to(root).as_posix(): reason for b in batches for name, reason in b["skipped"]}
    assert sum(b["num_skipped"] for b in batches) == len(skipped)
    assert sum(b["batch_size"] for b in batches) + len(skipped) == len(expected)
    for rel in expected:
        want = entries[rel].training
        if want == OK:
            assert rel not in skipped, (rel, skipped.get(rel))
        else:
            assert skipped.get(rel) in want, (rel, skipped.get(rel), want)
    assert all(b["global_crops"].shape[0] == 2 for b in batches if b["batch_size"])


def test_probe_split_loads_every_image_file(corpus):
    from training.evaluation.features import _ImageBatches
    from training.evaluation.splits import load_split

    root, entries = corpus
    expected = image_files(entries)
    for split in ("train", "test"):  # no split folders: any split name is the whole folder
        assert rel_paths(load_split(root, split), root) == expected
    # The probe's batch dataset takes the path policy when built (the folder it was loaded from) and decodes with it.
    ds = load_split(root, "train")
    ds = ds.add_column("label", [0] * len(ds))
    batches = _ImageBatches(ds, "image", "label", lambda images, return_tensors: None, None)
    value = next(v for v in batches.dataset["image"] if v["path"].endswith("link_outside.png"))
    assert batches._decode(value, 0).size == (24, 20)


# --------------------------------------------------------------------------------------------------------------
# Rows that are only paths


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_parquet(path: Path, values: list) -> Path:
    """A parquet file holding exactly these image values, as a crafted dataset would (`to_parquet` would embed
    the local files' bytes and look up the URLs)."""
    import pyarrow.parquet as pq

    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": values, "id": list(range(len(values)))}, features=features)
    pq.write_table(ds.data.table, str(path))  # the schema metadata carries the Image feature
    return path


def _size(image, seed):
    return {"size": image.size}


def _sizes(kept):
    return {"sizes": [s["size"] for s in kept]}


def all_batches(ds, **kwargs) -> list[dict]:
    return list(build_loader(ds, _size, SampleCollator(_sizes), 1, **kwargs))


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "secret.jpg"  # a local file no data source points at
    path.parent.mkdir()
    path.write_bytes(jpeg(1))
    return path


def test_path_only_rows_are_not_opened_unless_trusted(tmp_path, secret, monkeypatch):
    import training.data.files as files

    opened: list[str] = []
    real = files._open_fd
    monkeypatch.setattr(files, "_open_fd", lambda p: opened.append(p) or real(p))
    urls = ["https://example.com/a.jpg", "hf://datasets/org/name/b.jpg", "file:///etc/hostname"]
    values = [{"bytes": jpeg(0), "path": None}, {"bytes": None, "path": str(secret)},
              *({"bytes": None, "path": u} for u in urls)]
    ds = load_image_dataset(write_parquet(tmp_path / "rows.parquet", values), cache_dir=str(tmp_path / "hf"))
    batches = all_batches(ds)
    assert sum(b["batch_size"] for b in batches) == 1
    skipped = sorted(entry for b in batches for entry in b["skipped"])
    assert skipped == sorted([(str(secret), "path_only"), *((u, "path_only") for u in urls)])
    assert opened == []  # not even opened
    # Trusted (data.allow_local_paths=true): local paths open, URLs still never fetched.
    batches = all_batches(ds, allow_paths=True)
    assert sum(b["batch_size"] for b in batches) == 2
    assert sorted(e for b in batches for e in b["skipped"]) == sorted((u, "path_only") for u in urls)
    assert opened == [str(secret)]


def test_only_path_rows_fail_at_once_with_the_fix(tmp_path, secret):
    parquet = write_parquet(tmp_path / "paths.parquet", [{"bytes": None, "path": str(secret)}] * 3)
    with pytest.raises(ValueError, match=r"Every row.*only a path.*set data.allow_local_paths=true"):
        ImageDataset(load_image_dataset(parquet, cache_dir=str(tmp_path / "hf")), _size)
    # save_to_disk embeds Image() files, so a saved dataset of paths has them as strings (datasets' advice)
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": [str(secret)] * 2}).save_to_disk(str(saved))
    with pytest.raises(ValueError, match="data.allow_local_paths=true"):
        ImageDataset(load_image_dataset(saved), _size)
    assert len(ImageDataset(load_image_dataset(saved), _size, allow_paths=True)) == 2
    # A stream cannot be counted up front: the worker that read only such rows raises at the end of its pass.
    stream = load_image_dataset(parquet, streaming=True)
    with pytest.raises(ValueError, match=r"All 3 rows of the stream.*data.allow_local_paths=true"):
        all_batches(stream)


def test_training_pipeline_passes_allow_local_paths(tmp_path, secret):
    from training.pipelines import _multicrop

    parquet = write_parquet(tmp_path / "paths.parquet", [{"bytes": None, "path": str(secret)}] * 2)
    cfg = tiny_config()
    ds = load_image_dataset(parquet, cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="data.allow_local_paths=true"):
        _multicrop({"patch_size": 14}, cfg, ds, rank=0, world_size=1)
    cfg.data.allow_local_paths = True
    batches = list(_multicrop({"patch_size": 14}, cfg, ds, rank=0, world_size=1))
    assert [b["batch_size"] for b in batches] == [2] and batches[0]["skipped"] == []


def test_decoder_path_rules(tmp_path, secret, corpus):
    root, _ = corpus
    resolve_source(root)  # pointing at the folder makes its paths (and its links' targets) readable
    assert decode_image({"bytes": None, "path": str(root / "link_outside.png")}).size == (24, 20)
    escape = f"{root}/../elsewhere/{secret.name}"
    for value in (str(secret), {"bytes": None, "path": str(secret)}, escape):
        with pytest.raises(ImageDecodeError, match="path_only") as err:
            decode_image(value)
        assert "data.allow_local_paths=true" in str(err.value)
    assert decode_image(str(secret), allow_paths=[secret.parent]).size == (16, 16)
    # A glob source trusts what it matches, not its neighbours.
    (secret.parent / "other.jpg").write_bytes(jpeg(2))
    resolve_source(f"{secret.parent}/secret*.jpg")
    assert decode_image(str(secret)).size == (16, 16)
    with pytest.raises(ImageDecodeError, match="path_only"):
        decode_image(str(secret.parent / "other.jpg"))
    for url in ("http://x/a.png", "hf://datasets/a/b/c.png", "zip://a.png::/tmp/x.zip", "s3://bucket/key.jpg"):
        with pytest.raises(ImageDecodeError, match="not fetched"):
            decode_image(url, allow_paths=True)
    assert "data.allow_local_paths=true" in fix_for("path_only")  # for the loop's "stopped on bad data" message
    with pytest.raises(ImageDecodeError, match="special_file"):  # never opened, so it cannot block
        decode_image(root / "fifo.png", allow_paths=True)


def test_a_hub_source_trusts_its_own_files_and_nothing_else(tmp_path, monkeypatch):
    """A Hub image folder's rows are paths into the Hub cache (or, streamed, `hf://datasets/<repo>` URLs): pointing
    at the repo trusts exactly those; other repos' cached files and other URLs stay closed."""
    import importlib
    import pickle

    from huggingface_hub import constants

    import training.data.files as files

    decode_module = importlib.import_module("training.data.decode")  # (`training.data.decode` is the function)
    for name in ("_TRUSTED_FOLDERS", "_TRUSTED_FILES", "_TRUSTED_PATTERNS", "_TRUSTED_URL_PREFIXES"):
        monkeypatch.setattr(files, name, set())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ours = tmp_path / "hub" / "datasets--org--name" / "snapshots" / "abc" / "train" / "cat" / "a.jpg"
    theirs = tmp_path / "hub" / "datasets--org--name2" / "snapshots" / "abc" / "b.jpg"
    for path in (ours, theirs):
        path.parent.mkdir(parents=True)
        path.write_bytes(jpeg(3))
    with pytest.raises(ImageDecodeError, match="path_only"):
        decode_image(str(ours))  # nothing trusted yet
    fetched: list[str] = []
    monkeypatch.setattr(decode_module, "_fetch", lambda url: fetched.append(url) or jpeg(4))
    files.trust_hub_dataset("org/name")
    assert decode_image(str(ours)).size == (16, 16)
    own_url = "hf://datasets/org/name@main/train/cat/a.jpg"
    assert decode_image({"bytes": None, "path": own_url}).size == (16, 16)
    for closed in (str(theirs), "hf://datasets/org/name2/b.jpg", "hf://datasets/org/nameX@main/a.jpg",
                   "https://huggingface.co/datasets/org/name/resolve/main/a.jpg", "hf://org/name/a.jpg"):
        with pytest.raises(ImageDecodeError, match="path_only"):
            decode_image(closed)
    assert fetched == [own_url]
    policy = pickle.loads(pickle.dumps(path_policy()))  # what the DataLoader workers get
    assert policy.allows(own_url) and policy.allows(ours) and not policy.allows(theirs)
    assert not path_policy(False).allows(own_url)


# --------------------------------------------------------------------------------------------------------------
# Streaming shuffle


def tiny_config() -> TrainConfig:
    cfg = TrainConfig()
    cfg.crops.global_size, cfg.crops.local_size, cfg.crops.local_number = 28, 14, 1
    cfg.optim.batch_size = 2
    cfg.data.num_workers = 0
    return cfg


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A save_to_disk dataset of 24 images, streamed as Arrow shards (parquet streams would do as well, but
    `datasets` sleeps 5 s at the end of every parquet stream pass, an Arrow-threads workaround)."""
    folder = tmp_path_factory.mktemp("shards") / "saved"
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("int64")})
    rows = {"image": [{"bytes": jpeg(100 + i), "path": None} for i in range(24)], "id": list(range(24))}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return folder


def _nothing(image, seed):
    return {}


def _ids_and_seeds(kept):
    return {"ids": [s["id"] for s in kept], "seeds": [s["sample_seed"] for s in kept]}


def stream_epoch(shards: Path, epoch: int, *, workers: int = 0, buffer: int = 8, skip: int = 0) -> list[dict]:
    """Batches of one epoch of a freshly built stream loader, the first `skip` dropped (the loop's replay)."""
    stream = load_image_dataset(shards, streaming=True)
    loader = build_loader(stream, _nothing, SampleCollator(_ids_and_seeds), 2, columns=["id"], seed=3,
                          num_workers=workers, shuffle_buffer_size=buffer)
    set_loader_epoch(loader, epoch)
    return [{"ids": b["ids"], "seeds": b["seeds"]} for b in loader][skip:]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_shuffle_depends_on_seed_and_epoch_only(shards, workers):
    first = stream_epoch(shards, 0, workers=workers)
    ids = [i for b in first for i in b["ids"]]
    assert sorted(ids) == list(range(24))  # every example once
    assert ids != sorted(ids) and ids != [i for b in stream_epoch(shards, 0, workers=workers, buffer=0)
                                          for i in b["ids"]]
    assert stream_epoch(shards, 0, workers=workers) == first  # re-created for the same epoch: same batches
    second = stream_epoch(shards, 1, workers=workers)
    assert [b["ids"] for b in second] != [b["ids"] for b in first]  # another epoch, another order
    # The loop resumes a stream by reading the epoch again and dropping the consumed batches: exact.
    assert stream_epoch(shards, 1, workers=workers, skip=3) == second[3:]


def test_stream_shuffle_same_examples_and_crops_with_0_or_2_workers(shards):
    """With workers each one shuffles its own shards, so the order depends on num_workers (as without shuffling);
    the examples and each example's crop seed do not."""
    seeds = []
    for workers in (0, 2):
        batches = stream_epoch(shards, 2, workers=workers)
        seeds.append({i: s for b in batches for i, s in zip(b["ids"], b["seeds"])})
    assert seeds[0] == seeds[1] and sorted(seeds[0]) == list(range(24))


def test_training_pipeline_shuffles_streams(shards):
    from training.pipelines import _multicrop

    cfg = tiny_config()
    cfg.data.streaming = True
    orders = {}
    for buffer in (0, 1000):
        cfg.data.shuffle_buffer = buffer
        loader = _multicrop({"patch_size": 14}, cfg, load_image_dataset(shards, streaming=True), rank=0,
                            world_size=1)
        orders[buffer] = [s["sample_seed"] for s in loader.dataset]  # the ImageStream the loader reads
    assert sorted(orders[0]) == sorted(orders[1000]) and orders[0] != orders[1000]
    cfg.data.shuffle_buffer = -1
    with pytest.raises(ValueError, match="data.shuffle_buffer"):
        _multicrop({"patch_size": 14}, cfg, load_image_dataset(shards, streaming=True), rank=0, world_size=1)


def test_fifo_in_a_folder_never_blocks(tmp_path):
    """A FIFO named like an image is listed as a fault, never opened (opening one for reading would block)."""
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg(5))
    os.mkfifo(root / "b.jpg")
    ds = load_image_dataset(root, cache_dir=str(tmp_path / "hf"))
    assert rel_paths(ds, root) == ["a.jpg"]
    assert [b["batch_size"] for b in all_batches(ds)] == [1]


def test_file_removed_between_listing_and_loading_is_reported_not_fatal(tmp_path, monkeypatch, caplog):
    import training.data.sources as sources

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(jpeg(20 + i))
    real = sources.walk

    def walk_then_remove(*args, **kwargs):
        listing = real(*args, **kwargs)
        (root / "1.jpg").unlink()  # gone before `datasets` resolves the file list
        return listing

    monkeypatch.setattr(sources, "walk", walk_then_remove)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        ds = load_image_dataset(root, cache_dir=str(tmp_path / "hf"))
    assert rel_paths(ds, root) == ["0.jpg", "2.jpg"] and "1 files vanished" in caplog.text


def _shifted_crop(image, seed):
    x0 = int(np.random.default_rng(seed).integers(0, 8))  # the sample's own draw: epochs differ
    return {"crop": torch.from_numpy(np.asarray(image.crop((x0, 0, x0 + 8, 8))).copy())}


def test_decoded_cache_changes_no_sample_and_still_counts_every_broken_image():
    """`data.decoded_cache_mb`: the same samples with and without it, a broken image met and counted every epoch
    (never cached), and the budget bounds what is kept."""
    values = [{"bytes": jpeg(i), "path": None} for i in range(6)] + [{"bytes": b"\xff\xd8\xff broken", "path": None}]
    ds = datasets.Dataset.from_dict({"image": values}, features=datasets.Features({"image": datasets.Image()}))

    def three_epochs(cache_mb: float) -> tuple[list[dict], ImageDataset]:
        collate = SampleCollator(lambda kept: {"crops": torch.stack([k["crop"] for k in kept])})
        loader = build_loader(ds, _shifted_crop, collate, 7, seed=1, decoded_cache_mb=cache_mb)
        batches = []
        for epoch in range(3):
            set_loader_epoch(loader, epoch)
            batches += list(loader)
        return batches, loader.dataset

    ref, uncached = three_epochs(0)
    got, cached = three_epochs(1)
    assert len(ref) == len(got) == 3 and not torch.equal(ref[0]["crops"], ref[1]["crops"])
    for a, b in zip(ref, got):
        assert torch.equal(a["crops"], b["crops"]) and a["skipped"] == b["skipped"] and b["num_skipped"] == 1
    assert len(cached._decoded) == 6 and cached.num_skipped == uncached.num_skipped == 3
    assert len(uncached._decoded) == 0
    _, small = three_epochs(1000 / 2**20)  # 16x16 RGB = 768 bytes: room for one
    assert len(small._decoded) == 1
    with pytest.raises(ValueError, match="data.decoded_cache_mb=0 or data.streaming=false"):
        build_loader(ds.to_iterable_dataset(), _shifted_crop, SampleCollator(list), 2, decoded_cache_mb=1)
