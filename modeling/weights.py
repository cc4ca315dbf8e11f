"""Building a model from a converted state dict: shared by the converters in `modeling.convert` and
`modeling.official`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def copy_tensor(t: torch.Tensor) -> torch.Tensor:
    # Fresh contiguous storage: q/k/v and gate/up are views of fused weights, and a converted model must never
    # alias (or be saved as a view of) the source's parameters.
    return t.detach().clone(memory_format=torch.contiguous_format)


def bias_or_zeros(sd: Mapping[str, torch.Tensor], key: str, size: int, like: torch.Tensor) -> torch.Tensor:
    """`sd[key]`, or zeros where the source has no bias but the target layer always has one (exact: adds 0)."""
    return sd[key] if key in sd else like.new_zeros(size)


def build_from_state_dict(factory, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Construct a model on the meta device and load copies of `state_dict` into it by assignment (no random init)."""
    with torch.device("meta"):
        model = factory()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    bad_shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(v.shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(expected[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or bad_shapes:
        # Internal mapping error (the config and weights disagree); name everything so it can be fixed.
        raise ValueError(
            f"cannot build {what}: missing keys {missing}, unexpected keys {unexpected}, shape mismatches {bad_shapes}"
        )
    model.load_state_dict({k: copy_tensor(v) for k, v in state_dict.items()}, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"{what}: tensors left on the meta device after loading: {leftover}")
    return model.eval()
