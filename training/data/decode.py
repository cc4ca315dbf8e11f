"""The project's one image decoder: whatever an image column holds -> an upright 8-bit RGB PIL image.

Training, the probe and curation all decode through :func:`decode` / :func:`decode_image`, so a file gives the same
pixels (or the same typed refusal) everywhere. The rules:

* input: a PIL image, a ``{"bytes", "path"}`` dict (``datasets.Image(decode=False)``), raw bytes, a local path, or
  a NumPy array;
* a value that is only a path (no bytes) is opened only where ``allow_paths`` allows it (reason ``path_only``
  otherwise): by default under the local image folders / files the user pointed at as a data source in this process
  (see :mod:`training.data.files`), so a crafted dataset row cannot read arbitrary local files; ``allow_paths=True``
  opens any local path (``data.allow_local_paths=true``). URLs (``http://``, ``hf://``, any ``scheme://``) are
  not fetched, except the ``hf://datasets/<repo>`` files of a Hub dataset the user pointed at as the source (a
  streamed Hub image folder holds those);
* local files are read by :func:`training.data.files.read_file`: a broken symlink, a symlink loop, a folder, a
  FIFO or device (never opened for reading, so never blocking), a file that vanished or changed is an error with
  its own reason code;
* decompression bombs are refused *before* decoding (``max_pixels``, default PIL's own error threshold; PIL's
  global limit still applies on top, so ``max_pixels`` can only lower it);
* the file's structure is checked (``verify``: PNG checksums, ...) and then fully decoded; truncated data is an
  error, never grey-filled (``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False);
* animated GIF / WebP, multi-page TIFF: the first frame;
* EXIF orientation applied (a bogus EXIF block is ignored: pixels kept as stored);
* 16-bit, 32-bit int and float images are *scaled* to 8 bit (16-bit: / 257; float in [0, 1]: x 255; other ranges
  outside [0, 255]: min-max stretched), never clipped;
* transparency (RGBA, LA, PA, palette or colour-key transparency) is composited on white (:data:`BACKGROUND`);
* palette, 1-bit, CMYK, YCbCr, ... are converted.

Every failure raises :class:`ImageDecodeError` whose ``reason`` is one of :data:`DECODE_REASONS` (the reason
codes of the curation manifest).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .files import FILE_REASONS, AllowPaths, FileFault, allows_path, is_url, read_file

__all__ = [
    "BACKGROUND",
    "DECODE_REASONS",
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "ImageDecodeError",
    "decode",
    "decode_image",
    "describe_image_value",
    "fix_for",
    "normalize_image",
]

# PIL's DecompressionBombError threshold (2 x Image.MAX_IMAGE_PIXELS at its default).
DEFAULT_MAX_PIXELS = 178_956_970
# Transparent pixels become this colour (curation has always composited on white).
BACKGROUND = (255, 255, 255)
# Reason codes, shared with the curation manifest (`<reason>: <detail>`).
DECODE_REASONS = ("zero_byte", "unreadable", "undecodable", "corrupt", "truncated", "too_many_pixels", "path_only",
                  *(r for r in FILE_REASONS if r != "unreadable"))
_FIXES = {
    "zero_byte": "the file is empty: re-download or remove it",
    "unreadable": "check that the file exists and is readable",
    "undecodable": "it is not an image: remove it, or point the image column at the image data",
    "corrupt": "re-download or remove the file (curate.py's validate step filters such files out)",
    "truncated": "re-download or remove the file (curate.py's validate step filters such files out)",
    "too_many_pixels": "downscale the image, or raise max_pixels (curation: validate.max_pixels)",
    "path_only": "a row that holds only a path is opened only inside a local folder you point at as the data source; "
                 "if the dataset's paths are trusted, set data.allow_local_paths=true (curate.py: allow_local_paths: "
                 "true on the source; Python: allow_paths=True). Other URLs than the source Hub dataset's own are not fetched: store the "
                 "image bytes in the dataset (or download the files into a folder and point at it)",
    "broken_symlink": "fix or remove the symbolic link",
    "symlink_loop": "remove the symbolic link that loops",
    "not_a_file": "rename the folder, or point at the files inside it",
    "special_file": "remove it: FIFOs, sockets and devices are never read",
    "vanished": "the file was removed while the run used it; run again on a stable copy",
    "changed": "the file was modified while the run used it; run again on a stable copy",
}
# File signatures: an unparsable file that starts like an image is "corrupt", anything else "undecodable".
_MAGIC = [(b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"RIFF", "WebP"), (b"BM", "BMP"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")]
_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
_EXIF_ORIENTATION = 0x0112


def fix_for(reason: str) -> str:
    """What a user does about images skipped for ``reason`` (the text :class:`ImageDecodeError` messages end with);
    e.g. for ``path_only``: set ``data.allow_local_paths=true`` if the paths are trusted."""
    return _FIXES.get(reason, "remove the file")


class ImageDecodeError(ValueError):
    """An image that cannot be used. ``reason`` is one of :data:`DECODE_REASONS`; ``detail`` says what was found;
    ``name`` is the file (path) when known. ``code`` is the curation manifest string ``"<reason>: <detail>"``."""

    def __init__(self, reason: str, detail: str, name: str | None = None) -> None:
        self.reason, self.detail, self.name = reason, detail, name
        what = f"image {name}" if name else "image"
        super().__init__(f"cannot decode {what}: {reason}: {detail} — {fix_for(reason)}")

    @property
    def code(self) -> str:
        return f"{self.reason}: {self.detail}"

    def __reduce__(self):  # picklable across DataLoader / `datasets.map` worker processes
        return type(self), (self.reason, self.detail, self.name)


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image and what it was stored as.

    ``image`` is upright and 8-bit: mode ``"L"`` when the source was plain greyscale, ``"RGB"`` otherwise
    (:func:`decode_image` returns it as RGB). ``unchanged`` is True when ``image`` holds the stored (first-frame)
    pixels as they are — 8-bit RGB/L, no EXIF orientation tag other than 1, no transparency — so its encoded file
    can be kept as it is. ``format`` and ``mode`` are the stored ones, ``orientation`` the stored EXIF tag.
    """

    image: Image.Image
    format: str
    mode: str
    orientation: int
    unchanged: bool


