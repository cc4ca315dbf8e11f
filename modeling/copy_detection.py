"""Copy-detection descriptor training, the SSCD recipe (Pizzi et al. 2022, "A Self-Supervised Descriptor for Image
Copy Detection"), written from the paper.

A backbone (transformers' `ResNetModel`, as the paper, or our ViT) → pooling (GeM with p = 3 over the ResNet's last
feature map; the ViT's final-normed CLS token) → a linear projection to a compact descriptor → L2 normalisation.
Training: InfoNCE between two strongly edited views of every image, with every other view of the global batch as
a negative (`modeling.losses.copy_detection_infonce_loss`), plus a KoLeo (differential-entropy) term that spreads
the descriptors over the sphere (`koleo_loss`, per view, so an image's other view is never its nearest neighbour).
Batches come from the `copy_edits` pipeline (`training/data/copy_edits.py`).

Export: `backbone/` is the stock backbone folder (a `ResNetModel`, or our ViT as a stock `Dinov2Model`) plus the
descriptor head beside it, `copy_descriptor.json` (pooling, dimensions) + `copy_descriptor.safetensors` (the
projection). `AutoModel.from_pretrained` ignores the two files; `load_copy_descriptor(folder)` reads them back and
`CopyDescriptorHead(backbone_output)` turns any stock backbone output into the descriptor (curation's embedder
does this whenever a model folder carries the head).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .losses import copy_detection_infonce_loss, koleo_loss
from .method import DataPipeline, PretrainingMethod
from .two_view import (
    BackboneConfig,
    TwoViewPreTrainedModel,
    TwoViewPretrainingConfig,
    backbone_dim,
    build_backbone,
    has_batch_norm,
    is_convnet,
    l2_normalized_std,
)

DESCRIPTOR_CONFIG = "copy_descriptor.json"
DESCRIPTOR_WEIGHTS = "copy_descriptor.safetensors"
DESCRIPTOR_FORMAT = "dinoforge-copy-descriptor"


def gem(feature_map: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling `[B, C, h, w] -> [B, C]`: `(mean x^p)^(1/p)` over positions (x clamped to eps;
    p = 1 is average pooling, p → ∞ max pooling). SSCD uses p = 3."""
    x = feature_map.float().clamp(min=eps).pow(p)
    return x.mean(dim=(-2, -1)).pow(1.0 / p)


class CopyDescriptorHead(nn.Module):
    """Pooling + projection + L2 normalisation on top of a backbone's output (ours or the stock exported one).

    `pooling="gem"` reads `last_hidden_state` as a `[B, C, h, w]` map (ResNet); `"cls"` reads `pooler_output`
    (the ViT's final-normed CLS token)."""

    def __init__(self, in_dim: int, dim: int, pooling: str = "gem", gem_p: float = 3.0) -> None:
        super().__init__()
        if pooling not in ("gem", "cls"):
            raise ValueError(f"descriptor pooling must be 'gem' or 'cls', got {pooling!r}")
        self.in_dim, self.dim, self.pooling, self.gem_p = in_dim, dim, pooling, gem_p
        self.projection = nn.Linear(in_dim, dim)

    def pool(self, output: Any) -> torch.Tensor:
        if self.pooling == "gem":
            feature_map = output.last_hidden_state
            if feature_map.ndim != 4:
                raise ValueError("GeM pooling needs a [B, C, h, w] feature map (a ConvNet backbone); use 'cls' "
                                 "for a ViT")
            return gem(feature_map, self.gem_p)
        return output.pooler_output.flatten(1)

    def forward(self, output: Any, normalize: bool = True) -> torch.Tensor:
        """Descriptors `[B, dim]` of a backbone output (L2-normalised unless `normalize=False`)."""
        z = self.projection(self.pool(output).to(self.projection.weight.dtype))
        return F.normalize(z, dim=-1) if normalize else z

    def spec(self) -> dict[str, Any]:
        return {"format": DESCRIPTOR_FORMAT, "version": 1, "pooling": self.pooling, "gem_p": self.gem_p,
                "in_dim": self.in_dim, "dim": self.dim, "normalize": True, "weights": DESCRIPTOR_WEIGHTS}

    def save(self, folder: str | Path) -> None:
        """Write the head beside a backbone folder (json + safetensors; the backbone's own files untouched)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / DESCRIPTOR_WEIGHTS))
        (folder / DESCRIPTOR_CONFIG).write_text(json.dumps(self.spec(), indent=2) + "\n")


def load_copy_descriptor(folder: str | Path) -> CopyDescriptorHead | None:
    """The descriptor head saved beside a backbone folder, or None when the folder has none."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / DESCRIPTOR_CONFIG).is_file():
        return None
    spec = json.loads((folder / DESCRIPTOR_CONFIG).read_text())
    if spec.get("format") != DESCRIPTOR_FORMAT:
        raise ValueError(f"{folder / DESCRIPTOR_CONFIG} is not a {DESCRIPTOR_FORMAT} file")
    head = CopyDescriptorHead(int(spec["in_dim"]), int(spec["dim"]), spec["pooling"], float(spec["gem_p"]))
    head.load_state_dict(load_file(str(folder / spec.get("weights", DESCRIPTOR_WEIGHTS))))
    return head.eval()


def copy_image_processor(size: int):
    """Stock `ViTImageProcessor`: resize to `size` x `size` (bilinear), ImageNet mean / std."""
    from transformers import ViTImageProcessor

    from .convert import IMAGENET_MEAN, IMAGENET_STD

    return ViTImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=2, do_rescale=True,
                             rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                             image_std=list(IMAGENET_STD))


