"""A second method, defined here in a few lines, trains through `train.py`'s loop unchanged: it logs its own
fields, resumes exactly after SIGKILL and exports a stock-loadable backbone (the method protocol of
modeling/method.py). Run as a script, this file registers the toy method and calls `train.py`'s main."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from tests/
    sys.path.insert(0, str(ROOT))

from modeling import DinoVisionConfig, DinoVisionModel  # noqa: E402
from modeling.method import DataPipeline, PretrainingMethod  # noqa: E402
from training.build import ModelConfig, backbone_config  # noqa: E402
from training.methods import Method, register_method  # noqa: E402
from training.train_config import TrainConfig  # noqa: E402

# ---- the toy method: BYOL-like regression of one view's online prediction onto the other view's EMA target ----


class ToyByolConfig(PretrainedConfig):
    model_type = "dinoforge_test_toy_byol"
    sub_configs = {"backbone_config": DinoVisionConfig}

    def __init__(self, backbone_config: DinoVisionConfig | dict | None = None, collapse_std: float = 1e-4, **kwargs):
        if isinstance(backbone_config, dict):
            backbone_config = DinoVisionConfig(**backbone_config)
        self.backbone_config = backbone_config or DinoVisionConfig()
        self.collapse_std = collapse_std
        super().__init__(**kwargs)


@dataclass
class ToyByolOutput(ModelOutput):
    loss: torch.Tensor | None = None
    cosine: torch.Tensor | None = None
    target_std: torch.Tensor | None = None


class ToyByol(PreTrainedModel, PretrainingMethod):
    config_class = ToyByolConfig

    def __init__(self, config: ToyByolConfig):
        super().__init__(config)
        dim = config.backbone_config.hidden_size
        self.online = DinoVisionModel(config.backbone_config)
        self.predictor = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.target = DinoVisionModel(config.backbone_config)
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)

    def forward(self, global_crops: torch.Tensor, **_: float) -> ToyByolOutput:
        view1, view2 = self.predictor(self.online(global_crops).pooler_output).chunk(2)
        with torch.no_grad():
            target1, target2 = self.target(global_crops).pooler_output.chunk(2)
        cosine = 0.5 * (F.cosine_similarity(view1, target2).mean() + F.cosine_similarity(view2, target1).mean())
        return ToyByolOutput(loss=2 - 2 * cosine, cosine=cosine.detach(), target_std=target1.std(0).mean())

    def data_pipeline(self) -> DataPipeline:
        return DataPipeline("multicrop", {"patch_size": self.config.backbone_config.patch_size, "masks": False})

    def trainable_parts(self) -> dict[str, nn.Module]:
        return {"backbone": self.online, "predictor": self.predictor}

    @torch.no_grad()
    def after_optimizer_step(self, momentum: float, **_: float) -> None:
        torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()), 1.0 - momentum)

    def exports(self) -> dict[str, nn.Module]:
        return {"backbone": self.target}

    def health(self, metrics: dict[str, float]) -> list[str]:
        if metrics["target_std"] < self.config.collapse_std:
            return [f"toy collapse: target embeddings std {metrics['target_std']:.2g}"]
        return []


@dataclass
class ToySection:
    momentum: float = 0.99
    collapse_std: float = 1e-4


@dataclass
class ToyTrainConfig(TrainConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    toy: ToySection = field(default_factory=ToySection)


def build_toy(cfg: ToyTrainConfig) -> ToyByol:
    backbone = backbone_config(cfg.model, cfg.crops.global_size)
    return ToyByol(ToyByolConfig(backbone_config=backbone, collapse_std=cfg.toy.collapse_std))


TOY = Method("toy_byol", ToyTrainConfig, build_toy, schedules=lambda cfg: {"momentum": lambda step: cfg.toy.momentum})

# ---- tests ----------------------------------------------------------------------------------------------------

TINY = {
    "method": "toy_byol",
    "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "drop_path_rate": 0.1,
              "layerscale_init": 0.1},
    "crops": {"global_size": 28, "local_size": 14, "local_number": 0},
    "optim": {"batch_size": 4, "epochs": 2, "iters_per_epoch": 6, "warmup_epochs": 1, "base_lr": 0.05},
    "data": {"dataset": "sample", "num_workers": 0},
    "train": {"save_every": 4, "log_every": 1, "keep_last": 3},
}


def _train(config: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config", str(config), *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(output_dir: Path) -> dict[int, dict]:
    rows = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert row["step"] not in rows, f"step {row['step']} logged twice"
        rows[row["step"]] = row
    return rows


def test_toy_method_logs_resumes_exactly_and_exports(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(TINY))
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    proc = _train(config, f"train.output_dir={straight}", "toy.collapse_std=1e9")  # every row "collapses"
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "toy collapse: target embeddings std" in stderr  # the loop warns with the method's own signal

    proc = _train(config, f"train.output_dir={killed}")
    deadline = time.time() + 300
    while not (killed / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_rows(killed)) < 12, "the kill came too late to test anything"
    proc = _train(config, f"train.output_dir={killed}")  # resume=auto
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "toy collapse" not in stderr

    ref, got = _rows(straight), _rows(killed)
    assert sorted(ref) == sorted(got) == list(range(1, 13))
    for row in ref.values():  # the method's own fields and schedule values, with no list of names in the loop
        assert {"loss", "cosine", "target_std", "momentum", "lr"} <= row.keys()
        assert row["momentum"] == 0.99
    for step in range(5, 13):
        for key in ("loss", "cosine", "target_std"):
            assert math.isclose(got[step][key], ref[step][key], rel_tol=1e-5, abs_tol=1e-7), (step, key)
    assert ref[12]["loss"] < ref[1]["loss"]  # it trains

    from safetensors.torch import load_file

    a = load_file(straight / "checkpoint-12" / "model.safetensors")
    b = load_file(killed / "checkpoint-12" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)

    # the export is the EMA target as a stock transformers DINOv2, equal to the checkpoint's target weights
    code = (
        "import sys, torch\n"
        "from transformers import AutoModel\n"
        f"m = AutoModel.from_pretrained({str(straight / 'backbone')!r}).eval()\n"
        "assert type(m).__name__ == 'Dinov2Model' and 'modeling' not in sys.modules\n"
        "torch.manual_seed(0)\n"
        "print(m(pixel_values=torch.randn(2, 3, 28, 28)).pooler_output.sum().item())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    target = DinoVisionModel(build_toy(_load(config)).config.backbone_config)
    target.load_state_dict({k.removeprefix("target."): v for k, v in a.items() if k.startswith("target.")})
    torch.manual_seed(0)
    expected = target.eval()(torch.randn(2, 3, 28, 28)).pooler_output.sum().item()
    assert math.isclose(float(res.stdout.split()[-1]), expected, rel_tol=1e-4, abs_tol=1e-5)


def _load(config: Path) -> ToyTrainConfig:
    from training.methods import load_train_config

    return load_train_config(["--config", str(config)])


register_method(TOY)

if __name__ == "__main__":
    from train import main

    main(sys.argv[1:])
