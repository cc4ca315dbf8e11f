"""Decode every image, reject the ones a trainer cannot use (with the reason), normalise the rest.

Rejected: zero-byte, undecodable, truncated / corrupt (PNG CRC, short JPEG), decompression bombs, too small,
extreme aspect ratio. Normalised: EXIF orientation applied; CMYK, palette, 16-bit, 32-bit/float, 1-bit and
alpha images become 8-bit RGB (alpha composited on white). Images already stored as upright 8-bit RGB/L in a
common format keep their original bytes; the others are re-encoded (PNG by default, lossless), so every kept
row decodes to an upright 8-bit RGB or L image.

The same decode also computes the hashes the dedup steps need (sha256 of the file bytes, 64-bit pHash of the
image and of its mirror image), so each image is decoded once here.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .config import ValidateConfig

# Never let PIL silently fill a truncated image with grey: that is exactly what we want to detect.
ImageFile.LOAD_TRUNCATED_IMAGES = False

KEEP_AS_IS_FORMATS = {"JPEG", "PNG", "WEBP"}
PHASH_BITS = 64
MAGIC = [(b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"RIFF", "WebP"), (b"BM", "BMP"),
         (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF")]


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit int / float single-channel images -> 8-bit L by their value range."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    else:
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif lo < 0.0 or hi > 255.0:
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), mode="L")


def normalize_image(img: Image.Image) -> Image.Image:
    """Upright 8-bit RGB (or L for plain 8-bit greyscale) from any PIL image."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # bogus EXIF (bad orientation value, broken IFD): keep the pixels as stored
        pass
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        return _to_8bit(img)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def phash_int(img: Image.Image) -> int:
    """64-bit DCT perceptual hash (imagehash.phash, 8x8), as an int."""
    import imagehash

    bits = imagehash.phash(img, hash_size=8).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hash_hex(value: int) -> str:
    return f"{value:016x}"


def check_image(data: bytes | None, cfg: ValidateConfig) -> tuple[str, dict[str, Any]]:
    """Decode and check one file. Returns (reason, info); reason == "" means valid.

    info: width, height, mode (original), format, image (bytes to keep), phash, phash_flip.
    """
    if data is None or len(data) == 0:
        return "zero_byte: empty file", {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF / metadata warnings are not our problem
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format or ""
                width, height = probe.size
                if width * height > cfg.max_pixels:
                    return f"too_many_pixels: {width}x{height} > {cfg.max_pixels} (decompression bomb?)", {}
                probe.verify()  # structure + checksums (PNG CRC) without decoding pixels
            img = Image.open(io.BytesIO(data))
            img.load()  # full decode: raises on truncated data
            orientation = _exif_orientation(img)
            original_mode = img.mode
            norm = normalize_image(img)
    except Image.DecompressionBombError as e:
        return f"too_many_pixels: {e}", {}
    except UnidentifiedImageError:
        magic = next((name for sig, name in MAGIC if data.startswith(sig)), None)
        if magic:
            return f"corrupt: starts like a {magic} file but cannot be parsed (bad header or checksum)", {}
        return "undecodable: not a recognised image format", {}
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, struct.error) as e:
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        kind = "truncated" if "truncat" in text.lower() else "corrupt"
        return f"{kind}: {text}", {}
    except Exception as e:  # decoder bugs on hostile input must not crash a billion-image run
        return f"corrupt: {type(e).__name__}: {str(e)[:200]}", {}
    width, height = norm.size
    short, long = min(width, height), max(width, height)
    if short < cfg.min_size:
        return f"too_small: {width}x{height}, shorter side < min_size={cfg.min_size}", {}
    if long / short > cfg.max_aspect:
        return f"extreme_aspect: {width}x{height}, ratio {long / short:.1f} > max_aspect={cfg.max_aspect}", {}
    as_is = fmt in KEEP_AS_IS_FORMATS and original_mode in ("RGB", "L") and orientation == 1
    if as_is:
        out = data
    else:
        buf = io.BytesIO()
        save_kwargs = {"quality": 95} if cfg.reencode_format == "JPEG" else {}
        norm.save(buf, format=cfg.reencode_format, **save_kwargs)
        out = buf.getvalue()
    rgb = norm.convert("RGB")
    return "", {
        "width": width,
        "height": height,
        "mode": original_mode,
        "format": fmt,
        "image": out,
        "phash": phash_int(rgb),
        "phash_flip": phash_int(ImageOps.mirror(rgb)),
    }


def validate_batch(batch: dict[str, list], cfg: ValidateConfig) -> dict[str, list]:
    """Batched `datasets.map` function: adds width/height/mode/format/sha256/phash/phash_flip/_reason."""
    out: dict[str, list] = {k: [] for k in ("image", "width", "height", "mode", "format", "sha256", "phash",
                                            "phash_flip", "_reason")}
    for data in batch["image"]:
        reason, info = check_image(data, cfg)
        out["sha256"].append(hashlib.sha256(data or b"").hexdigest())
        out["_reason"].append(reason)
        out["image"].append(info.get("image", data if not reason else b""))
        out["width"].append(info.get("width", 0))
        out["height"].append(info.get("height", 0))
        out["mode"].append(info.get("mode", ""))
        out["format"].append(info.get("format", ""))
        out["phash"].append(hash_hex(info["phash"]) if "phash" in info else "")
        out["phash_flip"].append(hash_hex(info["phash_flip"]) if "phash_flip" in info else "")
    return out


def load_rgb(data: bytes) -> Image.Image:
    """Decode a validated (already normalised) image to RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")