class CopyDetectionConfig(TwoViewPretrainingConfig):
    """Backbone config + descriptor head (`descriptor_dim`, `pooling`, `gem_p`) + loss (`loss_temperature`,
    `koleo_weight`). Defaults: the paper's ResNet-50 recipe (512-d descriptor, GeM p = 3, τ 0.05, λ 30)."""

    model_type = "dinoforge_copy_detection"

    def __init__(
        self,
        backbone_config: BackboneConfig | dict | None = None,
        descriptor_dim: int = 512,
        pooling: str | None = None,
        gem_p: float = 3.0,
        loss_temperature: float = 0.05,
        koleo_weight: float = 30.0,
        image_size: int = 224,
        collapse_threshold: float = 0.05,
        zero_init_residual: bool = False,
        **kwargs,
    ):
        self.descriptor_dim = descriptor_dim
        self.gem_p = gem_p
        self.loss_temperature = loss_temperature
        self.koleo_weight = koleo_weight
        self.image_size = image_size  # the training view size: the exported image processor resizes to it
        self.collapse_threshold = collapse_threshold
        super().__init__(backbone_config=backbone_config, zero_init_residual=zero_init_residual, **kwargs)
        # GeM needs a spatial map: ConvNets pool with it, ViTs use their CLS token.
        self.pooling = pooling or ("gem" if is_convnet(self.backbone_config) else "cls")


@dataclass
class CopyDetectionOutput(ModelOutput):
    """`positive_similarity`: mean cosine of the two views of an image; `hardest_negative`: mean over rows of the
    largest cosine to another image's view 2; `descriptor_std`: spread of the descriptors (≈ 1 spread, 0
    collapsed)."""

    loss: torch.Tensor | None = None
    infonce_loss: torch.Tensor | None = None
    koleo_loss: torch.Tensor | None = None
    positive_similarity: torch.Tensor | None = None
    hardest_negative: torch.Tensor | None = None
    descriptor_std: torch.Tensor | None = None


class CopyDetectionForPretraining(TwoViewPreTrainedModel, PretrainingMethod):
    """`backbone` → `descriptor` (pooling + projection + L2 norm), trained on `view1`, `view2` of `copy_edits`."""

    config_class = CopyDetectionConfig
    config: CopyDetectionConfig
    base_model_prefix = "copy_detection"

    def __init__(self, config: CopyDetectionConfig):
        super().__init__(config)
        self.backbone = build_backbone(config.backbone_config)
        self.descriptor = CopyDescriptorHead(backbone_dim(config.backbone_config), config.descriptor_dim,
                                             config.pooling, config.gem_p)
        self.post_init()
        self._start_backbone_(self.backbone)

    def describe(self, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Descriptors `[B, descriptor_dim]` of a batch of images."""
        return self.descriptor(self.backbone(pixel_values=pixel_values), normalize=normalize)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, **_: float) -> CopyDetectionOutput:
        """`view1`, `view2` `[B, 3, H, W]`: two independently edited copies of the same B images."""
        if has_batch_norm(self.backbone):  # per-view BatchNorm statistics, as the two-view methods
            z1, z2 = self.describe(view1, normalize=False), self.describe(view2, normalize=False)
        else:
            z1, z2 = self.describe(torch.cat((view1, view2)), normalize=False).chunk(2)
        c = self.config
        infonce = copy_detection_infonce_loss(z1, z2, c.loss_temperature)
        koleo = 0.5 * (koleo_loss(z1) + koleo_loss(z2)) if len(z1) > 1 else infonce.new_zeros(())
        with torch.no_grad():
            n1, n2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
            sims = n1 @ n2.T
            positive = sims.diagonal().mean()
            hardest = sims.fill_diagonal_(-2.0).max(dim=1).values.mean() if len(sims) > 1 else positive.new_zeros(())
            std = l2_normalized_std(torch.cat((z1, z2)))
        return CopyDetectionOutput(loss=infonce + c.koleo_weight * koleo, infonce_loss=infonce, koleo_loss=koleo,
                                   positive_similarity=positive, hardest_negative=hardest, descriptor_std=std)

    # ---- the method protocol (modeling/method.py)

    def data_pipeline(self) -> DataPipeline:
        config = self.config.backbone_config
        return DataPipeline("copy_edits", {"patch_size": None if is_convnet(config) else config.patch_size})

    def trainable_parts(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "descriptor": self.descriptor}

    def export_extras(self, name: str, folder: Path) -> None:
        """The descriptor head beside the exported backbone, so curation embeds with the trained descriptor, and an
        image processor that squashes to the training view size (no centre crop, which would cut off borders and
        overlays: the views were squashed squares too)."""
        if name == "backbone":
            self.descriptor.save(folder)
            copy_image_processor(self.config.image_size).save_pretrained(folder)

    def health(self, metrics: dict[str, float]) -> list[str]:
        if metrics.get("descriptor_std", 1.0) < self.config.collapse_threshold:
            return [f"collapse: the descriptors of all images are nearly the same vector (descriptor_std "
                    f"{metrics['descriptor_std']:.3g} < {self.config.collapse_threshold}); raise "
                    f"copy_detection.koleo_weight or lower the lr"]
        return []

    def model_card_rows(self, config: dict[str, Any]) -> dict[str, str]:
        c = self.config
        rows = self._backbone_rows()
        pooling = f"GeM p={c.gem_p}" if c.pooling == "gem" else "CLS token"
        rows["descriptor"] = (f"{pooling} → linear → {c.descriptor_dim}-d, L2-normalised (`{DESCRIPTOR_CONFIG}` + "
                              f"`{DESCRIPTOR_WEIGHTS}` beside the backbone; curation's embedder applies them)")
        rows["loss"] = f"InfoNCE over both views of the global batch, τ {c.loss_temperature} + {c.koleo_weight} × KoLeo"
        return rows

    def load_backbone_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.backbone.load_state_dict(state_dict)
