"""The one image decoder (training.data.decode) on a corpus of odd files generated here, and the same pixels (or
the same refusal) through the training path and the curation path."""

from __future__ import annotations

import io
import pickle
import resource
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from curation.config import ValidateConfig
from curation.validate import check_image
from training.data import (
    ImageDataset,
    ImageDecodeError,
    SkippedSample,
    decode,
    decode_image,
    load_image_dataset,
    trust_local_source,
)

W, H = 40, 30  # stored size of the corpus images (width, height)
WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient16() -> np.ndarray:
    """A horizontal 16-bit ramp over the full range: its true mean is mid-grey (127.5 in 8 bit)."""
    return np.tile(np.linspace(0, 65535, W).round().astype(np.uint16), (H, 1))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png_header(side: int = 30000) -> bytes:
    """A valid PNG whose header claims side x side pixels, with almost no pixel data behind it."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


def half_transparent_rgba() -> Image.Image:
    """Left half fully transparent red, right half opaque blue."""
    pixels = np.zeros((H, W, 4), np.uint8)
    pixels[:, : W // 2] = (255, 0, 0, 0)
    pixels[:, W // 2 :] = (0, 0, 255, 255)
    return Image.fromarray(pixels)


def frames(*colours: tuple[int, int, int]) -> list[Image.Image]:
    return [Image.new("RGB", (W, H), c) for c in colours]


def exif_rotated_jpeg() -> bytes:
    """Stored 40x30 with a bright top-left block; EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    pixels = np.full((H, W, 3), 40, np.uint8)
    pixels[:10, :10] = 250
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)


def check_mid_grey(pixels: np.ndarray) -> None:
    assert abs(pixels.mean() - 127.5) < 1.5, pixels.mean()  # scaled, not clipped to 255
    assert pixels[:, 0].max() == 0 and pixels[:, -1].min() == 255


