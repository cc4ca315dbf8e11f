"""Typed defaults of the sections every method shares (`crops`, `optim`, `data`, `train`, `hub`) and the base
`TrainConfig`. A method adds its own sections by subclassing `TrainConfig` (see `training/methods/`); YAML
recipes in `configs/` only override the defaults, and the key `method` (default `dinov2`) picks the subclass.

The defaults are the official DINOv2 default config (`ssl_default_config.yaml`); the `vitl14`/`vitg14` recipes
switch to the L/g numbers (METHOD.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .config import check


def _resolution_rows(rows: list[tuple[int, int, float]]) -> str | None:
    if not rows:
        return None
    if any(g < 1 or lo < 1 or not 0 <= p <= 1 for g, lo, p in rows):
        return "out of range: allowed [global_size >= 1, local_size >= 1, probability in [0, 1]] rows"
    if abs(sum(p for _, _, p in rows) - 1.0) > 1e-6:
        return "out of range: the probabilities must sum to 1"
    return None


@dataclass
class CropsConfig:
    global_size: int = field(default=224, metadata=check(ge=1))
    local_size: int = field(default=98, metadata=check(ge=1))  # 96 with patch 16; 98 = 7 patches of 14
    local_number: int = field(default=8, metadata=check(ge=0))
    global_scale: tuple[float, float] = field(default=(0.32, 1.0), metadata=check(gt=0, le=1, ordered=True))
    local_scale: tuple[float, float] = field(default=(0.05, 0.32), metadata=check(gt=0, le=1, ordered=True))
    # intended (p 1.0 / 0.1 / 0.5) | official (the code's 0.0 / 0.9 / 0.5)
    blur: str = field(default="intended", metadata=check(choices=("intended", "official")))
    horizontal_flip: bool = True
    # colour jitter's hue range (official 0.1 = ±36°; 0.5 = any hue): 0.5 when colour is a nuisance for the content
    hue: float = field(default=0.1, metadata=check(ge=0, le=0.5))
    # DINOv3 multi-resolution: each batch draws one [global_size, local_size, probability] row (all processes
    # alike); empty = the fixed global_size / local_size above. See configs/highres_multires.yaml.
    resolutions: list[tuple[int, int, float]] = field(default_factory=list, metadata=check(rule=_resolution_rows))


@dataclass
class OptimConfig:
    batch_size: int = field(default=64, metadata=check(ge=1))  # per process
    epochs: int = field(default=100, metadata=check(ge=1))
    # official OFFICIAL_EPOCH_LENGTH: schedules count these, not dataset passes
    iters_per_epoch: int = field(default=1250, metadata=check(ge=1))
    base_lr: float = field(default=4e-3, metadata=check(ge=0))  # scaled by `lr_scaling`
    # sqrt_1024: lr = base_lr * sqrt(global batch / 1024) (DINOv2); linear_256: base_lr * global batch / 256 (MoCo v3,
    # SimCLR-style recipes)
    lr_scaling: Literal["sqrt_1024", "linear_256"] = "sqrt_1024"
    # cosine: official DINOv2 (linear warm-up 0 -> lr, cosine -> min_lr);
    # rise_hold: DINOv3 high-res adaptation (cosine rise 0 -> lr over warmup_epochs, then constant; min_lr unused)
    lr_schedule: Literal["cosine", "rise_hold"] = "cosine"
    min_lr: float = field(default=1e-6, metadata=check(ge=0))
    warmup_epochs: int = field(default=10, metadata=check(ge=0))
    weight_decay: float = field(default=0.04, metadata=check(ge=0))
    weight_decay_end: float = field(default=0.4, metadata=check(ge=0))
    layerwise_decay: float = field(default=0.9, metadata=check(gt=0, le=1))
    patch_embed_lr_mult: float = field(default=0.2, metadata=check(ge=0))
    # per student submodule (backbone, heads), as the official loop; 0 = off
    clip_grad: float = field(default=3.0, metadata=check(ge=0))
    freeze_last_layer_epochs: int = field(default=1, metadata=check(ge=0))
    grad_accum_steps: int = field(default=1, metadata=check(ge=1))
    optimizer: str = field(default="adamw", metadata=check(choices=("adamw", "sgd", "lars")))  # training/optimizers.py
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=check(ge=0, lt=1))  # adamw
    momentum: float = field(default=0.9, metadata=check(ge=0, lt=1))  # sgd / lars
    lars_eta: float = field(default=0.001, metadata=check(gt=0))  # lars trust coefficient
    # lr multiplier of biases and norm weights (Barlow Twins' LARS: 0.0048 / 0.2 = 0.024)
    bias_norm_lr_mult: float = field(default=1.0, metadata=check(ge=0))
    # true: weight decay on every parameter (MoCo v3, DenseCL); false: none on biases / norms / LayerScale
    decay_biases_and_norms: bool = False
    # The official code weight-decays cls/register/mask tokens and position embeddings; False excludes them.
    decay_tokens: bool = True


@dataclass
class DataConfig:
    dataset: str = "sample"  # "sample" | Hub id | image folder | save_to_disk dir | parquet | webdataset shards
    split: str = "train"
    image_column: str = "image"
    streaming: bool = False
    num_workers: int = field(default=2, metadata=check(ge=0))
    eval_dataset: str | None = None  # labelled set for periodic kNN; "sample" uses the sample test split
    eval_train_split: str = "train"
    eval_split: str = "test"
    label_column: str = "label"
    # Rows whose image is only a path (no bytes) are opened only for a local folder the user points at, or with this.
    allow_local_paths: bool = False
    # streamed sources: examples in the shuffle buffer (0: stream order)
    shuffle_buffer: int = field(default=1000, metadata=check(ge=0))
    # Decoded images kept in memory, per data process, up to this many MiB (map-style sets; 0: off): a small set read
    # hundreds of times skips file reading and decoding after its first pass (800 64-px PNGs: ~10 MiB)
    decoded_cache_mb: float = field(default=0.0, metadata=check(ge=0))
    # Stop when more than this share of the images of the last `skip_window` (all processes together) failed to
    # decode; a whole window of batches with nothing decodable, or an epoch without one usable batch, also stops
    # the run (training.data_guard). 1.0: never stop for the share.
    max_skipped_fraction: float = field(default=0.5, metadata=check(ge=0, le=1))
    skip_window: int = field(default=1000, metadata=check(ge=1))


@dataclass
class RunConfig:
    output_dir: str | None = None  # None: outputs/<config name>
    seed: int = field(default=0, metadata=check(ge=0, lt=2**32))  # numpy's seed range
    # no | bf16 | fp16 (fp32 master weights) | fp8 (needs Accelerate's fp8 back-ends)
    mixed_precision: str = field(default="no", metadata=check(choices=("no", "bf16", "fp16", "fp8")))
    max_steps: int | None = field(default=None, metadata=check(ge=1))  # None: epochs * iters_per_epoch
    save_every: int = field(default=1000, metadata=check(ge=0))  # 0: only at the end
    keep_last: int = field(default=2, metadata=check(ge=1))  # newest checkpoints kept
    eval_every: int = field(default=0, metadata=check(ge=0))  # 0 = off
    # CPU only: torch threads per process; 0 = its share of the cores minus the data workers (OMP_NUM_THREADS,
    # when set, wins). More threads than that pays when the model's step outweighs the workers' (small images).
    cpu_threads: int = field(default=0, metadata=check(ge=0))
    log_every: int = field(default=10, metadata=check(ge=1))
    report_to: str = "none"  # none | all | tensorboard | wandb | trackio (comma-separated)
    resume: str = "auto"  # auto (latest complete checkpoint) | never | PATH
    # abort (with a checkpoint) after this many non-finite steps in a row
    max_nonfinite: int = field(default=10, metadata=check(ge=1))


@dataclass
class HubConfig:
    push: bool = False
    model_id: str | None = None
    private: bool = False
    # An existing repo whose visibility differs from `private`: false refuses to push a private run into a public
    # repo (a public repo stays public); true changes the repo's visibility to `private` first.
    update_visibility: bool = False


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