def describe_image_value(value: Any) -> str:
    """A short name for an image value in messages: its path when there is one."""
    if isinstance(value, dict):
        if value.get("path"):
            return str(value["path"])
        value = value.get("bytes")
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, Image.Image) and getattr(value, "filename", ""):
        return str(value.filename)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return f"<{type(value).__name__}>"


def _fetch(url: str) -> bytes:
    """The bytes behind an `hf://` URL of a Hub dataset the user pointed at (with the user's Hub token)."""
    from datasets.utils.file_utils import xopen

    with xopen(url, "rb") as f:
        return f.read()


def _read(path: str, name: str, allow_paths: AllowPaths) -> bytes:
    """The bytes of a local file (or an allowed URL) the value names, if ``allow_paths`` allows opening it."""
    if is_url(path):
        if not allows_path(path, allow_paths):
            raise ImageDecodeError(
                "path_only", f"the image is only the URL {path!r}, outside the Hub datasets this run was pointed at; "
                "URLs are not fetched", name)
        try:
            return _fetch(path)
        except OSError as err:
            raise ImageDecodeError("unreadable", f"{type(err).__name__}: {err}", name) from err
    if not allows_path(path, allow_paths):
        raise ImageDecodeError(
            "path_only", "the image is only a local path, outside the folders the data source was read from", name
        )
    try:
        return read_file(path)
    except FileFault as err:
        raise ImageDecodeError(err.reason, err.detail, name) from err


