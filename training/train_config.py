"""Typed defaults of `train.py` (one dataclass per section). YAML recipes in `configs/` only override them.

The defaults are the official DINOv2 default config (`ssl_default_config.yaml`) with a ViT-S/14 backbone; the
`vitl14`/`vitg14` recipes switch to the L/g numbers (METHOD.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    preset: str = "vits14"  # vits14 | vitb14 | vitl14 | vitg14
    num_register_tokens: int = 0
    drop_path_rate: float | None = None  # None: the preset's (0.3 S/B, 0.4 L/g)
    # Size overrides (None: the preset's) - the quickstart uses a tiny ViT.
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    ffn: str | None = None  # mlp | swiglu
    layerscale_init: float | None = None  # None: the official 1e-5
    image_size: int | None = None  # position-embedding grid; None: crops.global_size
    # Start from existing weights: a Hub id or folder of a stock transformers DINOv2, one of our exports,
    # an official-format state dict file (.pth/.safetensors), or our `pretraining/` folder (keeps heads+centers).
    init_from: str | None = None
    head_warmup_steps: int = 0  # with init_from: train only the heads (backbone frozen) for this many steps
    gradient_checkpointing: bool = False
    compile: bool = False


@dataclass
class HeadsConfig:
    num_prototypes: int = 65536
    bottleneck_dim: int = 256
    hidden_dim: int = 2048
    nlayers: int = 3
    separate_ibot_head: bool = False
    ibot_num_prototypes: int | None = None  # None: num_prototypes
    ibot_bottleneck_dim: int | None = None  # None: bottleneck_dim
    ibot_hidden_dim: int | None = None  # None: hidden_dim


@dataclass
class LossConfig:
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: str = "softmax"  # softmax (official default config) | sinkhorn_knopp (L/g recipes)
    student_temp: float = 0.1
    center_momentum: float = 0.9


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
class MaskingConfig:
    ratio_min_max: tuple[float, float] = (0.1, 0.5)
    sample_probability: float = 0.5


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
class TeacherConfig:
    momentum: float = 0.992
    momentum_end: float = 1.0
    temp: float = 0.07
    temp_warmup: float = 0.04
    temp_warmup_epochs: int = 30


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
    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
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
