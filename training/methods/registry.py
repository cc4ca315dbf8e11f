"""The method registry: `method` name → its config class, model builder and schedules.

A method is a model file in `modeling/` (a `PreTrainedModel` + `PretrainingMethod`) plus this small glue: the
config sections it adds to the shared ones, how to build the model from a resolved config, and the per-step
values its forward / post-step hook take (e.g. the teacher temperature and EMA momentum). The loop only ever sees
the `Method` record. docs/adding_a_method.md shows how to add one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modeling.method import PretrainingMethod

from ..config import ConfigError, load_config, peek
from ..train_config import TrainConfig

Schedule = Callable[[int], float]


def _no_schedules(cfg: TrainConfig) -> dict[str, Schedule]:
    return {}


@dataclass(frozen=True)
class Method:
    """One pretraining method as the loop sees it.

    `schedules(cfg)` returns named per-step values (step → float). They are logged, and passed as keyword
    arguments to the model's `forward` and `after_optimizer_step`, except `lr_scale/<part>`, which multiplies
    the learning rate of that trainable part (0 freezes it, e.g. a backbone while fresh heads warm up).
    `evaluate`, when set, is the method's end-of-run evaluation (`training.run` calls it instead of the kNN).
    """

    name: str
    config_class: type[TrainConfig]
    build_model: Callable[[TrainConfig], PretrainingMethod]
    schedules: Callable[[TrainConfig], dict[str, Schedule]] = field(default=_no_schedules)
    description: str = ""
    # End-of-run evaluation of its own, replacing the default kNN of the exported backbone (e.g. zero-shot
    # classification of a text-alignment export): `evaluate(cfg, model, accelerator, exported paths)` runs on every
    # process after the export (paths only on the main process) and returns a JSON-able summary or None.
    evaluate: Callable[..., dict | None] | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Make `method: <name>` available to `train.py` (a later registration under the same name replaces it)."""
    if not issubclass(method.config_class, TrainConfig):
        raise TypeError(f"method {method.name!r}: config_class must subclass training.train_config.TrainConfig")
    _METHODS[method.name] = method
    return method


def available_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Available: {', '.join(available_methods())}.")
    return _METHODS[name]


def load_train_config(argv: list[str] | None = None, config_file: str | Path | None = None) -> TrainConfig:
    """`train.py`'s config: read `method` (CLI override, else the YAML file, else the default) and build that
    method's config class with the usual convention (defaults, YAML, `section.key=value` overrides)."""
    name = peek(argv, "method", config_file)
    name = TrainConfig.method if name is None else str(name)
    return load_config(get_method(name).config_class, argv, config_file)
