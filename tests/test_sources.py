"""The one source resolver (training.data.sources): a folder of images is one dataset whatever its file names,
splits only from real split folders (or Hub shard names), labels as imagefolder infers them, raw listings for
curation, the same errors everywhere."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from training.data import load_image_dataset, open_source, resolve_source


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_cache"))


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (12, 10)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def paths_of(ds: datasets.Dataset) -> list[str]:
    return [v["path"] for v in ds.cast_column("image", datasets.Image(decode=False))["image"]]


# Split words in file names (what made `datasets`' imagefolder pick splits from names), odd names and every
# image suffix, upper case included. Each is a distinct image, so nothing may go missing.
ODD_NAMES = {
    "reference_valid.png": "PNG", "scan_test_01.jpg": "JPEG", "train-shot.JPG": "JPEG", "dev.jpeg": "JPEG",
    "eval 3.webp": "WEBP", "with space.bmp": "BMP", "naïve-ünïcode.gif": "GIF", "img[1].tif": "TIFF",
    "validation.TIFF": "TIFF", "sub/deeper/testing_2.png": "PNG", "sub/val_x.png": "PNG",
}


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plain")
    for i, (name, fmt) in enumerate(ODD_NAMES.items()):
        write(root / name, image_bytes(i, fmt))
    write(root / ".hidden.png", image_bytes(99))  # hidden file and hidden folder: skipped
    write(root / ".cache" / "x.png", image_bytes(98))
    (root / "notes.txt").write_text("not an image")  # listed for curation, not loaded as an image
    return root


def test_a_plain_folder_is_one_dataset_whatever_its_file_names(odd_folder, hf_cache, caplog):
    with caplog.at_level(logging.INFO, logger="training.data"):
        ds = load_image_dataset(odd_folder, cache_dir=hf_cache)
    expected = sorted(str(odd_folder / name) for name in ODD_NAMES)
    assert sorted(paths_of(ds)) == expected
    assert "label" not in ds.column_names  # files at different depths: no class labels, as imagefolder decides
    assert f"{len(ODD_NAMES)} image files in 'train'" in caplog.text and "notes.txt" in caplog.text
    # No split folders: whatever split is asked for is the whole folder.
    assert sorted(paths_of(load_image_dataset(odd_folder, split="test", cache_dir=hf_cache))) == expected
    stream = load_image_dataset(odd_folder, streaming=True, cache_dir=hf_cache)
    assert sorted(row["image"].filename for row in stream) == expected


def test_resolver_lists_every_file_for_curation(odd_folder):
    source = resolve_source(odd_folder)
    assert source.kind == "images" and source.builder == "imagefolder" and source.path == odd_folder
    listed = [f.relative_to(odd_folder).as_posix() for f in source.local.files]
    assert sorted(listed) == sorted([*ODD_NAMES, "notes.txt"])  # hidden ones skipped, non-images kept
    assert len(source.local.image_files) == len(ODD_NAMES)


@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> Path:
    """train/{cat,dog}, val/{cat,dog,fox} (fox only there), test/{cat}; file names with split words; a stray file."""
    root = tmp_path_factory.mktemp("splits")
    seed = 0
    for split, classes in {"train": ["cat", "dog"], "val": ["cat", "dog", "fox"], "test": ["cat"]}.items():
        for name in classes:
            for i in range(2):
                write(root / split / name / f"{name}_test_{i}.jpg", image_bytes(seed, "JPEG"))
                seed += 1
    write(root / "stray_train.png", image_bytes(500))
    return root


def test_split_folders_give_splits_and_shared_labels(split_folder, hf_cache, caplog):
    with caplog.at_level(logging.WARNING, logger="training.data"):
        train = load_image_dataset(split_folder, split="train", cache_dir=hf_cache)
    assert "1 image files outside the split folders" in caplog.text and "stray_train.png" in caplog.text
    validation = load_image_dataset(split_folder, split="validation", cache_dir=hf_cache)
    test = load_image_dataset(split_folder, split="test", cache_dir=hf_cache)
    assert (train.num_rows, validation.num_rows, test.num_rows) == (4, 6, 2)
    # One ClassLabel over all splits, as imagefolder infers it (fox exists only in val/, cat alone in test/).
    names = ["cat", "dog", "fox"]
    for ds in (train, validation, test):
        assert ds.features["label"] == datasets.ClassLabel(names=names)
    assert [names[i] for i in validation["label"]] == ["cat", "cat", "dog", "dog", "fox", "fox"]
    assert all("/val/" in p for p in paths_of(validation))
    assert load_image_dataset(split_folder, split="val", cache_dir=hf_cache).num_rows == 6  # the folder's name
    with pytest.raises(ValueError, match=r"Unknown split 'holdout'.*\['test', 'train', 'validation'\].*data.split"):
        load_image_dataset(split_folder, split="holdout", cache_dir=hf_cache)


def test_two_folders_for_one_split_are_an_error(tmp_path):
    write(tmp_path / "val" / "a.png", image_bytes(0))
    write(tmp_path / "validation" / "b.png", image_bytes(1))
    with pytest.raises(ValueError, match=r"folders \['val', 'validation'\] all mean the split 'validation'"):
        load_image_dataset(tmp_path, split="validation")


def test_metadata_file_adds_columns_such_as_captions(tmp_path, hf_cache):
    for i in range(3):
        write(tmp_path / "imgs" / f"test_{i}.png", image_bytes(i))
    lines = [json.dumps({"file_name": f"test_{i}.png", "caption": f"picture {i}"}) for i in range(3)]
    (tmp_path / "imgs" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_image_dataset(tmp_path / "imgs", cache_dir=hf_cache)
    assert ds.num_rows == 3 and ds["caption"] == ["picture 0", "picture 1", "picture 2"]


def parquet_shard(path: Path, ids: list[int]) -> Path:
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("int64")})
    rows = {"image": [{"bytes": image_bytes(i), "path": None} for i in ids], "id": ids}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def test_shard_folders_split_by_folder_or_hub_shard_names(tmp_path, hf_cache, caplog):
    hub = tmp_path / "hub_snapshot"  # the layout push_to_hub writes, plus a README and an extra table
    parquet_shard(hub / "data" / "train-00000-of-00002.parquet", [0, 1])
    parquet_shard(hub / "data" / "train-00001-of-00002.parquet", [2])
    parquet_shard(hub / "data" / "test-00000-of-00001.parquet", [10, 11])
    parquet_shard(hub / "removed.parquet", [99])
    (hub / "README.md").write_text("---\n---\n")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        assert sorted(load_image_dataset(hub, cache_dir=hf_cache)["id"]) == [0, 1, 2]
    assert "removed.parquet" in caplog.text
    assert sorted(load_image_dataset(hub, split="test", cache_dir=hf_cache)["id"]) == [10, 11]

    plain = tmp_path / "plain"  # names with split words but no Hub shard pattern: one split
    parquet_shard(plain / "scan_test.parquet", [0])
    parquet_shard(plain / "valid_rows.parquet", [1])
    assert sorted(load_image_dataset(plain, split="train", cache_dir=hf_cache)["id"]) == [0, 1]

    (tmp_path / "mixed").mkdir()
    parquet_shard(tmp_path / "mixed" / "a.parquet", [0])
    (tmp_path / "mixed" / "b.arrow").write_bytes(b"")
    with pytest.raises(ValueError, match=r"mixes data shard kinds \['arrow', 'parquet'\]"):
        resolve_source(tmp_path / "mixed")


def test_globs_single_files_and_kinds(tmp_path, hf_cache):
    for i in range(3):
        write(tmp_path / "a" / f"x{i}.png", image_bytes(i))
    write(tmp_path / "a" / "skip.txt", b"x")
    pattern = f"{tmp_path}/a/*.png"
    source = resolve_source(pattern)
    assert source.kind == "images" and source.local.root == tmp_path / "a" and len(source.local.files) == 3
    assert load_image_dataset(pattern, cache_dir=hf_cache).num_rows == 3
    single = resolve_source(tmp_path / "a" / "x0.png")
    assert single.kind == "images" and single.local.files == (tmp_path / "a" / "x0.png",)
    assert open_source(single, "train", cache_dir=hf_cache).num_rows == 1
    assert resolve_source("some-org/some-dataset").kind == "hub"
    load_image_dataset(tmp_path / "a", cache_dir=hf_cache).save_to_disk(str(tmp_path / "saved"))
    assert resolve_source(tmp_path / "saved").kind == "saved"


def test_errors_name_the_problem_and_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no image files \(.*\.jpg.*\) and no data shards"):
        load_image_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"no such file or directory.*imagefolder"):
        resolve_source(tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match=r"cannot read files with suffixes \['.png', '.txt'\] together"):
        write(tmp_path / "m" / "a.png", image_bytes(0))
        (tmp_path / "m" / "b.txt").write_text("x")
        resolve_source(f"{tmp_path}/m/*")
