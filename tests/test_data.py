"""Training data (training.data, training.sample_data): sources, errors, reproducibility, collate, corrupt images,
resumable sampling. Tiny crops (56/28 px, patch 14) keep it fast."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from training.augment import MultiCropAugmentation, derive_seed
from training.data import (
    ImageDataset,
    ImageDecodeError,
    MultiCropCollator,
    MultiCropDataset,
    MultiCropStream,
    ResumableSampler,
    SampleCollator,
    SkippedSample,
    build_dataloader,
    build_loader,
    choose_resolution,
    collate_multicrop,
    decode_image,
    load_image_dataset,
    set_loader_epoch,
)
from training.masking import BlockMaskGenerator
from training.sample_data import SAMPLE_CLASSES, SAMPLE_SPLITS, build_sample_dataset

GLOBAL, LOCAL, PATCH = 56, 28, 14


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> str:
    """Keep `datasets`' prepared-arrow cache inside the test's temporary directory."""
    return str(tmp_path_factory.mktemp("hf_cache"))


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_imagefolder(root: Path, counts: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/<i>.jpg with distinct random images."""
    seed = 0
    for split, classes in counts.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{i}.jpg").write_bytes(jpeg_bytes(seed))
                seed += 1
    return root


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return write_imagefolder(
        tmp_path_factory.mktemp("imagefolder"), {"train": {"a": 6, "b": 6}, "test": {"a": 2, "b": 2}}
    )


@pytest.fixture(scope="module")
def train_ds(image_dir, hf_cache) -> datasets.Dataset:
    return load_image_dataset(image_dir, split="train", cache_dir=hf_cache)


def augmentation(local_number: int = 2) -> MultiCropAugmentation:
    return MultiCropAugmentation(global_size=GLOBAL, local_size=LOCAL, local_number=local_number)


def first_sample(ds, image_column: str = "image") -> dict:
    """Run the multi-crop pipeline on the first example of a dataset or stream."""
    if isinstance(ds, datasets.IterableDataset):
        sample = next(iter(MultiCropStream(ds, augmentation(), image_column)))
    else:
        sample = MultiCropDataset(ds, augmentation(), image_column)[0]
    assert sample is not None
    assert sample["global_crops"][0].shape == (3, GLOBAL, GLOBAL)
    return sample


def flat(batch: dict) -> list[torch.Tensor]:
    return [batch["global_crops"], batch["local_crops"], batch["masks"]]


# --------------------------------------------------------------------------------------------------------------
# Sample data


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("dinoforge_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DINOFORGE_CACHE", str(cache))
        path = build_sample_dataset()
    assert path == cache / "sample"
    return cache


def test_sample_dataset_builds_offline_with_labelled_splits(sample_cache, hf_cache, monkeypatch):
    root = sample_cache / "sample"
    marker = root / "dinoforge_sample.json"
    stamp = marker.stat().st_mtime_ns
    monkeypatch.setenv("DINOFORGE_CACHE", str(sample_cache))
    assert build_sample_dataset() == root and marker.stat().st_mtime_ns == stamp  # idempotent: not rewritten
    assert [p.name for p in sample_cache.iterdir()] == ["sample"]  # no temporary directories left behind
    assert json.loads(marker.read_text())["classes"] == sorted(SAMPLE_CLASSES)

    names = sorted(SAMPLE_CLASSES)
    assert 10 <= len(names) <= 15
    for split, per_class in SAMPLE_SPLITS.items():
        ds = load_image_dataset("sample", split=split, cache_dir=hf_cache)  # the name resolves via DINOFORGE_CACHE
        assert ds.num_rows == per_class * len(names)
        assert ds.features["label"] == datasets.ClassLabel(names=names)
        assert np.bincount(ds["label"]).tolist() == [per_class] * len(names)
    image = ds[0]["image"]
    assert 128 <= min(image.size) <= 160
    first_sample(ds)


