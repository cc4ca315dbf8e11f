"""Typed defaults of the sections every method shares (`crops`, `optim`, `data`, `train`, `hub`) and the base
`TrainConfig`. A method adds its own sections by subclassing `TrainConfig` (see `training/methods/`); YAML
recipes in `configs/` only override the defaults, and the key `method` (default `dinov2`) picks the subclass.

The defaults are the official DINOv2 default config (`ssl_default_config.yaml`); the `vitl14`/`vitg14` recipes
switch to the L/g numbers (METHOD.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class CropsConfig:
    global_size: int = 224
    local_size: int = 98  # 96 with patch 16; 98 = 7 patches of 14
    local_number: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    blur: str = "intended"  # intended (p 1.0 / 0.1 / 0.5) | official (the code's 0.0 / 0.9 / 0.5)
    horizontal_flip: bool = True
    # DINOv3 multi-resolution: each batch draws one [global_size, local_size, probability] row (all processes
    # alike); empty = the fixed global_size / local_size above. See configs/highres_multires.yaml.
    resolutions: list[tuple[int, int, float]] = field(default_factory=list)


@dataclass
class OptimConfig:
    batch_size: int = 64  # per process
    epochs: int = 100
    iters_per_epoch: int = 1250  # official OFFICIAL_EPOCH_LENGTH: schedules count these, not dataset passes
    base_lr: float = 4e-3  # scaled by sqrt(global batch / 1024)
    # cosine: official DINOv2 (linear warm-up 0 -> lr, cosine -> min_lr);
    # rise_hold: DINOv3 high-res adaptation (cosine rise 0 -> lr over warmup_epochs, then constant; min_lr unused)
    lr_schedule: Literal["cosine", "rise_hold"] = "cosine"
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0  # per student submodule (backbone, heads), as the official loop; 0 = off
    freeze_last_layer_epochs: int = 1
    grad_accum_steps: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    # The official code weight-decays cls/register/mask tokens and position embeddings; False excludes them.
    decay_tokens: bool = True


@dataclass
class DataConfig:
    dataset: str = "sample"  # "sample" | Hub id | image folder | save_to_disk dir | parquet | webdataset shards
    split: str = "train"
    image_column: str = "image"
    streaming: bool = False
    num_workers: int = 2
    eval_dataset: str | None = None  # labelled set for periodic kNN; "sample" uses the sample test split
    eval_train_split: str = "train"
    eval_split: str = "test"
    label_column: str = "label"


@dataclass
class RunConfig:
    output_dir: str | None = None  # None: outputs/<config name>
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp32 master weights)
    max_steps: int | None = None  # None: epochs * iters_per_epoch
    save_every: int = 1000
    keep_last: int = 2
    eval_every: int = 0  # 0 = off
    log_every: int = 10
    report_to: str = "none"  # none | all | tensorboard | wandb | trackio (comma-separated)
    resume: str = "auto"  # auto (latest complete checkpoint) | never | PATH
    max_nonfinite: int = 10  # abort (with a checkpoint) after this many non-finite steps in a row


@dataclass
class HubConfig:
    push: bool = False
    model_id: str | None = None
    private: bool = False


@dataclass
class TrainConfig:
    """The shared sections. Methods subclass this with their own sections (`training.methods`)."""

    method: str = "dinov2"  # which pretraining method (model family); see training/methods/
    crops: CropsConfig = field(default_factory=CropsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: RunConfig = field(default_factory=RunConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    config_name: str = "default"  # set from the YAML file name; names the default output directory

    @property
    def output_dir(self) -> str:
        return self.train.output_dir or f"outputs/{self.config_name}"

    @property
    def total_steps(self) -> int:
        return self.train.max_steps if self.train.max_steps is not None else self.optim.epochs * self.optim.iters_per_epoch
