"""DenseCL pretraining model (Wang et al. 2021; WXinlong/DenseCL `openselfsup/models/densecl.py`, `necks.py`,
`heads/contrastive_head.py`).

A query encoder (backbone + neck) sees view 1, a momentum key encoder view 2. The neck has a global branch
(average pool → fc-ReLU-fc) and a dense branch (1×1 conv-ReLU-conv on the feature map). The loss is
`(1 - λ) · global + λ · dense` InfoNCE (`modeling.losses.densecl_loss`): global keys against a queue of past
global keys, and every query location against the key location whose *backbone* feature is most similar, with a
second queue (of pooled dense keys) as negatives.

ViT variant: the feature map is the grid of final-normed patch tokens, and the global branch reads the CLS token
(what kNN and linear probes evaluate) instead of an average pool.

Queues and their pointers are buffers, so checkpoints carry them. The keys of a step are gathered from every
process in `forward` but enqueued only in `after_optimizer_step`: a step the loop skips (non-finite loss) never
reaches the queues, and the loop's per-micro-batch `step_state()` copy stays small (it excludes the 2 × 32 MiB
queues; a counter of pending key batches, which it does include, tells `forward` which keys to drop after a skip).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .losses import densecl_loss
from .method import PretrainingMethod
from .two_view import (
    BackboneConfig,
    TwoViewPreTrainedModel,
    TwoViewPretrainingConfig,
    backbone_dim,
    build_backbone,
    copy_weights_,
    features_and_map,
    has_batch_norm,
    l2_normalized_std,
    momentum_update_,
    shuffled_forward,
    torch_default_init_,
)

_QUEUES = ("queue", "dense_queue")


class DenseCLConfig(TwoViewPretrainingConfig):
    """Backbone + neck sizes + queue length + temperature + dense loss weight λ (the reference's ImageNet
    config: 2048 → 2048 → 128, 65,536 keys, τ 0.2, λ 0.5; plain BatchNorm, no zero-initialised residuals)."""

    model_type = "dinoforge_densecl"

    def __init__(
        self,
        backbone_config: BackboneConfig | dict | None = None,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        queue_size: int = 65536,
        loss_temperature: float = 0.2,
        dense_weight: float = 0.5,
        zero_init_residual: bool = False,
        collapse_threshold: float = 0.05,
        **kwargs,
    ):
        if queue_size < 1 or loss_temperature <= 0 or not 0 <= dense_weight <= 1:
            raise ValueError(f"need queue_size >= 1, loss_temperature > 0, 0 <= dense_weight <= 1; got "
                             f"{queue_size}, {loss_temperature}, {dense_weight}")
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        self.queue_size = queue_size
        self.loss_temperature = loss_temperature
        self.dense_weight = dense_weight
        self.collapse_threshold = collapse_threshold
        super().__init__(backbone_config=backbone_config, zero_init_residual=zero_init_residual, **kwargs)


class DenseCLNeck(nn.Module):
    """The reference's `DenseCLNeck`: `global_mlp` (fc-ReLU-fc) on the global feature, `dense_mlp` (1×1
    conv-ReLU-conv) on the feature map. Returns (global `[B, out]`, grid `[B, out, S]`, pooled grid `[B, out]`)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.global_mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, out_dim))
        self.dense_mlp = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True),
                                       nn.Conv2d(hidden_dim, out_dim, 1))

    def forward(self, pooled: torch.Tensor, feature_map: torch.Tensor) -> tuple[torch.Tensor, ...]:
        grid = self.dense_mlp(feature_map).flatten(2)
        return self.global_mlp(pooled), grid, grid.mean(2)


@dataclass
class DenseCLOutput(ModelOutput):
    """Both terms weighted as they enter `loss`; `key_std` is the spread of the global keys over the batch
    (`l2_normalized_std`, 0 = collapsed)."""

    loss: torch.Tensor | None = None
    global_loss: torch.Tensor | None = None
    dense_loss: torch.Tensor | None = None
    key_std: torch.Tensor | None = None