def test_sample_dataset_rebuilds_an_outdated_copy(tmp_path):
    root = tmp_path / "sample"
    (root / "train").mkdir(parents=True)
    (root / "dinoforge_sample.json").write_text('{"version": 0}')
    assert build_sample_dataset(root) == root
    assert json.loads((root / "dinoforge_sample.json").read_text())["version"] >= 1
    assert len(list((root / "test").glob("*/*.jpg"))) == SAMPLE_SPLITS["test"] * len(SAMPLE_CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample"]


# --------------------------------------------------------------------------------------------------------------
# Sources


def test_imagefolder_source(image_dir, hf_cache, train_ds):
    assert train_ds.num_rows == 12 and train_ds.features["label"].names == ["a", "b"]
    assert load_image_dataset(image_dir, split="test", cache_dir=hf_cache).num_rows == 4
    first_sample(train_ds)


def test_save_to_disk_sources(tmp_path, train_ds):
    train_ds.save_to_disk(str(tmp_path / "single"))
    assert load_image_dataset(tmp_path / "single").num_rows == 12
    datasets.DatasetDict({"train": train_ds, "holdout": train_ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    holdout = load_image_dataset(tmp_path / "dict", split="holdout")
    assert holdout.num_rows == 3
    first_sample(holdout)
    with pytest.raises(ValueError, match=r"no split 'test'.*\['holdout', 'train'\].*data.split"):
        load_image_dataset(tmp_path / "dict", split="test")


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parquet")
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("int64")})
    for shard in range(2):
        ids = list(range(shard * 5, shard * 5 + 5))
        rows = {"image": [{"bytes": jpeg_bytes(100 + i), "path": None} for i in ids], "id": ids}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"part-{shard}.parquet"))
    return folder


def test_parquet_sources(parquet_dir, hf_cache):
    single = load_image_dataset(parquet_dir / "part-0.parquet", cache_dir=hf_cache)
    assert single.num_rows == 5
    assert load_image_dataset(parquet_dir, cache_dir=hf_cache).num_rows == 10
    assert load_image_dataset(f"{parquet_dir}/part-*.parquet", cache_dir=hf_cache).num_rows == 10
    first_sample(single)


def test_webdataset_tar_source(tmp_path, hf_cache):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(4):
            for suffix, payload in ((".jpg", jpeg_bytes(200 + i)), (".cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"{i:06d}{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    ds = load_image_dataset(shard, image_column="jpg", cache_dir=hf_cache)
    assert ds.num_rows == 4
    first_sample(ds, "jpg")
    stream = load_image_dataset(tmp_path / "*.tar", image_column="jpg", streaming=True)
    first_sample(stream, "jpg")
    # The default column name does not exist in webdataset shards: the error says which one to use.
    with pytest.raises(ValueError, match=r"no column 'image'.*'jpg'.*data.image_column=jpg"):
        load_image_dataset(shard, cache_dir=hf_cache)


def test_streaming_sources_are_sharded_per_process(image_dir, parquet_dir, tmp_path, hf_cache):
    stream = load_image_dataset(image_dir, streaming=True, cache_dir=hf_cache)
    assert isinstance(stream, datasets.IterableDataset)
    first_sample(stream)
    parquet_stream = load_image_dataset(parquet_dir, streaming=True, cache_dir=hf_cache)
    assert sorted(row["id"] for row in parquet_stream) == list(range(10))

    load_image_dataset(parquet_dir, cache_dir=hf_cache).save_to_disk(str(tmp_path / "saved"))
    parts = [
        [row["id"] for row in load_image_dataset(tmp_path / "saved", streaming=True, rank=rank, world_size=2)]
        for rank in range(2)
    ]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(10))


def test_errors_name_the_problem_and_the_fix(image_dir, hf_cache, tmp_path):
    with pytest.raises(ValueError, match=r"no such file or directory.*imagefolder"):
        load_image_dataset(tmp_path / "missing_dir")
    with pytest.raises(ValueError, match=r"matches no files"):
        load_image_dataset(tmp_path / "*.parquet")
    with pytest.raises(ValueError, match=r"no column 'img'.*\['image', 'label'\].*data.image_column=image"):
        load_image_dataset(image_dir, image_column="img", cache_dir=hf_cache)
    with pytest.raises(ValueError, match=r"Unknown split.*data.split"):
        load_image_dataset(image_dir, split="validation", cache_dir=hf_cache)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"cannot read files with suffixes \['.txt'\]"):
        load_image_dataset(tmp_path / "notes.txt")
    # Offline (tests set HF_HUB_OFFLINE=1), an uncached Hub id fails at once with a way out.
    with pytest.raises(ValueError, match=r"not a local path.*Hub.*'sample'"):
        load_image_dataset("nobody-here/no-such-dataset", cache_dir=hf_cache)


def test_decode_image_accepts_every_column_form(tmp_path):
    data = jpeg_bytes(7)
    (tmp_path / "x.jpg").write_bytes(data)
    gray = Image.new("L", (5, 4), 100)
    forms = [
        data,
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(tmp_path / "x.jpg")},
        str(tmp_path / "x.jpg"),
        Image.open(io.BytesIO(data)),
        np.asarray(Image.open(io.BytesIO(data))),
        gray,
    ]
    for value in forms:
        image = decode_image(value, allow_paths=True)  # a path named here, by the caller
        assert image.mode == "RGB" and image.size in {(40, 32), (5, 4)}
    # A path nobody pointed at as a data source is not opened by default (a dataset row could name any file).
    for value in forms[2:4]:
        with pytest.raises(ImageDecodeError, match="path_only.*data.allow_local_paths=true"):
            decode_image(value)


