"""Box recall of a grounding detector on a labelled detection split (COCO-style `objects` column).

Every image is prompted with all category names ("."-separated, in class order); a phrase's score for a query is
the highest sigmoid of the query's logits over that phrase's tokens (as `GroundingDinoProcessor` post-processing
scores phrases). A ground-truth object of class c counts as recalled when one of the `top_k` queries that score
highest for phrase c predicts a box with IoU ≥ `iou` with it. Recall = recalled objects / objects, in percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_iou

from ..data.detection import phrase_prompt
from .common import EvaluationError, default_device


def _corners(cxcywh: Tensor) -> Tensor:
    cx, cy, w, h = cxcywh.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def phrase_scores(logits: Tensor, input_ids: Tensor) -> Tensor:
    """`[B, Q, P]`: per query, the max sigmoid over each phrase's tokens (phrases found as Grounding DINO's loss
    finds them, `build_label_maps`)."""
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    maps = build_label_maps(logits, input_ids)
    probs = logits.sigmoid()
    out = []
    for b, label_map in enumerate(maps):
        mask = label_map.bool()  # [P, T]
        out.append(torch.stack([probs[b][:, m].max(dim=-1).values for m in mask], dim=-1))
    return torch.stack(out)


@torch.no_grad()
def box_recall(detector: Any, tokenizer: Any, image_processor: Any, dataset: Any, class_names: Sequence[str], *,
               iou: float = 0.5, top_k: int = 1, image_column: str = "image", objects_column: str = "objects",
               bbox_key: str = "bbox", category_key: str = "category", batch_size: int = 16,
               device: torch.device | str | None = None) -> dict[str, Any]:
    """`{"recall", "recalled", "num_objects", "num_images", "iou", "top_k"}` (recall in percent)."""
    device = torch.device(device) if device is not None else default_device()
    was_training = detector.training
    detector.eval().to(device)
    tokens = tokenizer([phrase_prompt(class_names)], return_tensors="pt")
    recalled = total = 0
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            images = [im.convert("RGB") for im in rows[image_column]]
            pixels = image_processor(images=images, return_tensors="pt", do_pad=False)["pixel_values"].to(device)
            n = len(images)
            batch_tokens = {k: v.repeat(n, 1).to(device) for k, v in tokens.items()
                            if k in ("input_ids", "attention_mask", "token_type_ids")}
            out = detector(pixel_values=pixels, **batch_tokens)
            scores = phrase_scores(out.logits.float(), batch_tokens["input_ids"])  # [n, Q, P]
            boxes = _corners(out.pred_boxes.float())
            for i, (image, objects) in enumerate(zip(images, rows[objects_column])):
                w, h = image.size
                for (x, y, bw, bh), c in zip(objects[bbox_key], objects[category_key]):
                    gt = torch.tensor([[x / w, y / h, (x + bw) / w, (y + bh) / h]], device=device)
                    best = scores[i, :, int(c)].topk(min(top_k, scores.shape[1])).indices
                    recalled += int(box_iou(boxes[i, best], gt).max() >= iou)
                    total += 1
    finally:
        detector.train(was_training)
    if total == 0:
        raise EvaluationError("the evaluation split has no objects")
    return {"recall": 100.0 * recalled / total, "recalled": recalled, "num_objects": total,
            "num_images": len(dataset), "iou": iou, "top_k": top_k}
