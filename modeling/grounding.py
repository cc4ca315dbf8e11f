"""Grounding (`method: grounding`): open-vocabulary detection with a dinoforge backbone inside transformers'
`GroundingDinoForObjectDetection` (Liu et al. 2023).

`GroundingDinoConfig` accepts any backbone config; with `Dinov2Config(out_indices=[...])` it builds a
`Dinov2Backbone` whose feature maps are the (final-normed) patch tokens of several blocks, all at stride 14 — a
plain ViT has one stride, so the levels come from depth, and Grounding DINO's own stride-2 convolutions add the
coarser ones (`num_feature_levels` = blocks + extra levels). transformers builds that backbone at random:
`load_backbone_weights` puts our weights in. The backbone is frozen or fine-tuned (`freeze_backbone`).

The loss is the model's own (Hungarian matching; focal classification against the phrase tokens, L1 + GIoU boxes;
on the decoder output and, with `two_stage`, the encoder proposals). It finds the phrases of a prompt through the
tokenizer's "." id (Grounding DINO's `SPECIAL_TOKENS`: `[CLS]` 101, `[SEP]` 102, "." 1012, "?" 1029), so prompts
are "."-separated phrases and tokenizers keep the `bert-base-uncased` ids (training/text_tokenizer.py does).

The export is the stock detector + tokenizer + `GroundingDinoImageProcessor`: `AutoModelForZeroShotObjectDetection`
and `pipeline("zero-shot-object-detection")` load it with transformers alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GroundingDinoConfig, GroundingDinoForObjectDetection, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .method import DataPipeline, PretrainingMethod


class GroundingConfig(PretrainedConfig):
    """The detector's `GroundingDinoConfig` + training options: frozen backbone, text length, where the tokenizer
    lives and the image processor (as a dict), so a checkpoint alone can be exported."""

    model_type = "dinoforge_grounding"
    sub_configs = {"detector_config": GroundingDinoConfig}

    def __init__(
        self,
        detector_config: GroundingDinoConfig | dict | None = None,
        freeze_backbone: bool = True,
        max_text_length: int = 64,
        tokenizer_name_or_path: str | None = None,
        image_processor: dict[str, Any] | None = None,
        **kwargs,
    ):
        if isinstance(detector_config, dict):
            detector_config = GroundingDinoConfig(**detector_config)
        self.detector_config = detector_config or GroundingDinoConfig()
        if self.detector_config.decoder_layers < 2:
            # transformers ties bbox_embed.{1..} to bbox_embed.0 by name: with one decoder layer the keys do not exist
            raise ValueError(f"GroundingDinoConfig.decoder_layers must be >= 2, got {self.detector_config.decoder_layers}")
        self.freeze_backbone = freeze_backbone
        self.max_text_length = max_text_length
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.image_processor = image_processor
        super().__init__(**kwargs)


@dataclass
class GroundingOutput(ModelOutput):
    """`loss` and its weighted parts as the model computes them (decoder and encoder-proposal terms together):
    `loss_ce` (focal, phrase tokens), `loss_bbox` (L1), `loss_giou`; `cardinality_error` (logged, not optimised)."""

    loss: torch.Tensor | None = None
    loss_ce: torch.Tensor | None = None
    loss_bbox: torch.Tensor | None = None
    loss_giou: torch.Tensor | None = None
    cardinality_error: torch.Tensor | None = None


def _move(labels: list[dict[str, torch.Tensor]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{k: v.to(device) for k, v in target.items()} for target in labels]


class GroundingForPretraining(PreTrainedModel, PretrainingMethod):
    """`detector`: the stock `GroundingDinoForObjectDetection` being trained. `tokenizer` / `image_processor` are
    attached by the builder (`training.methods.grounding`) or loaded from the config."""

    config_class = GroundingConfig
    config: GroundingConfig
    base_model_prefix = "grounding"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")

    def __init__(self, config: GroundingConfig):
        super().__init__(config)
        self.detector = GroundingDinoForObjectDetection(config.detector_config)
        self.tokenizer: Any = None
        self.image_processor: Any = None
        self.post_init()
        self._freeze_()

    def _init_weights(self, module: nn.Module) -> None:
        """The detector initialises its own modules."""

    @property
    def backbone(self) -> nn.Module:
        """The vision backbone inside the detector (a `Dinov2Backbone` for our ViTs)."""
        return self.detector.model.backbone.conv_encoder.model

    def _freeze_(self) -> None:
        if self.config.freeze_backbone:
            self.backbone.requires_grad_(False)
        d, model = self.config.detector_config, self.detector.model
        if d.two_stage:
            # transformers computes the encoder-proposal loss on detached proposals (`topk_coords_logits.detach()`,
            # `target.detach()`), so the proposal projection and (unless shared with the decoder) the proposal box
            # head get no gradient from the model's loss. Marked frozen so DDP does not wait for their gradients;
            # training is otherwise unchanged (they would never move).
            model.enc_output.requires_grad_(False)
            model.enc_output_norm.requires_grad_(False)
            if not d.two_stage_bbox_embed_share:
                model.encoder_output_bbox_embed.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model._freeze_()  # transformers re-creates parameters while loading, which drops requires_grad=False
        return model

    def train(self, mode: bool = True) -> GroundingForPretraining:
        super().train(mode)
        if self.config.freeze_backbone:
            self.backbone.eval()
        return self

    def load_backbone_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Our weights into the detector's backbone: a stock `Dinov2Model` state dict (the backbone has the same
        modules without the pooler); every backbone weight must be given."""
        missing, unexpected = self.backbone.load_state_dict(state_dict, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("pooler")]
        if missing or unexpected:
            raise ValueError(f"backbone weights do not fit the detector's backbone: missing {missing}, "
                             f"unexpected {unexpected}")
        self._freeze_()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: list[dict[str, torch.Tensor]],
        pixel_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **_: float,
    ) -> GroundingOutput:
        """A batch of images, each with its prompt ("."-separated phrases) and targets `{"class_labels": phrase
        index of each object, "boxes": [n, 4] normalised (cx, cy, w, h)}`."""
        out = self.detector(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                            pixel_mask=pixel_mask, token_type_ids=token_type_ids,
                            labels=_move(labels, pixel_values.device))
        parts = out.loss_dict
        weights = {"loss_ce": 2.0, "loss_bbox": self.config.detector_config.bbox_loss_coefficient,
                   "loss_giou": self.config.detector_config.giou_loss_coefficient}

        def weighted(name: str) -> torch.Tensor:  # decoder + encoder-proposal terms, as they enter the loss
            return sum(parts[k].detach() * w for k, w in ((name, weights[name]), (f"{name}_enc", weights[name]))
                       if k in parts)

        return GroundingOutput(loss=out.loss, loss_ce=weighted("loss_ce"), loss_bbox=weighted("loss_bbox"),
                               loss_giou=weighted("loss_giou"),
                               cardinality_error=parts.get("cardinality_error", torch.zeros(())).detach())

    # ---- the method protocol (modeling/method.py)

    def data_pipeline(self) -> DataPipeline:
        return DataPipeline("detection", {"tokenizer": self.get_tokenizer(), "image_processor": self.get_image_processor(),
                                          "max_length": self.config.max_text_length})

    def trainable_parts(self) -> dict[str, nn.Module]:
        """`backbone` (when fine-tuned, with its own lr multiplier: `lr_scale/backbone`) and `detector`: every other
        parameter of the detector (neck, encoder, decoder, text tower, heads, level embeddings)."""
        prefix = "model.backbone.conv_encoder.model."
        rest = {name: p for name, p in self.detector.named_parameters() if not name.startswith(prefix)}
        parts: dict[str, nn.Module] = {"detector": ParameterView(rest)}
        if not self.config.freeze_backbone:
            parts["backbone"] = self.backbone
        return parts

    def step_state(self) -> list[torch.Tensor]:
        return []

    def exports(self) -> dict[str, Any]:
        return {"detector": DetectorExport(self.detector, self.get_tokenizer(), self.get_image_processor())}

    def health(self, metrics: dict[str, float]) -> list[str]:
        return []

    def model_card_rows(self, config: dict[str, Any]) -> dict[str, str]:
        d = self.config.detector_config
        b = d.backbone_config
        return {
            "detector": f"Grounding DINO: d_model {d.d_model}, {d.encoder_layers} encoder / {d.decoder_layers} decoder "
                        f"layers, {d.num_queries} queries, {d.num_feature_levels} feature levels",
            "backbone": f"{b.model_type}, width {b.hidden_size}, {b.num_hidden_layers} blocks, features of blocks "
                        f"{list(getattr(b, 'out_indices', []))}, {'frozen' if self.config.freeze_backbone else 'fine-tuned'}",
            "text tower": f"{d.text_config.model_type}, {d.text_config.num_hidden_layers} layers, width "
                          f"{d.text_config.hidden_size}",
            "loss": "Grounding DINO's own (Hungarian matching, focal on phrase tokens, L1 + GIoU boxes, two-stage)",
        }

    # ---- tokenizer / image processor

    def get_tokenizer(self) -> Any:
        if self.tokenizer is None and self.config.tokenizer_name_or_path:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.config.tokenizer_name_or_path)
        if self.tokenizer is None:
            raise ValueError("this grounding model has no tokenizer: attach one or set config.tokenizer_name_or_path")
        return self.tokenizer

    def get_image_processor(self) -> Any:
        if self.image_processor is None and self.config.image_processor:
            from transformers import GroundingDinoImageProcessor

            values = {k: v for k, v in self.config.image_processor.items() if k != "image_processor_type"}
            self.image_processor = GroundingDinoImageProcessor(**values)
        if self.image_processor is None:
            raise ValueError("this grounding model has no image processor: attach one or set config.image_processor")
        return self.image_processor


class ParameterView(nn.Module):
    """Some parameters of a model under their names, as one module for the optimizer (not registered here: they
    belong to the model). Lets a trainable part be "the detector except its backbone"."""

    def __init__(self, named: dict[str, nn.Parameter]):
        super().__init__()
        self._view = dict(named)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from ((prefix + name, p) for name, p in self._view.items())


class DetectorExport:
    """The `detector/` export: stock `GroundingDinoForObjectDetection` + tokenizer + image processor (and the
    `GroundingDinoProcessor` around them), as `training.export.export_run` saves non-backbone exports."""

    def __init__(self, detector: GroundingDinoForObjectDetection, tokenizer: Any, image_processor: Any):
        self.detector, self.tokenizer, self.image_processor = detector, tokenizer, image_processor

    def save_pretrained(self, folder) -> None:
        from transformers import GroundingDinoProcessor

        self.detector.save_pretrained(folder)
        GroundingDinoProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer).save_pretrained(folder)


__all__ = ["DetectorExport", "GroundingConfig", "GroundingForPretraining", "GroundingOutput"]