class DenseCLForPretraining(TwoViewPreTrainedModel, PretrainingMethod):
    """`backbone` + `neck` (queries, trained), `key_backbone` + `key_neck` (momentum copy), queues `queue` /
    `dense_queue` `[out_dim, queue_size]` of normalised keys with pointers `queue_ptr` / `dense_queue_ptr`."""

    config_class = DenseCLConfig
    config: DenseCLConfig
    base_model_prefix = "densecl"

    def __init__(self, config: DenseCLConfig):
        super().__init__(config)
        dim = backbone_dim(config.backbone_config)
        self.backbone = build_backbone(config.backbone_config)
        self.neck = DenseCLNeck(dim, config.hidden_dim, config.out_dim)
        self.key_backbone = build_backbone(config.backbone_config)
        self.key_neck = DenseCLNeck(dim, config.hidden_dim, config.out_dim)
        for name in _QUEUES:  # random unit vectors until real keys replace them, as in the reference
            self.register_buffer(name, F.normalize(torch.randn(config.out_dim, config.queue_size), dim=0))
            self.register_buffer(f"{name}_ptr", torch.zeros(1, dtype=torch.long))
        # Key batches gathered by `forward` and not yet enqueued (always 0 in a checkpoint: see the module doc).
        self.register_buffer("pending_key_batches", torch.zeros(1, dtype=torch.long))
        self._pending_keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.post_init()
        self._start_backbone_(self.backbone)
        copy_weights_(self.key_backbone, self.backbone)
        copy_weights_(self.key_neck, self.neck)
        self._freeze_()

    def _freeze_(self) -> None:
        self.key_backbone.requires_grad_(False)
        self.key_neck.requires_grad_(False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):  # the reference's neck init ('kaiming'); its convs keep PyTorch's
            init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            init.zeros_(module.bias)
        else:
            torch_default_init_(module)

    def _keys(self, view: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(global key, key grid, pooled key grid, backbone feature map `[B, C', S]`) of the key encoder."""
        pooled, feature_map = features_and_map(self.key_backbone, view)
        k, k_grid, k_pooled_grid = self.key_neck(pooled, feature_map)
        return k, k_grid, k_pooled_grid, feature_map.flatten(2)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, dense_weight: float | None = None,
                **_: float) -> DenseCLOutput:
        """`view1` (queries) and `view2` (keys) `[B, 3, H, W]`: two augmented views of the same B images.
        `dense_weight` (λ, default the config's) comes from the method's schedule (optional warm-up)."""
        lam = self.config.dense_weight if dense_weight is None else dense_weight
        pooled, feature_map = features_and_map(self.backbone, view1)
        q, q_grid, _ = self.neck(pooled, feature_map)
        with torch.no_grad():
            # Shuffle BN (as the reference): a key encoder with BatchNorm computes its batch statistics over a
            # random mix of all processes' images, so they cannot leak which query matches which key.
            shuffle = self.training and has_batch_norm(self.key_backbone)
            k, k_grid, k_pooled_grid, k_map = shuffled_forward(self._keys, view2) if shuffle else self._keys(view2)
        global_loss, dense_loss = densecl_loss(q, k, self.queue, q_grid, k_grid, feature_map.flatten(2), k_map,
                                               self.dense_queue, self.config.loss_temperature)
        if self.training:
            self._stash_keys(F.normalize(k, dim=1), F.normalize(k_pooled_grid, dim=1))
        global_term, dense_term = (1 - lam) * global_loss, lam * dense_loss
        return DenseCLOutput(loss=global_term + dense_term, global_loss=global_term, dense_loss=dense_term,
                             key_std=l2_normalized_std(k))

    # ---- queues

    @torch.no_grad()
    def _stash_keys(self, keys: torch.Tensor, dense_keys: torch.Tensor) -> None:
        from .losses import gather_rows

        # The loop restores `pending_key_batches` when it skips a step: drop the keys of the skipped micro-batches.
        del self._pending_keys[int(self.pending_key_batches) :]
        self._pending_keys.append((gather_rows(keys)[0], gather_rows(dense_keys)[0]))
        self.pending_key_batches += 1

    @torch.no_grad()
    def enqueue_pending_keys(self) -> None:
        for keys, dense_keys in self._pending_keys[: int(self.pending_key_batches)]:
            _enqueue_(self.queue, self.queue_ptr, keys)
            _enqueue_(self.dense_queue, self.dense_queue_ptr, dense_keys)
        self._pending_keys.clear()
        self.pending_key_batches.zero_()

    # ---- the method protocol (modeling/method.py)

    def trainable_parts(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "neck": self.neck}

    @torch.no_grad()
    def after_optimizer_step(self, momentum: float = 0.999, **_: float) -> None:
        """Momentum update of the key encoder (the reference does it at the start of the next forward: the same),
        then this step's keys enter the queues."""
        momentum_update_(self.key_backbone, self.backbone, momentum)
        momentum_update_(self.key_neck, self.neck, momentum)
        self.enqueue_pending_keys()

    def step_state(self) -> list[torch.Tensor]:
        """Every buffer but the queues (which `forward` never changes): BatchNorm statistics, pointers and the
        pending-keys counter."""
        return [b for name, b in self.named_buffers() if name not in _QUEUES]

    def health(self, metrics: dict[str, float]) -> list[str]:
        if metrics.get("key_std", 1.0) < self.config.collapse_threshold:
            return [f"collapse: the global keys of all images are nearly the same vector (key_std "
                    f"{metrics['key_std']:.3g} < {self.config.collapse_threshold})"]
        return []

    def model_card_rows(self, config: dict[str, Any]) -> dict[str, str]:
        c = self.config
        rows = self._backbone_rows()
        rows["neck"] = f"global fc-ReLU-fc + dense 1×1 conv-ReLU-conv, {c.hidden_dim} → {c.out_dim}"
        rows["loss"] = (f"(1 − λ)·global + λ·dense InfoNCE, λ {c.dense_weight}, τ {c.loss_temperature}, two "
                        f"queues of {c.queue_size} keys")
        section = config.get("densecl") or {}
        if section:
            rows["key encoder momentum"] = str(section.get("momentum"))
        return rows

    def load_backbone_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Start both encoders' backbones from one backbone's weights (`model.init_from`)."""
        self.backbone.load_state_dict(state_dict)
        self.key_backbone.load_state_dict(state_dict)


@torch.no_grad()
def _enqueue_(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """Write `keys` `[n, C]` as columns from `ptr` on, wrapping around (the reference requires the queue length
    to be a multiple of the global batch; here any sizes work, and with more keys than slots the newest win)."""
    size, n, start = queue.shape[1], keys.shape[0], int(ptr)
    rows = torch.arange(max(0, n - size), n, device=queue.device)
    queue[:, (start + rows) % size] = keys[rows].T.to(queue.dtype)
    ptr[0] = (start + n) % size
