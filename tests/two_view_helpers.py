"""What tests/test_mocov3.py, test_barlow_twins.py and test_densecl.py share: tiny backbones, a 2-process gloo
launcher, and `train.py` runs in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from transformers import ResNetConfig

from modeling import DinoVisionConfig

ROOT = Path(__file__).resolve().parents[1]

TINY_VIT = DinoVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            layerscale_init=0.1)
TINY_RESNET = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], layer_type="basic")

# `model` sections of train.py configs with the same tiny backbones.
VIT_SECTION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8,
               "drop_path_rate": 0.0, "layerscale_init": 0.1}
RESNET_SECTION = {"arch": "resnet", "resnet_embedding_size": 8, "resnet_hidden_sizes": [8, 16, 16, 32],
                  "resnet_depths": [1, 1, 1, 1], "resnet_layer_type": "basic"}
# Shared sections of a short run: no warm-up, constant weight decay, no layer-wise decay, no clipping.
OPTIM = {"batch_size": 8, "epochs": 2, "iters_per_epoch": 6, "warmup_epochs": 0, "min_lr": 0.0, "weight_decay": 0.0,
         "weight_decay_end": 0.0, "layerwise_decay": 1.0, "patch_embed_lr_mult": 1.0, "clip_grad": 0.0,
         "freeze_last_layer_epochs": 0}
DATA = {"dataset": "sample", "num_workers": 0}
TRAIN = {"save_every": 4, "log_every": 1, "keep_last": 3}


def views(batch: int = 4, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)


# ---- 2-process gloo ------------------------------------------------------------------------------------------


def _worker(rank: int, world_size: int, init_file: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_processes(tmp_path: Path, fn, *args) -> None:
    """`fn(rank, world_size, *args)` in 2 gloo processes (a module-level function; it asserts what it checks).

    Each call gets its own rendezvous file: a FileStore file left by an earlier group holds that group's
    addresses, and a new group reading it connects to a closed port ("Connection refused")."""
    init_file = Path(tempfile.mkdtemp(dir=tmp_path, prefix="gloo_")) / "init"
    mp.spawn(_worker, args=(2, str(init_file), fn, args), nprocs=2, join=True)


# ---- train.py in a subprocess --------------------------------------------------------------------------------


def train_process(config: dict, tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """`python train.py --config <config as YAML> overrides...` (offline, one thread), not waited for."""
    path = tmp_path / f"{config['method']}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(path), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train(config: dict, tmp_path: Path, *overrides: str, timeout: int = 600) -> str:
    """Run train.py to the end; returns its stderr (the log)."""
    proc = train_process(config, tmp_path, *overrides)
    _, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-4000:]
    return stderr


def metric_rows(output_dir: Path) -> dict[int, dict]:
    rows = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def load_stock(folder: Path, code: str, tmp_path: Path, trust_remote_code: bool = False) -> str:
    """Run `code` in a fresh interpreter that has only transformers (no dinoforge import); `m` is
    `AutoModel.from_pretrained(folder)` (with the folder's own code if `trust_remote_code`). Returns its stdout."""
    prelude = (
        "import sys, torch\n"
        "from transformers import AutoModel\n"
        f"m = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code={trust_remote_code}).eval()\n"
        "assert 'modeling' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def train_two_processes(config: dict, tmp_path: Path, *overrides: str, timeout: int = 600) -> str:
    """train.py under `accelerate launch` with 2 gloo processes on the CPU (real DDP); returns the log."""
    path = tmp_path / f"{config['method']}_ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"),
           "--config", str(path), *overrides]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stderr


def assert_ddp_equals_one_process(config: dict, tmp_path: Path, steps: int, rel_tol: float = 1e-5) -> None:
    """2 processes × batch B train like 1 process × batch 2B on the same images: BatchNorm statistics, keys and
    correlations cover the global batch, and DDP's gradient average is the 1-process gradient."""
    import math

    two, one = tmp_path / "two", tmp_path / "one"
    train_two_processes(config, tmp_path, f"train.output_dir={two}")
    batch = config["optim"]["batch_size"]
    train(config, tmp_path, f"train.output_dir={one}", f"optim.batch_size={2 * batch}")
    a, b = metric_rows(two), metric_rows(one)
    for step in range(1, steps + 1):
        assert math.isclose(a[step]["loss"], b[step]["loss"], rel_tol=rel_tol), (step, a[step]["loss"], b[step]["loss"])
