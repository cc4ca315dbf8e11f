"""Decode every image, reject the ones a trainer cannot use (with the reason), normalise the rest.

Rejected: zero-byte, undecodable, truncated / corrupt (PNG CRC, short JPEG), decompression bombs, too small,
extreme aspect ratio. Normalised: EXIF orientation applied; CMYK, palette, 16-bit, 32-bit/float, 1-bit and
alpha images become 8-bit RGB (alpha composited on white). Images already stored as upright 8-bit RGB/L in a
common format keep their original bytes; the others are re-encoded (PNG by default, lossless), so every kept
row decodes to an upright 8-bit RGB or L image.

Decoding is `training.data.decode` — the decoder training and the probe use — so the rules (and the reason
codes) are the same everywhere. The same decode also computes the hashes the dedup steps need (sha256 of the
file bytes, 64-bit pHash of the image and of its mirror image), so each image is decoded once here.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

from PIL import Image, ImageOps

from training.data.decode import DecodedImage, ImageDecodeError, decode, normalize_image

from .config import ValidateConfig

__all__ = ["check_image", "hash_hex", "normalize_image", "phash_int", "validate_batch"]

KEEP_AS_IS_FORMATS = {"JPEG", "PNG", "WEBP"}
PHASH_BITS = 64


def phash_int(img: Image.Image) -> int:
    """64-bit DCT perceptual hash (imagehash.phash, 8x8), as an int."""
    import imagehash

    bits = imagehash.phash(img, hash_size=8).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hash_hex(value: int) -> str:
    return f"{value:016x}"


def check_image(data: bytes | None, cfg: ValidateConfig) -> tuple[str, dict[str, Any]]:
    """Decode and check one file. Returns (reason, info); reason == "" means valid.

    Decoding is the project's one decoder (`training.data.decode`), so a kept file gives training and the probe
    exactly the pixels checked here, and a rejected one fails there for the same reason (`<reason>: <detail>`).
    info: width, height, mode (original), format, image (bytes to keep), phash, phash_flip.
    """
    try:
        decoded = decode(data or b"", max_pixels=cfg.max_pixels)  # a missing image is an empty file
    except ImageDecodeError as err:
        return err.code, {}
    norm = decoded.image
    width, height = norm.size
    short, long = min(width, height), max(width, height)
    if short < cfg.min_size:
        return f"too_small: {width}x{height}, shorter side < min_size={cfg.min_size}", {}
    if long / short > cfg.max_aspect:
        return f"extreme_aspect: {width}x{height}, ratio {long / short:.1f} > max_aspect={cfg.max_aspect}", {}
    rgb = norm.convert("RGB")
    return "", {
        "width": width,
        "height": height,
        "mode": decoded.mode,
        "format": decoded.format,
        "image": _kept_bytes(data, decoded, cfg),
        "phash": phash_int(rgb),
        "phash_flip": phash_int(ImageOps.mirror(rgb)),
    }


def _kept_bytes(data: bytes, decoded: DecodedImage, cfg: ValidateConfig) -> bytes:
    """The original bytes when they already decode to the normalised pixels, else a lossless re-encoding."""
    if decoded.format in KEEP_AS_IS_FORMATS and decoded.unchanged:
        return data
    buf = io.BytesIO()
    save_kwargs = {"quality": 95} if cfg.reencode_format == "JPEG" else {}
    decoded.image.save(buf, format=cfg.reencode_format, **save_kwargs)
    return buf.getvalue()


def validate_batch(batch: dict[str, list], cfg: ValidateConfig) -> dict[str, list]:
    """Batched `datasets.map` function: adds width/height/mode/format/sha256/phash/phash_flip/_reason.

    A row whose `error` says ingest could not read the entry (broken link, FIFO, path_only, ...) is rejected with
    that reason, undecoded."""
    out: dict[str, list] = {k: [] for k in ("image", "width", "height", "mode", "format", "sha256", "phash",
                                            "phash_flip", "_reason")}
    errors = batch.get("error") or [""] * len(batch["image"])
    for data, error in zip(batch["image"], errors):
        reason, info = (error, {}) if error else check_image(data, cfg)
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
