"""Shared fixtures for the curation tests and benchmark: real photos (scikit-image's bundled images, no
download), distinct tiles, transformed near-copies, a corpus of broken/odd files, and a tiny local DINOv2.

Distinct images are non-overlapping tiles of several photos (low-texture tiles skipped). Their pairwise pHash
distances are >= 8 bits (measured), so a threshold below that cannot merge two distinct tiles.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Photos that load offline (bundled with scikit-image, no pooch download). `cat` is `chelsea` and the stereo
# pair's right view is a near-copy of the left one, so neither is used.
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle", "camera", "coins",
          "brick", "grass", "gravel", "colorwheel", "hubble_deep_field", "retina", "page", "cell", "text"]
TRANSFORMS = ["exact", "reencode", "resize", "crop", "flip"]


def load_photo(name: str) -> np.ndarray:
    import skimage.data as data

    arr = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def distinct_images(n: int, size: int = 96, min_std: float = 20.0) -> list[tuple[str, Image.Image]]:
    """`n` distinct RGB tiles (name, image), taken round-robin over the photos for variety."""
    per_photo: list[list[tuple[str, Image.Image]]] = []
    for name in PHOTOS:
        arr = load_photo(name)
        tiles = []
        for y in range(0, arr.shape[0] - size + 1, size):
            for x in range(0, arr.shape[1] - size + 1, size):
                tile = arr[y:y + size, x:x + size]
                if tile.std() >= min_std:
                    tiles.append((f"{name}_{y}_{x}", Image.fromarray(tile)))
        per_photo.append(tiles)
    out: list[tuple[str, Image.Image]] = []
    depth = 0
    while len(out) < n:
        added = False
        for tiles in per_photo:
            if depth < len(tiles) and len(out) < n:
                out.append(tiles[depth])
                added = True
        if not added:
            raise ValueError(f"only {len(out)} distinct tiles of size {size} available")
        depth += 1
    return out


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def transform(img: Image.Image, kind: str) -> bytes:
    """A near-copy of `img` as file bytes. `exact` is handled by the caller (same bytes)."""
    w, h = img.size
    if kind == "reencode":
        return encode(img, "JPEG", quality=60)
    if kind == "resize":
        return encode(img.resize((int(w * 0.75), int(h * 0.75)), Image.BICUBIC))
    if kind == "crop":
        m = int(round(w * 0.06))
        return encode(img.crop((m, m, w - m, h - m)))
    if kind == "flip":
        return encode(ImageOps.mirror(img))
    raise ValueError(kind)


def build_collection(root: Path, n_distinct: int = 40, n_copies_per_transform: int = 4, n_eval: int = 4,
                     n_seeds: int = 6, size: int = 96) -> dict:
    """Write an uncurated folder, an eval folder and a seed folder; return the ground truth.

    uncurated/: n_distinct originals (PNG) + for each transform n_copies_per_transform copies of different
    originals + n_eval originals that are near-copies (JPEG re-encode / resize) of eval images.
    eval/: n_eval distinct images (not among the originals); seeds/: n_seeds further distinct images.
    """
    tiles = distinct_images(n_distinct + n_eval + n_seeds, size=size)
    originals, evals, seeds = tiles[:n_distinct], tiles[n_distinct:n_distinct + n_eval], tiles[n_distinct + n_eval:]
    un, ev, sd = root / "uncurated", root / "eval", root / "seeds"
    for d in (un, ev, sd):
        d.mkdir(parents=True, exist_ok=True)
    truth = {"originals": [], "copies": [], "eval_overlaps": []}
    for name, img in originals:
        (un / f"{name}.png").write_bytes(encode(img))
        truth["originals"].append(f"{name}.png")
    pick = 0
    for kind in TRANSFORMS:
        for _ in range(n_copies_per_transform):
            name, img = originals[pick % len(originals)]
            pick += 1
            data = encode(img) if kind == "exact" else transform(img, kind)
            fname = f"copy_{kind}_{name}.{'jpg' if kind == 'reencode' else 'png'}"
            (un / fname).write_bytes(data)
            truth["copies"].append({"file": fname, "of": f"{name}.png", "transform": kind})
    for i, (name, img) in enumerate(evals):
        (ev / f"{name}.png").write_bytes(encode(img))
        kind = "reencode" if i % 2 == 0 else "resize"
        fname = f"evalcopy_{kind}_{name}.{'jpg' if kind == 'reencode' else 'png'}"
        (un / fname).write_bytes(transform(img, kind))
        truth["eval_overlaps"].append({"file": fname, "eval": f"{name}.png", "transform": kind})
    for name, img in seeds:
        (sd / f"{name}.png").write_bytes(encode(img))
    return truth


def save_tiny_dinov2(path: Path, image_size: int = 56, seed: int = 0) -> Path:
    """A tiny randomly initialised stock `Dinov2Model` + image processor, loadable with AutoModel."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=image_size)
    Dinov2Model(config).eval().save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      do_convert_rgb=True).save_pretrained(path)
    return path