def _raw(value: Any, name: str, allow_paths: AllowPaths) -> bytes | Image.Image | np.ndarray:
    """The encoded bytes (or an in-memory image / array) behind a column value."""
    if value is None:
        raise ImageDecodeError("zero_byte", "no image data (None)", name)
    if isinstance(value, (Image.Image, np.ndarray)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            return _read(str(value["path"]), name, allow_paths)
        raise ImageDecodeError("zero_byte", "neither bytes nor a path in the image value", name)
    if isinstance(value, (str, os.PathLike)):
        return _read(os.fspath(value), name, allow_paths)
    raise TypeError(
        f"cannot decode an image from a {type(value).__name__}; the image column must hold images, encoded bytes, "
        "{'bytes', 'path'} dicts, paths or arrays (check image_column / data.image_column)"
    )


def _scale_values(arr: np.ndarray, *, sixteen_bit: bool, unit_range: bool) -> np.ndarray:
    """`unit_range`: values in [0, 1] mean 0..255 (float data); otherwise values in [0, 255] are kept."""
    values = np.asarray(arr, dtype=np.float64)
    values = np.where(np.isfinite(values), values, 0.0)  # NaN / inf carry no brightness
    if sixteen_bit:
        values = values / 257.0
    elif values.size:
        lo, hi = float(values.min()), float(values.max())
        if unit_range and lo >= 0.0 and hi <= 1.0:
            values = values * 255.0
        elif lo < 0.0 or hi > 255.0:
            values = (values - lo) / max(hi - lo, 1e-12) * 255.0
    return np.clip(values, 0, 255).round().astype(np.uint8)


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    """HxW / HxWx{1,2,3,4} array of any numeric dtype -> 8-bit PIL image (L, LA, RGB or RGBA)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)) or 0 in arr.shape:
        raise ImageDecodeError("undecodable", f"array of shape {arr.shape} is not HxW or HxWx(1-4)", name)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise ImageDecodeError("undecodable", f"array of dtype {arr.dtype} holds no pixel values", name)
        arr = _scale_values(arr, sixteen_bit=arr.dtype == np.uint16,
                            unit_range=np.issubdtype(arr.dtype, np.floating))
    return Image.fromarray(np.ascontiguousarray(arr))  # uint8: L, LA, RGB or RGBA by the channel count


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag as stored (1 when absent or unreadable; bogus values such as 42 are returned)."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # unreadable EXIF block: treat as upright
        return 1


def _composite(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def normalize_image(image: Image.Image) -> Image.Image:
    """An already decoded, upright PIL image -> 8-bit ``"L"`` (plain greyscale) or ``"RGB"``, by the rules above."""
    mode = image.mode
    transparent = image.info.get("transparency") is not None
    if mode in ("RGB", "L") and not transparent:
        return image
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I") or mode == "F":  # I;16*, I (32-bit int), F (32-bit float): scale, never clip
        pixels = _scale_values(np.asarray(image), sixteen_bit=mode.startswith("I;16"), unit_range=mode == "F")
        return Image.fromarray(pixels)  # 2-D uint8: mode L
    if mode in _ALPHA_MODES or transparent:  # palette / colour-key transparency included
        return _composite(image)
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, RGBX, ...


def _check_pixels(image: Image.Image, max_pixels: int | None, name: str) -> None:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageDecodeError("too_many_pixels", f"{width}x{height} > {max_pixels} (decompression bomb?)", name)


def _open_bytes(data: bytes, max_pixels: int | None, name: str) -> Image.Image:
    """Open, check size (before any pixel is decoded) and structure, then fully decode the first frame."""
    if not data:
        raise ImageDecodeError("zero_byte", "empty file", name)
    with Image.open(io.BytesIO(data)) as probe:
        _check_pixels(probe, max_pixels, name)
        probe.verify()  # structure + checksums (PNG CRC) without decoding pixels
    image = Image.open(io.BytesIO(data))  # verify() leaves the image unusable: open again
    image.load()  # full decode of the first frame: raises on truncated data
    return image


def _failure(err: Exception, data: bytes | None, name: str) -> ImageDecodeError:
    """Map what PIL raised to a reason code (the same text curation has always written to its manifest)."""
    if isinstance(err, Image.DecompressionBombError):
        return ImageDecodeError("too_many_pixels", str(err), name)
    if isinstance(err, UnidentifiedImageError):
        magic = next((fmt for sig, fmt in _MAGIC if data and data.startswith(sig)), None)
        if magic:
            return ImageDecodeError(
                "corrupt", f"starts like a {magic} file but cannot be parsed (bad header or checksum)", name
            )
        return ImageDecodeError("undecodable", "not a recognised image format", name)
    if isinstance(err, (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error)):
        text = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return ImageDecodeError("truncated" if "truncat" in text.lower() else "corrupt", text, name)
    # Decoder bugs on hostile input must not crash a long run either.
    return ImageDecodeError("corrupt", f"{type(err).__name__}: {str(err)[:200]}", name)


def decode(
    value: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, allow_paths: AllowPaths = None
) -> DecodedImage:
    """Decode one image column value by the module's rules; see :class:`DecodedImage`.

    ``allow_paths``: which local paths a value that is only a path may open — ``None`` (default): files under the
    local image sources the user pointed at in this process; ``True``: any local path; ``False``: none; or a
    :class:`training.data.files.PathPolicy` / list of folders. The only URLs ever fetched are the ``hf://`` files
    of a Hub dataset the user pointed at as a source (``trust_hub_dataset``).

    Raises :class:`ImageDecodeError` for data that is not a usable image, ``TypeError`` for a value that cannot
    hold an image at all (a wrong column), and ``RuntimeError`` if ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` was
    switched on (it would turn truncated files into silently grey-filled images).
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by this program or a library it imports), so truncated "
            "files would decode as grey-filled images; set it back to False"
        )
    name = describe_image_value(value)
    raw = _raw(value, name, allow_paths)
    data = raw if isinstance(raw, bytes) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF / metadata / bomb warnings: our own checks decide
            if isinstance(raw, np.ndarray):
                image = _from_array(raw, name)
            elif isinstance(raw, Image.Image):
                _check_pixels(raw, max_pixels, name)
                raw.load()
                image = raw
            else:
                image = _open_bytes(raw, max_pixels, name)
            fmt, mode = image.format or "", image.mode
            orientation = _orientation(image)
            if 2 <= orientation <= 8:  # other values mean nothing: pixels kept as stored
                try:
                    image = ImageOps.exif_transpose(image)
                except Exception:  # broken EXIF structure: keep the pixels as stored
                    pass
            transparent = mode in _ALPHA_MODES or image.info.get("transparency") is not None
            normalized = normalize_image(image)
    except ImageDecodeError:
        raise
    except Exception as err:
        raise _failure(err, data, name) from err
    unchanged = mode in ("RGB", "L") and orientation == 1 and not transparent
    return DecodedImage(normalized, fmt, mode, orientation, unchanged)


def decode_image(
    value: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, allow_paths: AllowPaths = None
) -> Image.Image:
    """Whatever an image column holds -> an upright 8-bit RGB PIL image (see the module docstring for the rules).

    Accepts a PIL image, a ``{"bytes", "path"}`` dict, raw bytes, a local path or a NumPy array; ``allow_paths`` as
    in :func:`decode`. Raises :class:`ImageDecodeError` (with a ``reason`` code) for data that is not a usable image.
    """
    image = decode(value, max_pixels=max_pixels, allow_paths=allow_paths).image
    return image if image.mode == "RGB" else image.convert("RGB")
