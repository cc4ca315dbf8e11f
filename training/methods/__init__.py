"""Pretraining methods the shared loop can train (`method:` in the config). Importing this package registers
the built-in ones."""

from . import (
    barlow_twins,
    copy_detection,
    densecl,
    dinov2,
    distill,
    distill_features,
    grounding,
    mocov3,
    simclr,
    text_alignment,
)
from .registry import Method, available_methods, get_method, load_train_config, register_method

__all__ = [
    "Method",
    "available_methods",
    "barlow_twins",
    "copy_detection",
    "densecl",
    "dinov2",
    "distill",
    "distill_features",
    "get_method",
    "grounding",
    "load_train_config",
    "mocov3",
    "register_method",
    "simclr",
    "text_alignment",
]
