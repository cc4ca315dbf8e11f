"""The method protocol: what the shared training loop needs from a pretraining model.

A *method* (DINOv2, distillation, MoCo v3, ...) is a `PreTrainedModel` that also inherits `PretrainingMethod`.
The loop (`training/loop.py`) names no method; it only calls the hooks below. docs/adding_a_method.md walks
through the protocol with `DinoForPretraining` as the worked example.

- `forward(**batch, **schedule_values)` → a `ModelOutput` whose `loss` is optimised; every other scalar field is
  averaged over processes and logged to `metrics.jsonl` and the trackers under its own name.
- State (centers, queues, momentum encoders, running statistics) lives in parameters and buffers, so
  checkpoints, resume and DDP/FSDP carry it with no special code.
- `data_pipeline()` names the batches the model takes (built by `training.pipelines`).
- `trainable_parts()` are the modules the optimizer trains (one gradient-clipping group each).
- `after_optimizer_step(**schedule_values)` runs after each optimizer step (EMA / momentum updates).
- `step_state()` lists the tensors `forward` changes outside autograd, restored when a step is skipped.
- `exports()` says what a run writes out: `backbone*` entries become stock-loadable folders.
- `health(metrics)` turns the logged values into collapse warnings.
- `model_card_rows(config)` describes the method's settings in the exported backbones' model cards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class DataPipeline:
    """Which batches a method takes: a pipeline name registered in `training.pipelines` and options that only
    the model knows (e.g. its patch size, whether it needs iBOT masks).

    Pipelines: `"multicrop"` (global + local crops, optional block masks; options `patch_size`, `masks`) and
    `"two_views"` (two asymmetrically augmented views; option `patch_size` for ViTs).
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)


class PretrainingMethod:
    """Mixin for the pretraining models the shared loop trains. Defaults suit a method with no EMA, no state
    and one trainable module; override what differs."""

    def data_pipeline(self) -> DataPipeline:
        raise NotImplementedError(f"{type(self).__name__} must say which data pipeline it takes (data_pipeline())")

    def trainable_parts(self) -> dict[str, nn.Module]:
        """Modules the optimizer trains, by name. The loop builds parameter groups per part (layer-wise decay for
        parts with `blocks`) and clips each part's gradients separately, as the official DINOv2 loop does."""
        return {"model": self}

    def after_optimizer_step(self, **schedule_values: float) -> None:
        """Called after every optimizer step with this step's schedule values (e.g. `momentum`)."""

    def step_state(self) -> list[torch.Tensor]:
        """Tensors that `forward` updates in place (not through the optimizer). When a step turns out non-finite,
        the loop restores them, so the state never learns from NaNs. Default: every buffer."""
        return list(self.buffers())

    def exports(self) -> dict[str, nn.Module]:
        """What the run exports, by folder name: `backbone` (or `backbone/<name>` for several) is the stock-loadable
        model that evaluation also uses; other entries (e.g. `pretraining`, the full model to continue from) are
        saved with `save_pretrained`."""
        raise NotImplementedError(f"{type(self).__name__} must say what to export (exports())")

    def health(self, metrics: dict[str, float]) -> list[str]:
        """Collapse warnings for one logged row of metrics (empty when healthy)."""
        return []

    def model_card_rows(self, config: dict[str, Any]) -> dict[str, str]:
        """Rows (label → value) of the model card's Training table; `config` is the run's resolved config."""
        return {}
