"""A folder of real-world odd entries, built in the test: symbolic links (good, broken, looping, to folders, out of
the folder, to devices), names with split words, unicode and spaces, upper-case / missing / wrong extensions, tiny
and decompression-bomb images, 16-bit, CMYK, palette + transparency, animated GIF, multi-page TIFF, truncated,
zero-byte, folders named like images, a FIFO, a socket, hidden files, deep nesting, non-image files, and files that
become unreadable, vanish or change between listing and reading (through the read seam `_open_fd`, because the
tests run as root, where chmod 000 is not enforced).

`Entry.training`: what training (and the probe) make of it — `None`: not an image file, never loaded; `"ok"`:
decoded; else the set of acceptable reason codes. `Entry.curation`: `"ok"` (kept) or the acceptable reason codes.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

OK = "ok"
MIN_SIZE = 8  # curation validate.min_size used with this corpus (the 1x1 image is too small, 12 px ones are not)


@dataclass(frozen=True)
class Entry:
    kind: str
    training: str | frozenset[str] | None
    curation: str | frozenset[str]


def _reasons(*codes: str) -> frozenset[str]:
    return frozenset(codes)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _photo(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    """A distinct image per seed (no two entries are the same picture)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png_header(side: int = 30000) -> bytes:
    """A valid PNG that claims side x side pixels, with almost no pixel data behind it."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b"")


# Entries whose fault happens at read time (after the folder was listed), through the read seam.
UNREADABLE, VANISHES, CHANGES = "unreadable.png", "vanishes.jpg", "changes.png"


def build_fault_corpus(root: Path, outside: Path) -> dict[str, Entry]:
    """Write the corpus under `root` (and link targets under `outside`); return {path relative to root: Entry}."""
    root.mkdir(parents=True)
    outside.mkdir(parents=True)
    entries: dict[str, Entry] = {}
    seed = iter(range(1000))

    def image(rel: str, kind: str, data: bytes | None = None, fmt: str = "PNG", training=OK, curation=OK) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if data is not None else _encode(_photo(next(seed)), fmt))
        entries[rel] = Entry(kind, training, curation)

    def fault(rel: str, kind: str, reason: str, training=None) -> None:
        entries[rel] = Entry(kind, training, _reasons(reason))

    # ---- plain and oddly named images (every one decodes)
    image("plain.png", "plain PNG")
    image("photo.jpg", "plain JPEG", fmt="JPEG")
    image("scan_test_01.jpg", "split word 'test' in the name", fmt="JPEG")
    image("reference_valid.png", "split word 'valid' in the name")
    image("train_eval.png", "split words 'train' and 'eval' in the name")
    image("dev.jpeg", "file named like the split 'dev'", fmt="JPEG")
    image("naïve ünïcode 写真.png", "unicode and spaces in the name")
    image("with space.webp", "space in the name, WebP", fmt="WEBP")
    image("UPPER.JPG", "upper-case .JPG", fmt="JPEG")
    image("Mixed.PNG", "upper-case .PNG")
    image("bitmap.bmp", "BMP", fmt="BMP")
    image("png_named.jpg", "PNG bytes named .jpg")
    image("no_extension", "an image without extension", training=None)  # training loads image suffixes only
    image("deep/a/b/c/d/e/f/g/h/i/nested.png", "deep nesting")
    image("scans_validation/x.png", "split word in a folder name below the root")
    image("one_pixel.png", "1x1 image", _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
          curation=_reasons("too_small"))
    gray16 = Image.fromarray(np.tile(np.linspace(0, 65535, 24).astype(np.uint16), (20, 1)))
    image("gray16.png", "16-bit greyscale", _encode(gray16, "PNG"))
    image("cmyk.jpg", "CMYK JPEG", _encode(_photo(next(seed)).convert("CMYK"), "JPEG"))
    palette = _photo(next(seed)).convert("P", palette=Image.ADAPTIVE)
    image("palette_transparent.png", "palette + transparency", _encode(palette, "PNG", transparency=0))
    rgba = _photo(next(seed)).convert("RGBA")
    rgba.putalpha(100)
    image("rgba.png", "RGBA with alpha", _encode(rgba, "PNG"))
    gif, tiff = io.BytesIO(), io.BytesIO()
    first, second = _photo(next(seed)), _photo(next(seed))
    first.save(gif, format="GIF", save_all=True, append_images=[second])
    image("animated.gif", "animated GIF", gif.getvalue())
    first.save(tiff, format="TIFF", save_all=True, append_images=[second])
    image("multipage.tif", "multi-page TIFF", tiff.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6
    image("exif_rotated.jpg", "EXIF-rotated JPEG", _encode(_photo(next(seed)), "JPEG", exif=exif))

    # ---- broken data (training skips them, curation removes them, both with the decoder's reason)
    jpeg = _encode(_photo(next(seed), (64, 64)), "JPEG")
    png = _encode(_photo(next(seed), (64, 64)), "PNG")
    image("zero_byte.jpg", "zero-byte file", b"", training=_reasons("zero_byte"), curation=_reasons("zero_byte"))
    image("truncated.jpg", "truncated JPEG", jpeg[: len(jpeg) // 2], training=_reasons("truncated"),
          curation=_reasons("truncated"))
    image("truncated.png", "truncated PNG", png[: len(png) // 2], training=_reasons("truncated", "corrupt"),
          curation=_reasons("truncated", "corrupt"))
    image("text.png", "text named .png", b"not an image\n" * 10, training=_reasons("undecodable"),
          curation=_reasons("undecodable"))
    image("random.jpg", "random bytes named .jpg", np.random.default_rng(7).bytes(2048),
          training=_reasons("undecodable", "corrupt"), curation=_reasons("undecodable", "corrupt"))
    image("claims_30000x30000.png", "30000x30000 header (decompression bomb)", huge_png_header(),
          training=_reasons("too_many_pixels"), curation=_reasons("too_many_pixels"))

    # ---- non-image files: not loaded by training; curation decodes every entry, so they are removed
    for rel, data, kind in (("notes.txt", b"a note\n", "text file"), ("meta.json", b'{"a": 1}', "JSON file"),
                            ("Thumbs.db", b"\x00" * 64, "Windows thumbnail cache")):
        image(rel, kind, data, training=None, curation=_reasons("undecodable"))

    # ---- hidden entries: skipped everywhere (counted as hidden, not listed)
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".hidden.png").write_bytes(_encode(_photo(next(seed)), "PNG"))
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "objects" / "x.png").write_bytes(_encode(_photo(next(seed)), "PNG"))

    # ---- symbolic links
    (outside / "target.png").write_bytes(_encode(_photo(next(seed)), "PNG"))
    (outside / "folder").mkdir()
    (outside / "folder" / "inner.png").write_bytes(_encode(_photo(next(seed)), "PNG"))
    (root / "sub").mkdir()
    (root / "sub" / "target.png").write_bytes(_encode(_photo(next(seed)), "PNG"))
    entries["sub/target.png"] = Entry("plain PNG in a sub-folder", OK, OK)
    os.symlink(outside / "target.png", root / "link_outside.png")
    entries["link_outside.png"] = Entry("symlink to a valid file outside the folder (followed)", OK, OK)
    os.symlink(outside / "folder", root / "linked_dir")
    entries["linked_dir/inner.png"] = Entry("file in a symlinked folder outside (followed)", OK, OK)
    os.symlink("../photo.jpg", root / "sub" / "link_up.jpg")  # same picture as photo.jpg (dedup is off here)
    entries["sub/link_up.jpg"] = Entry("relative symlink to a file inside the folder", OK, OK)
    os.symlink("nowhere.png", root / "broken.png")
    fault("broken.png", "broken symlink", "broken_symlink")
    os.symlink("loop_b.png", root / "loop_a.png")
    os.symlink("loop_a.png", root / "loop_b.png")
    fault("loop_a.png", "symlink cycle (a -> b)", "symlink_loop")
    fault("loop_b.png", "symlink cycle (b -> a)", "symlink_loop")
    os.symlink("self.jpg", root / "self.jpg")
    fault("self.jpg", "symlink to itself", "symlink_loop")
    os.symlink(".", root / "loop_dir")
    fault("loop_dir", "folder symlink to its own folder", "symlink_loop")
    os.symlink("..", root / "sub" / "up")
    fault("sub/up", "folder symlink to its parent", "symlink_loop")
    os.symlink("/dev/null", root / "devnull.jpg")
    fault("devnull.jpg", "symlink to /dev/null (a device)", "special_file")
    os.symlink("/dev/zero", root / "devzero.png")  # reading it would never end
    fault("devzero.png", "symlink to /dev/zero (an endless device)", "special_file")

    # ---- entries that are not files
    (root / "dir_named.jpg").mkdir()
    (root / "dir_named.jpg" / "inside.png").write_bytes(_encode(_photo(next(seed)), "PNG"))
    fault("dir_named.jpg", "folder named like an image", "not_a_file")
    entries["dir_named.jpg/inside.png"] = Entry("image inside a folder named like an image", OK, OK)
    (root / "empty_dir.png").mkdir()
    fault("empty_dir.png", "empty folder named like an image", "not_a_file")
    os.mkfifo(root / "fifo.png")  # reading it would block forever
    fault("fifo.png", "FIFO named like an image", "special_file")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "socket.jpg"))
    sock.close()
    fault("socket.jpg", "UNIX socket named like an image", "special_file")

    # ---- faults at read time (see `read_faults`)
    image(UNREADABLE, "unreadable file (permission denied)", training=_reasons("unreadable"),
          curation=_reasons("unreadable"))
    image(VANISHES, "file removed after listing", fmt="JPEG", training=_reasons("vanished"),
          curation=_reasons("vanished"))
    image(CHANGES, "file modified after listing", training=_reasons("changed"), curation=_reasons("changed"))
    return entries


@contextmanager
def read_faults(monkeypatch) -> Iterator[None]:
    """Make the read-time entries fail when they are opened: permission denied, removed, appended to."""
    import training.data.files as files

    real = files._open_fd

    def fake(path: str) -> int:
        name = os.path.basename(path)
        if name == UNREADABLE:
            raise PermissionError(13, "Permission denied", path)
        if name == VANISHES:
            os.unlink(path)
        if name == CHANGES:
            with open(path, "ab") as f:
                f.write(b"more bytes")
        return real(path)

    monkeypatch.setattr(files, "_open_fd", fake)
    yield


def image_files(entries: dict[str, Entry]) -> list[str]:
    """The entries training (and the probe) load: the image files."""
    return sorted(rel for rel, e in entries.items() if e.training is not None)
