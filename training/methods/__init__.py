"""Pretraining methods the shared loop can train (`method:` in the config). Importing this package registers
the built-in ones."""

from . import barlow_twins, densecl, dinov2, mocov3
from .registry import Method, available_methods, get_method, load_train_config, register_method

__all__ = [
    "Method",
    "available_methods",
    "barlow_twins",
    "densecl",
    "dinov2",
    "get_method",
    "load_train_config",
    "mocov3",
    "register_method",
]
