"""Training throughput and peak memory of real `train.py` runs (data loading, augmentation, model, optimizer).

    python benchmarks/train_throughput.py [--quickstart_steps 30] [--vits_steps 4]

Runs, each in a fresh process: the quickstart recipe for a few steps, and the ViT-S/14 recipe (`configs/vits14.yaml`)
at batch 16 (2x224 + 8x98 crops) on the sample data. Prints images/s (the loop's own measure, excluding the first
logged interval, which holds start-up) and the peak RSS of the training process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, steps: int, *overrides: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / config), f"train.output_dir={out}",
            f"train.max_steps={steps}", "train.save_every=0", "train.log_every=1", "data.eval_dataset=null", *overrides,
        ]
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # max over the child processes waited for so far: runs go smallest first, so each figure is its own
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        timed = rows[1:] or rows
        images_per_s = sum(r["images_per_s"] for r in timed) / len(timed)
        return images_per_s, peak_kib / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart_steps", type=int, default=30)
    parser.add_argument("--vits_steps", type=int, default=4)
    args = parser.parse_args()
    rows = [
        ("quickstart (tiny ViT, 2x84 + 4x42, batch 32)", *run("configs/quickstart.yaml", args.quickstart_steps)),
        ("ViT-S/14 (2x224 + 8x98, batch 16)",
         *run("configs/vits14.yaml", args.vits_steps, "optim.batch_size=16", "data.num_workers=2")),
    ]
    print(f"{'run':<48}{'images/s':>10}{'peak RSS GiB':>14}")
    for name, ips, rss in rows:
        print(f"{name:<48}{ips:>10.2f}{rss:>14.2f}")
    print("(peak RSS: max over the training processes started so far, DataLoader workers not included)")


if __name__ == "__main__":
    main()