# ---------- broken / odd files ----------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def broken_corpus(root: Path) -> dict[str, str]:
    """Write >= 20 kinds of broken/odd files; return {file name: expected reason prefix or "ok"}."""
    root.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(load_photo("astronaut")[:128, :128])
    good_png = encode(base)
    good_jpg = encode(base, "JPEG", quality=90)
    files: dict[str, tuple[bytes, str]] = {}
    files["zero_byte.jpg"] = (b"", "zero_byte")
    files["random_bytes.jpg"] = (np.random.default_rng(0).bytes(4096), "undecodable")
    files["text_as.jpg"] = (b"hello, I am not an image\n" * 20, "undecodable")
    files["html_error_page.png"] = (b"<html><body>404 Not Found</body></html>", "undecodable")
    files["svg_image.svg"] = (b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"/>', "undecodable")
    files["truncated.jpg"] = (good_jpg[: len(good_jpg) // 2], "truncated")
    files["truncated.png"] = (good_png[: len(good_png) // 2], "")  # reason: truncated or corrupt
    files["only_soi.jpg"] = (b"\xff\xd8", "")
    files["png_header_only.png"] = (good_png[:33], "")
    bad_crc = bytearray(good_png)
    bad_crc[40] ^= 0xFF  # inside the first IDAT chunk -> CRC mismatch
    files["bad_crc.png"] = (bytes(bad_crc), "")
    bomb = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0))
    bomb += _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + _png_chunk(b"IEND", b"")
    files["decompression_bomb.png"] = (bomb, "too_many_pixels")
    files["too_small.png"] = (encode(base.resize((16, 16))), "too_small")
    files["extreme_aspect.png"] = (encode(base.resize((640, 64))), "extreme_aspect")
    files["one_pixel.gif"] = (encode(Image.new("P", (1, 1))), "too_small")
    # odd but valid: normalised, kept
    files["cmyk.jpg"] = (encode(base.convert("CMYK"), "JPEG"), "ok")
    files["palette.png"] = (encode(base.convert("P", palette=Image.ADAPTIVE)), "ok")
    pal_t = base.convert("P", palette=Image.ADAPTIVE)
    pal_t.info["transparency"] = 0
    files["palette_transparency.png"] = (encode(pal_t, transparency=0), "ok")
    arr16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    files["gray16.png"] = (encode(Image.fromarray(arr16)), "ok")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    files["rgba.png"] = (encode(rgba), "ok")
    files["la.png"] = (encode(base.convert("LA")), "ok")
    files["bilevel.png"] = (encode(base.convert("1")), "ok")
    files["float32.tif"] = (encode(Image.fromarray(np.asarray(base.convert("L"), np.float32) / 255.0), "TIFF"), "ok")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    files["exif_rotated.jpg"] = (encode(base.resize((128, 96)), "JPEG", exif=exif), "ok")
    bogus = Image.Exif()
    bogus[0x0112] = 42  # invalid orientation value
    files["exif_bogus.jpg"] = (encode(base, "JPEG", exif=bogus), "ok")
    frames = [base, ImageOps.mirror(base)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    files["animated.gif"] = (gif.getvalue(), "ok")
    files["webp.webp"] = (encode(base, "WEBP"), "ok")
    files["bmp.bmp"] = (encode(base, "BMP"), "ok")
    files["png_named_jpg.jpg"] = (good_png, "ok")
    files["grayscale.jpg"] = (encode(base.convert("L"), "JPEG"), "ok")
    files["int32.tif"] = (encode(Image.fromarray(np.asarray(base.convert("L"), np.int32) * 1000), "TIFF"), "ok")
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    return {name: expected for name, (_, expected) in files.items()}


# ---------- scoring ----------

DEDUP_STEPS = ("exact_dedup", "phash_dedup", "copy_dedup")


def base_name(file_id: str) -> str:
    """The distinct image a file derives from: `copy_<kind>_<tile>.ext` / `evalcopy_<kind>_<tile>.ext` -> tile."""
    name = file_id.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    for prefix in ("copy_", "evalcopy_"):
        if name.startswith(prefix):
            return name[len(prefix):].split("_", 1)[1]
    return name


def score_curation(manifest: list[dict], truth: dict, source: str = "web") -> dict:
    """Recall per transform, precision and false merges of the dedup steps; eval-overlap recall."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    dedup_rows = [r for r in manifest if r["step"] in DEDUP_STEPS]
    for r in dedup_rows:
        a, b = find(r["id"]), find(r["duplicate_of"])
        if a != b:
            parent[a] = b
    recall: dict[str, list[int]] = {}
    for c in truth["copies"]:
        hit = find(f"{source}/{c['file']}") == find(f"{source}/{c['of']}")
        recall.setdefault(c["transform"], []).append(int(hit))
    correct = sum(base_name(r["id"]) == base_name(r["duplicate_of"]) for r in dedup_rows)
    members: dict[str, set[str]] = {}
    for r in dedup_rows:
        for x in (r["id"], r["duplicate_of"]):
            members.setdefault(find(x), set()).add(base_name(x))
    false_merges = [sorted(m) for m in members.values() if len(m) > 1]
    removed_eval = {r["id"] for r in manifest if r["step"] == "decontaminate"}
    eval_hits = []
    for e in truth["eval_overlaps"]:
        row = f"{source}/{e['file']}"
        eval_hits.append(int(row in removed_eval or find(row) in removed_eval))
    return {
        "recall": {k: sum(v) / len(v) for k, v in recall.items()},
        "precision": correct / len(dedup_rows) if dedup_rows else 1.0,
        "false_merges": false_merges,
        "eval_recall": sum(eval_hits) / len(eval_hits) if eval_hits else 1.0,
        "removed_as_duplicate": len(dedup_rows),
    }