def check_left_white_right_blue(pixels: np.ndarray) -> None:
    assert (pixels[:, : W // 2] == WHITE).all() and (pixels[:, W // 2 :] == (0, 0, 255)).all()


def check_rotated(pixels: np.ndarray) -> None:
    assert pixels.shape == (W, H, 3)  # width and height swapped
    assert pixels[:8, -8:].mean() > 200 and pixels[-8:, :8].mean() < 80  # top-left block now top-right


def build_corpus(root: Path) -> dict[str, tuple[bytes, Callable[[np.ndarray], None] | set[str]]]:
    """Write the odd files; return {name: (bytes, pixel check for a good file | allowed reason codes)}."""
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)), "JPEG")
    png = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)), "PNG")
    palette = Image.new("P", (W, H), 0)
    palette.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    palette.paste(1, (W // 2, 0, W, H))
    la = Image.fromarray(np.dstack([np.full((H, W), 90, np.uint8), np.tile([0, 255], (H, W // 2)).astype(np.uint8)]))
    checker = Image.fromarray((np.indices((H, W)).sum(0) % 2 * 255).astype(np.uint8)).convert("1")
    cmyk = Image.new("CMYK", (W, H), (0, 255, 255, 0))  # pure red in CMYK
    gif, tiff_pages = io.BytesIO(), io.BytesIO()
    first, *rest = frames((255, 0, 0), (0, 255, 0))
    first.save(gif, format="GIF", save_all=True, append_images=rest)
    first, *rest = frames((0, 0, 200), (250, 250, 250))
    first.save(tiff_pages, format="TIFF", save_all=True, append_images=rest)
    ramp = gradient16()

    def unique_rgb(*colours):
        return lambda p: {tuple(c) for c in p.reshape(-1, 3)} == set(colours)

    corpus = {
        "gray16_gradient.png": (encode(Image.fromarray(ramp), "PNG"), check_mid_grey),
        "gray16_gradient.tif": (encode(Image.fromarray(ramp), "TIFF"), check_mid_grey),
        "float_gradient.tif": (encode(Image.fromarray((ramp / 65535).astype(np.float32)), "TIFF"), check_mid_grey),
        "rgba_half_transparent.png": (encode(half_transparent_rgba(), "PNG"), check_left_white_right_blue),
        "palette_transparent.png": (encode(palette, "PNG", transparency=0), unique_rgb(WHITE, (200, 100, 50))),
        "la_half_transparent.png": (encode(la, "PNG"), unique_rgb(WHITE, (90, 90, 90))),
        "cmyk.jpg": (encode(cmyk, "JPEG", quality=95), lambda p: (np.abs(p.astype(int) - (255, 0, 0)) < 8).all()),
        "exif_rotated.jpg": (exif_rotated_jpeg(), check_rotated),
        "animated.gif": (gif.getvalue(), unique_rgb((255, 0, 0))),
        "multipage.tif": (tiff_pages.getvalue(), unique_rgb((0, 0, 200))),
        "bilevel.png": (encode(checker, "PNG"), lambda p: set(np.unique(p)) == {0, 255} and p[0, 0, 0] == 0),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], {"truncated"}),
        "truncated.png": (png[: len(png) // 2], {"truncated", "corrupt"}),
        "zero_byte.jpg": (b"", {"zero_byte"}),
        "text_file.jpg": (b"this is not an image\n" * 10, {"undecodable"}),
        "claims_30000x30000.png": (huge_png_header(), {"too_many_pixels"}),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in corpus.items():
        (root / name).write_bytes(data)
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("odd") / "corpus"
    files = build_corpus(root)
    trust_local_source(folder=root)  # as pointing at it as a data source does: its paths may be opened
    return root, files


def decoder_result(data: bytes) -> np.ndarray | str:
    """The decoder's pixels (HxWx3 uint8) or its reason code."""
    try:
        return np.asarray(decode_image(data))
    except ImageDecodeError as err:
        return err.reason


def test_each_file_decodes_to_the_expected_pixels_or_reason(corpus):
    _, files = corpus
    for name, (data, expected) in files.items():
        result = decoder_result(data)
        if isinstance(expected, set):
            assert result in expected, (name, result)
        else:
            assert isinstance(result, np.ndarray) and result.dtype == np.uint8 and result.shape[2] == 3, name
            assert expected(result) is not False, name


def test_errors_are_typed_name_the_file_and_survive_pickling(corpus, monkeypatch):
    root, _ = corpus
    with pytest.raises(ImageDecodeError) as err:
        decode_image(root / "truncated.jpg")
    assert err.value.reason == "truncated" and str(root / "truncated.jpg") in str(err.value)
    assert "re-download or remove" in str(err.value) and err.value.code.startswith("truncated: ")
    again = pickle.loads(pickle.dumps(err.value))  # crosses DataLoader / datasets.map worker processes
    assert (again.reason, again.detail, again.name) == (err.value.reason, err.value.detail, err.value.name)
    with pytest.raises(ImageDecodeError, match="vanished"):  # a path that is not there (anymore)
        decode_image(root / "no_such_file.png")
    with pytest.raises(TypeError, match="image_column"):
        decode_image(42)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(root / "cmyk.jpg")


def test_decompression_bomb_refused_before_decoding(corpus):
    root, _ = corpus
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError) as err:
        decode_image(root / "claims_30000x30000.png")
    assert err.value.reason == "too_many_pixels" and time.perf_counter() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # 30000² RGB would be 2.7 GB
    # Our own limit is checked before decoding too (below PIL's).
    with pytest.raises(ImageDecodeError, match=r"too_many_pixels: 40x30 > 1000"):
        decode_image(root / "cmyk.jpg", max_pixels=1000)


def test_every_input_form_gives_the_same_pixels(corpus):
    root, _ = corpus
    path = root / "rgba_half_transparent.png"
    data = path.read_bytes()
    reference = np.asarray(decode_image(data))
    forms = [path, str(path), {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}, Image.open(path),
             np.asarray(half_transparent_rgba())]
    for value in forms:
        assert np.array_equal(np.asarray(decode_image(value)), reference), type(value).__name__
    ramp = gradient16()
    check_mid_grey(np.asarray(decode_image(ramp)))  # uint16 arrays scale like 16-bit files
    check_mid_grey(np.asarray(decode_image(ramp / 65535.0)))  # float arrays in [0, 1]
    assert np.asarray(decode_image(np.eye(4, dtype=bool))).max() == 255
    with pytest.raises(ImageDecodeError, match="undecodable"):
        decode_image(np.zeros((2, 3, 5)))
    # Decoding never changes the caller's image in place.
    image = Image.open(io.BytesIO(exif_rotated_jpeg()))
    decode_image(image)
    assert image.size == (W, H)


def test_details_for_curation(corpus):
    root, _ = corpus
    upright = decode(root / "animated.gif")
    assert (upright.format, upright.mode, upright.unchanged) == ("GIF", "P", False)
    rotated = decode(root / "exif_rotated.jpg")
    assert rotated.orientation == 6 and not rotated.unchanged and rotated.image.size == (H, W)
    gray = decode(root / "gray16_gradient.png")
    assert gray.image.mode == "L" and gray.mode.startswith("I;16")  # greyscale stays single-channel here


# --------------------------------------------------------------------------------------------------------------
# The same pixels through each consumer


def _pixels(image: Image.Image, *, seed: int) -> dict:
    return {"pixels": np.asarray(image)}


def training_path(folder: Path, names: list[str], cache_dir: str) -> dict[str, np.ndarray | None]:
    """Through load_image_dataset on the folder and the map-style dataset wrapper (None: skipped)."""
    ds = load_image_dataset(folder, cache_dir=cache_dir)
    wrapped = ImageDataset(ds, _pixels)
    paths = [Path(v["path"]).name for v in wrapped.dataset["image"]]
    assert sorted(paths) == sorted(names)  # every file of the folder, whatever its name
    out = {}
    for index, name in enumerate(paths):
        sample = wrapped[(0, index)]
        out[name] = None if isinstance(sample, SkippedSample) else sample["pixels"]
    assert wrapped.num_skipped == sum(v is None for v in out.values())
    return out


def curation_path(data: bytes) -> np.ndarray | str:
    """Validate (the kept bytes) and decode those bytes again, or the rejection's reason code."""
    reason, info = check_image(data, ValidateConfig(min_size=1, max_aspect=100.0))
    if reason:
        return reason.split(":", 1)[0]
    return np.asarray(decode_image(info["image"]))


def probe_path(files: list[Path]) -> list[np.ndarray]:
    """Through the probe's batch dataset (`training.evaluation.features`), with an image processor that hands back
    the decoded image untouched: one HxWx3 uint8 array per file."""
    import datasets
    import torch

    from training.evaluation.features import _ImageBatches

    def keep(images, return_tensors):
        return {"pixel_values": torch.from_numpy(np.asarray(images[0]).copy())[None]}

    ds = datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": [0] * len(files)})
    batches = _ImageBatches(ds.cast_column("image", datasets.Image()), "image", "label", keep, None)
    return [batches[[i]][0][0].numpy() for i in range(len(files))]


def test_training_and_curation_see_the_same_pixels_and_reasons(corpus, tmp_path):
    root, files = corpus
    training = training_path(root, list(files), str(tmp_path / "hf_cache"))
    for name, (data, expected) in files.items():
        direct = decoder_result(data)
        curated = curation_path(data)
        if isinstance(expected, set):
            assert training[name] is None, name
            assert curated == direct, (name, curated, direct)  # the manifest reason is the decoder's
        else:
            assert np.array_equal(training[name], direct), name
            assert np.array_equal(curated, direct), name


def test_probe_sees_the_same_pixels(corpus):
    root, files = corpus
    good = [root / name for name, (_, expected) in files.items() if not isinstance(expected, set)]
    arrays = probe_path(good)
    for path, array in zip(good, arrays, strict=True):
        assert np.array_equal(array, np.asarray(decode_image(path))), path.name
