"""Feature-extraction throughput of the probe pipeline against the bare backbone forward.

    python benchmarks/probe_speed.py [--num_images 5000] [--image_size 224] [--hidden_size 192] [--layers 12]
                                     [--batch_size 64] [--num_workers 2] [--device cpu|cuda] [--data_dir DIR]

Data: `--num_images` JPEGs cut from the project's sample photos (the skimage.data photos of
`training.sample_data.SAMPLE_CLASSES`, random crops, shorter side 256-320 px, class = photo) written once to an
imagefolder (`--data_dir`, default a temporary folder) and read back through `training.data.load_image_dataset`.
Model: a random-init stock `Dinov2Model` (patch 14; default width 192 / 12 layers / 3 heads, a ViT-Ti/14, so a run
takes a few minutes on 2 CPU cores; `--hidden_size 384 --heads 6` is ViT-S/14).

- bare: the batches decoded and preprocessed beforehand (same processor, same batches, fp32 in memory), then
  timed: only `model(pixel_values=...)` over them.
- pipeline: `training.evaluation.extract_features` end to end (DataLoader workers decode + resize/crop, the
  device normalises, forward, CLS/mean-patch pooling), worker start-up included.
The images are split into `--rounds` rounds; each round runs both measurements on the same rows, alternating
which goes first, so a change of background load on a shared machine affects both alike.

Prints both throughputs and `ratio: X` = pipeline / bare (target ≥ 0.90).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.evaluation import default_image_processor, extract_features, load_split  # noqa: E402
from training.evaluation.features import autocast, resolve_dtype  # noqa: E402


def make_images(root: Path, num_images: int, seed: int = 0) -> Path:
    """`num_images` random crops of the sample photos as JPEGs in root/train/<class>/ (reused if complete)."""
    import skimage.data
    from PIL import Image

    from training.sample_data import SAMPLE_CLASSES

    marker = root / f".complete-{num_images}-{seed}"
    if marker.is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    photos = {}
    for name, loader in SAMPLE_CLASSES.items():
        array = getattr(skimage.data, loader)()
        if isinstance(array, tuple):
            array = array[0]
        photos[name] = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    rng = np.random.default_rng(seed)
    names = list(photos)
    for name in names:
        (root / "train" / name).mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        name = names[i % len(names)]
        photo = photos[name]
        w, h = photo.size
        side = int(rng.integers(min(w, h) // 3, min(w, h) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        short = int(rng.integers(256, 321))
        aspect = float(rng.uniform(1.0, 1.33))
        crop = photo.crop((x, y, x + side, y + side)).resize((int(short * aspect), short), Image.BILINEAR)
        crop.save(root / "train" / name / f"{i:06d}.jpg", quality=90)
    marker.touch()
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=5000)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--hidden_size", type=int, default=192)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--rounds", type=int, default=3, help="alternating bare/pipeline rounds (fairer under drifting load)")
    p.add_argument("--data_dir", default=None, help="keep the generated images here (reused by later runs)")
    args = p.parse_args()

    from transformers import Dinov2Config, Dinov2Model

    device = torch.device(args.device)
    dtype = resolve_dtype(device, args.dtype)
    tmp = None
    if args.data_dir is None:
        tmp = tempfile.mkdtemp(prefix="probe_speed_")
        data_dir = Path(tmp)
    else:
        data_dir = Path(args.data_dir)
    try:
        t0 = time.perf_counter()
        make_images(data_dir, args.num_images)
        ds = load_split(str(data_dir), "train")
        print(f"data: {len(ds)} JPEGs in {data_dir} ({time.perf_counter() - t0:.1f} s to prepare)")

        torch.manual_seed(0)
        config = Dinov2Config(
            image_size=args.image_size, patch_size=14, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size,
        )
        model = Dinov2Model(config).eval().to(device)
        processor = default_image_processor(args.image_size)
        n, bs = len(ds), args.batch_size

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        def bare_round(rows: range) -> tuple[float, float]:
            """(decode seconds, forward seconds): decode the round's batches first, then time only the forwards."""
            t0 = time.perf_counter()
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in a DataLoader worker (small tensor ops scale badly over threads)
            batches = []
            for start in range(rows.start, rows.stop, bs):
                images = [im.convert("RGB") for im in ds[start : min(start + bs, rows.stop)]["image"]]
                batches.append(processor(images=images, return_tensors="pt")["pixel_values"].to(device))
            torch.set_num_threads(threads)
            decode = time.perf_counter() - t0
            sync()
            t0 = time.perf_counter()
            with torch.no_grad(), autocast(device, dtype):
                for x in batches:
                    model(pixel_values=x)
            sync()
            return decode, time.perf_counter() - t0

        def pipeline_round(rows: range) -> float:
            t0 = time.perf_counter()
            feats = extract_features(
                model, ds.select(rows), image_processor=processor, batch_size=bs, num_workers=args.num_workers,
                device=device, dtype=dtype, progress=False,
            )
            sync()
            assert len(feats) == len(rows)
            return time.perf_counter() - t0

        with torch.no_grad(), autocast(device, dtype):  # warm-up
            model(pixel_values=torch.randn(bs, 3, args.image_size, args.image_size, device=device))
        # Rounds of whole batches, alternating which measurement goes first, so drifting background load
        # (shared machines) hits both alike. Each pipeline round starts its own DataLoader workers.
        per_round = math.ceil(n / args.rounds / bs) * bs
        rounds = [range(a, min(a + per_round, n)) for a in range(0, n, per_round)]
        load_before = os.getloadavg()[0]
        decode_s = bare_s = pipe_s = 0.0
        for i, rows in enumerate(rounds):
            if i % 2 == 0:
                d, b = bare_round(rows)
                pt = pipeline_round(rows)
            else:
                pt = pipeline_round(rows)
                d, b = bare_round(rows)
            decode_s, bare_s, pipe_s = decode_s + d, bare_s + b, pipe_s + pt
            print(f"  round {i + 1}/{len(rounds)}: {len(rows)} images, bare {len(rows) / b:.1f} img/s, "
                  f"pipeline {len(rows) / pt:.1f} img/s", flush=True)
        load_after = os.getloadavg()[0]

        bare, pipe = n / bare_s, n / pipe_s
        threads = torch.get_num_threads()
        print(f"model: Dinov2Model width {args.hidden_size}, {args.layers} layers, {args.image_size}px, patch 14; "
              f"device {device}, {dtype}, batch {bs}, {args.num_workers} workers, {threads} torch threads, "
              f"{len(rounds)} rounds; load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} CPUs")
        print(f"{'':<44}{'images/s':>10}{'seconds':>10}")
        print(f"{'decode + preprocess, 1 thread (info)':<44}{n / decode_s:>10.1f}{decode_s:>10.1f}")
        print(f"{'bare backbone forward (pre-decoded)':<44}{bare:>10.1f}{bare_s:>10.1f}")
        print(f"{'probe pipeline (extract_features)':<44}{pipe:>10.1f}{pipe_s:>10.1f}")
        ratio = pipe / bare
        print(f"ratio: {ratio:.3f}  ({'meets' if ratio >= 0.9 else 'BELOW'} the 0.90 target)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