# --------------------------------------------------------------------------------------------------------------
# Per-sample reproducibility and collate


def test_crops_depend_only_on_seed_epoch_and_index(train_ds):
    ds = MultiCropDataset(train_ds, augmentation(), seed=3)
    a, b, other_epoch = ds[(0, 5)], ds[(0, 5)], ds[(1, 5)]
    assert torch.equal(a["global_crops"][0], b["global_crops"][0])
    assert torch.equal(a["local_crops"][1], b["local_crops"][1])
    assert not torch.equal(a["global_crops"][0], other_epoch["global_crops"][0])
    ds.set_epoch(1)
    assert torch.equal(ds[5]["global_crops"][0], other_epoch["global_crops"][0])  # int keys use set_epoch
    other_seed = MultiCropDataset(train_ds, augmentation(), seed=4)[(0, 5)]
    assert not torch.equal(a["global_crops"][0], other_seed["global_crops"][0])


def loader(train_ds, **kwargs):
    options = {"mask_generator": BlockMaskGenerator.for_crop(GLOBAL, PATCH), "seed": 1}
    return build_dataloader(train_ds, augmentation(), 4, **{**options, **kwargs})


def test_batches_identical_with_0_or_2_workers(train_ds):
    serial = loader(train_ds)
    parallel = loader(train_ds, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):  # the second epoch checks that persistent workers follow the epoch
        set_loader_epoch(serial, epoch)
        set_loader_epoch(parallel, epoch)
        batches = list(zip(serial, parallel, strict=True))
        assert len(batches) == 3
        for a, b in batches:
            assert a["global_crops"].shape == (8, 3, GLOBAL, GLOBAL)
            assert a["local_crops"].shape == (8, 3, LOCAL, LOCAL)
            assert a["masks"].shape == (8, (GLOBAL // PATCH) ** 2) and a["masks"].dtype == torch.bool
            assert a["batch_size"] == 4 and a["num_skipped"] == 0
            for x, y in zip(flat(a), flat(b)):
                assert torch.equal(x, y)
        if epoch == 0:
            first_epoch = batches[0][0]["global_crops"]
    assert not torch.equal(first_epoch, batches[0][0]["global_crops"])


def fake_sample(image: int, n_local: int = 3) -> dict:
    """Crops filled with 10 * image + crop, so their place in the batch can be read back."""
    return {
        "global_crops": [torch.full((3, 28, 28), 10.0 * image + c) for c in range(2)],
        "local_crops": [torch.full((3, 14, 14), 10.0 * image + c) for c in range(n_local)],
        "sample_seed": 1000 + image,
    }


def test_collate_is_crop_major_and_masks_the_global_crops():
    batch_size = 4
    samples = [fake_sample(i) for i in range(batch_size)]
    batch = collate_multicrop(samples, BlockMaskGenerator(4), mask_sample_probability=0.5)
    assert batch["global_crops"].shape == (2 * batch_size, 3, 28, 28)
    assert batch["local_crops"].shape == (3 * batch_size, 3, 14, 14)
    for crop in range(2):
        for image in range(batch_size):
            assert batch["global_crops"][crop * batch_size + image].unique().item() == 10 * image + crop
    for crop in range(3):
        for image in range(batch_size):
            assert batch["local_crops"][crop * batch_size + image].unique().item() == 10 * image + crop
    assert batch["masks"].shape == (2 * batch_size, 16)
    assert int((batch["masks"].sum(1) > 0).sum()) == batch_size  # half of the 2·B global crops
    # The mask RNG comes from the samples: same samples, same masks.
    assert torch.equal(batch["masks"], collate_multicrop(samples, BlockMaskGenerator(4))["masks"])
    assert collate_multicrop([fake_sample(0, n_local=0)])["local_crops"] is None


def test_collate_drops_and_counts_missing_samples():
    collator = MultiCropCollator(BlockMaskGenerator(4))
    batch = collator([fake_sample(0), SkippedSample("/d/x.jpg", "truncated"), fake_sample(2), None])
    assert batch["batch_size"] == 2 and batch["num_skipped"] == 2
    assert batch["skipped"] == [("/d/x.jpg", "truncated"), ("?", "unknown")]  # for the loop's skip accounting
    assert batch["global_crops"][:, 0, 0, 0].tolist() == [0.0, 20.0, 1.0, 21.0]
    empty = collator([None, SkippedSample("row 7", "path_only")])
    assert empty["batch_size"] == 0 and empty["num_skipped"] == 2 and empty["global_crops"] is None
    assert empty["skipped"] == [("?", "unknown"), ("row 7", "path_only")]
    assert collator([fake_sample(0)])["skipped"] == []


# --------------------------------------------------------------------------------------------------------------
# Corrupt images


@pytest.fixture
def corrupt_dir(tmp_path) -> Path:
    root = write_imagefolder(tmp_path / "imgs", {"train": {"a": 3, "b": 3}})
    (root / "train" / "a" / "truncated.jpg").write_bytes(jpeg_bytes(99, size=(64, 64))[:300])
    (root / "train" / "b" / "empty.jpg").write_bytes(b"")
    return root


def test_corrupt_images_are_skipped_and_counted(corrupt_dir, hf_cache, caplog):
    ds = load_image_dataset(corrupt_dir, cache_dir=hf_cache)
    assert ds.num_rows == 8
    dl = build_dataloader(ds, augmentation(), 4, mask_generator=BlockMaskGenerator.for_crop(GLOBAL, PATCH))
    with caplog.at_level("WARNING", logger="training.data"):
        batches = list(dl)
    assert sum(b["num_skipped"] for b in batches) == 2
    assert sum(b["batch_size"] for b in batches) == 6
    assert all(b["global_crops"].shape[0] == 2 * b["batch_size"] for b in batches)
    assert dl.dataset.num_skipped == 2  # num_workers=0: the main process met them itself
    logged = caplog.text
    assert "truncated.jpg" in logged and "empty.jpg" in logged

    stream_loader = build_dataloader(load_image_dataset(corrupt_dir, streaming=True), augmentation(), 2)
    batches = list(stream_loader)
    assert sum(b["num_skipped"] for b in batches) == 2 and sum(b["batch_size"] for b in batches) == 6


def test_corrupt_counts_reach_the_main_process_from_workers(corrupt_dir, hf_cache):
    ds = load_image_dataset(corrupt_dir, cache_dir=hf_cache)
    dl = build_dataloader(ds, augmentation(1), 2, num_workers=2, persistent_workers=False)
    batches = list(dl)
    assert sum(b["num_skipped"] for b in batches) == 2
    skipped = sorted((Path(name).name, reason) for b in batches for name, reason in b["skipped"])
    assert skipped == [("empty.jpg", "zero_byte"), ("truncated.jpg", "truncated")]


# --------------------------------------------------------------------------------------------------------------
# Resumable sampling


def test_sampler_matches_distributed_sampler_order():
    for rank in range(3):
        ours = ResumableSampler(50, batch_size=4, num_replicas=3, rank=rank, seed=7)
        reference = DistributedSampler(range(50), num_replicas=3, rank=rank, shuffle=True, seed=7, drop_last=True)
        for epoch in (0, 4):
            ours.set_epoch(epoch)
            reference.set_epoch(epoch)
            assert [index for _, index in ours] == list(reference)
            assert {e for e, _ in ours} == {epoch}


def test_sampler_skip_equals_continuing_the_original_iteration():
    sampler = ResumableSampler(37, batch_size=4, num_replicas=2, rank=1, seed=0)
    sampler.set_epoch(2)
    full = list(sampler)
    assert len(full) == 18 and sampler.batches_per_epoch == 4
    state = sampler.state_dict(batches_consumed=3)

    resumed = ResumableSampler(37, batch_size=4, num_replicas=2, rank=1, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a loop calling set_epoch for the same epoch after loading keeps the skip
    assert len(resumed) == 18 - 12
    assert list(resumed) == full[12:]
    assert list(resumed) == full  # the skip is for one pass only
    resumed.skip(1)
    resumed.set_epoch(3)  # a new epoch starts from its beginning
    assert len(list(resumed)) == 18

    with pytest.raises(ValueError, match="num_replicas=2.*not loading the sampler state"):
        ResumableSampler(37, batch_size=4, num_replicas=4, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ResumableSampler(3, batch_size=4)


def test_resumed_loader_continues_with_the_exact_next_batch(train_ds):
    original = loader(train_ds)
    set_loader_epoch(original, 1)
    expected = list(original)

    resumed = loader(train_ds)
    resumed.sampler.load_state_dict(original.sampler.state_dict(batches_consumed=2))
    set_loader_epoch(resumed, 1)
    batches = list(resumed)
    assert len(batches) == 1
    for x, y in zip(flat(batches[0]), flat(expected[2])):
        assert torch.equal(x, y)


def test_stream_resume_from_state_dict(parquet_dir, hf_cache):
    def stream_loader():
        stream = load_image_dataset(parquet_dir, streaming=True, cache_dir=hf_cache)
        return build_dataloader(stream, augmentation(1), 2, mask_generator=BlockMaskGenerator.for_crop(GLOBAL, PATCH))

    original = stream_loader()
    expected, state = [], None
    for step, batch in enumerate(original):
        expected.append(batch)
        if step == 1:
            state = original.dataset.state_dict()  # num_workers=0: the stream's state is exact
    assert len(expected) == 5  # 10 rows in batches of 2, read in one process
    resumed = stream_loader()
    resumed.dataset.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(expected) - 2
    for a, b in zip(rest, expected[2:]):
        for x, y in zip(flat(a), flat(b)):
            assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------------------------
# Multi-resolution batches (DINOv3 high-res adaptation)

RESOLUTIONS = [(GLOBAL, LOCAL, 0.5), (2 * GLOBAL, LOCAL + PATCH, 0.5)]


def multires_loader(ds, **kwargs):
    return build_dataloader(
        ds,
        [MultiCropAugmentation(global_size=g, local_size=lo, local_number=1) for g, lo, _ in RESOLUTIONS],
        2,
        mask_generator=[BlockMaskGenerator.for_crop(g, PATCH) for g, _, _ in RESOLUTIONS],
        resolution_probabilities=[p for _, _, p in RESOLUTIONS],
        seed=1,
        **kwargs,
    )


def test_choose_resolution_follows_the_probabilities_and_is_deterministic():
    probabilities = (0.3, 0.3, 0.3, 0.05, 0.05)
    draws = [choose_resolution(probabilities, 0, 0, b) for b in range(20000)]
    assert draws == [choose_resolution(probabilities, 0, 0, b) for b in range(20000)]
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, probabilities, atol=0.015)
    assert [choose_resolution(probabilities, 1, 0, b) for b in range(50)] != draws[:50]  # the seed matters
    assert {choose_resolution((0.0, 1.0), 0, 0, b) for b in range(100)} == {1}


def test_multires_batches_have_one_resolution_each_with_matching_masks(train_ds):
    serial = multires_loader(train_ds)
    parallel = multires_loader(train_ds, num_workers=2, persistent_workers=False)
    sizes = []
    for a, b in zip(serial, parallel, strict=True):
        g = a["global_crops"].shape[-1]
        local = {lo for gs, lo, _ in RESOLUTIONS if gs == g}
        assert a["local_crops"].shape[-1] in local
        assert a["masks"].shape == (4, (g // PATCH) ** 2)
        sizes.append(g)
        for x, y in zip(flat(a), flat(b)):
            assert torch.equal(x, y)
    assert set(sizes) == {GLOBAL, 2 * GLOBAL}  # 6 batches, both sizes drawn with this seed


def test_multires_sampler_same_resolutions_on_every_rank_and_on_resume():
    def resolutions(sampler):
        return [key[2] for key in sampler][:: sampler.batch_size]

    probabilities = (0.25, 0.25, 0.5)
    ranks = [ResumableSampler(64, batch_size=4, num_replicas=2, rank=r, resolution_probabilities=probabilities)
             for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    assert resolutions(ranks[0]) == resolutions(ranks[1])
    full = list(ranks[0])
    assert all(len({k[2] for k in full[i : i + 4]}) == 1 for i in range(0, len(full), 4))
    resumed = ResumableSampler(64, batch_size=4, num_replicas=2, rank=0, resolution_probabilities=probabilities)
    resumed.load_state_dict(ranks[0].state_dict(batches_consumed=5))
    assert list(resumed) == full[20:]


def test_multires_stream_workers_draw_per_loader_batch(parquet_dir, hf_cache):
    def sizes(num_workers):
        stream = load_image_dataset(parquet_dir, streaming=True, cache_dir=hf_cache)
        dl = multires_loader(stream, num_workers=num_workers)
        return [batch["global_crops"].shape[-1] for batch in dl]

    expected = [RESOLUTIONS[choose_resolution([0.5, 0.5], 1, 0, b)][0] for b in range(5)]
    assert sizes(0) == expected
    assert sizes(2)[:4] == expected[:4]  # 5 shards-worth of rows over 2 workers: the tail may reorder


def test_multires_errors_name_the_fix(train_ds):
    augs = [augmentation(), augmentation()]
    with pytest.raises(ValueError, match="need resolution_probabilities"):
        build_dataloader(train_ds, augs, 2)
    with pytest.raises(ValueError, match="sum to 1.*crops.resolutions"):
        build_dataloader(train_ds, augs, 2, resolution_probabilities=[0.5, 0.6])
    with pytest.raises(ValueError, match="one per resolution"):
        build_dataloader(train_ds, augs, 2, resolution_probabilities=[1.0])


def test_horizontal_flip_can_be_turned_off():
    # Dark left half, bright right half, square: at scale (1, 1) RandomResizedCrop keeps the whole image, so only
    # a flip can put the bright half on the left (colour jitter and blur keep which half is brighter).
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = 255
    image = Image.fromarray(pixels)

    def bright_left(horizontal_flip: bool) -> list[bool]:
        aug = MultiCropAugmentation(
            global_size=GLOBAL, local_size=LOCAL, local_number=0, global_scale=(1.0, 1.0),
            horizontal_flip=horizontal_flip,
        )
        crops = [aug(image, seed=s)["global_crops"][0].mean(0) for s in range(16)]
        return [bool(c[:, : GLOBAL // 2].mean() > c[:, GLOBAL // 2 :].mean()) for c in crops]

    assert not any(bright_left(False))
    assert 2 <= sum(bright_left(True)) <= 14


# --------------------------------------------------------------------------------------------------------------
# The generic loader: any per-sample transform + collate (multi-crop is one pipeline on it)


class TwoViews:
    """A MoCo/BYOL-style transform: two random 28 px crops of the image (picklable, for worker processes)."""

    def __call__(self, image: Image.Image, *, seed: int) -> dict:
        from torchvision.transforms import v2

        crop = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(28, antialias=True)])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return {"views": [crop(image), crop(image)]}


def stack_views_and_captions(kept: list[dict]) -> dict:
    return {"views": torch.stack([s["views"][v] for v in range(2) for s in kept]),
            "caption": [s["caption"] for s in kept], "seeds": [s["sample_seed"] for s in kept]}


@pytest.fixture
def captioned(tmp_path) -> datasets.Dataset:
    images = [{"bytes": jpeg_bytes(300 + i), "path": None} for i in range(6)]
    images[3] = {"bytes": b"broken", "path": "broken.jpg"}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "caption": [f"photo {i}" for i in range(6)]}, features)


def test_generic_loader_runs_a_two_view_image_text_pipeline(captioned):
    def loader_for(ds, **kwargs):
        return build_loader(ds, TwoViews(), SampleCollator(stack_views_and_captions), 3, columns=["caption"],
                            seed=5, **kwargs)

    serial, parallel = loader_for(captioned), loader_for(captioned, num_workers=2, persistent_workers=False)
    batches = list(serial)
    assert [b["batch_size"] for b in batches] == [3, 2] and [b["num_skipped"] for b in batches] == [0, 1]
    assert [b["skipped"] for b in batches] == [[], [("broken.jpg", "undecodable")]]
    order = list(serial.sampler)  # (epoch, index) keys: this run's permutation
    kept = [i for _, i in order if i != 3]
    assert [c for b in batches for c in b["caption"]] == [f"photo {i}" for i in kept]
    assert [s for b in batches for s in b["seeds"]] == [derive_seed(5, 0, i) for i in kept]
    assert batches[0]["views"].shape == (6, 3, 28, 28)
    for a, b in zip(batches, parallel, strict=True):  # same samples in worker processes
        assert torch.equal(a["views"], b["views"]) and a["caption"] == b["caption"]
    stream = loader_for(captioned.to_iterable_dataset())
    assert sorted(c for b in stream for c in b["caption"]) == [f"photo {i}" for i in (0, 1, 2, 4, 5)]


def test_generic_loader_column_errors_name_the_fix(captioned):
    with pytest.raises(ValueError, match=r"no column 'text'.*\['image', 'caption'\]"):
        ImageDataset(captioned, TwoViews(), columns=["text"])
    with pytest.raises(ValueError, match="'sample_seed'.*loader's own.*rename it"):
        ImageDataset(captioned, TwoViews(), columns={"caption": "sample_seed"})
    with pytest.raises(ValueError, match="overwrite the transform's field 'views'"):
        ImageDataset(captioned, TwoViews(), columns={"caption": "views"})[0]
    assert ImageDataset(captioned, TwoViews(), columns={"caption": "text"})[0]["text"] == "photo 0"
    with pytest.raises(TypeError, match="must return a dict"):
        ImageDataset(captioned, lambda image, seed: image)[0]
