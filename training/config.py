"""One config convention for every script: typed dataclass defaults, YAML overrides, CLI overrides last.

    SCRIPT.py [--config FILE.yaml] [section.key=value ...]

A config is a dataclass whose fields are section dataclasses. Unknown sections or keys fail with the closest
valid names; values are checked against the field types so a typo such as `optim.epochs=ten` fails at start-up,
not an hour into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override names something that does not exist or has the wrong type."""


def _closest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"{hint} Valid: {', '.join(sorted(options))}."


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a YAML-parsed value against a field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} does not fit {annotation}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r} (write it as [a, b])")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(annotation, value, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads "1e-5" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):  # YAML reads a bare no/yes as a boolean: `mixed_precision=no` means "no"
            return "yes" if value else "no"
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _build(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{where}.{key}" if where else key
        if key not in names:
            kind = "section" if not where else "key"
            raise ConfigError(f"unknown {kind} '{full}'.{_closest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def merge(config: T, overrides: dict[str, Any], where: str = "") -> T:
    """Return a copy of dataclass `config` with a nested dict of overrides applied (validated)."""
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes = {}
    for key, value in overrides.items():
        full = f"{where}.{key}" if where else key
        if key not in names:
            kind = "section" if not where else "key"
            raise ConfigError(f"unknown {kind} '{full}'.{_closest(key, names)}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = merge(current, value, full)
        else:
            changes[key] = _coerce(value, hints[key], full)
    return dataclasses.replace(config, **changes)


def parse_override(item: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (numbers, lists, null, ...)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    dotted, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    out: dict[str, Any] = {}
    node = out
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _split_argv(argv: list[str] | None, config_file: str | Path | None) -> tuple[str | Path | None, list[str]]:
    """(config file, overrides) from `[--config FILE] [section.key=value ...]`."""
    argv = list(argv or [])
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a YAML file path")
            config_file = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--config="):
            config_file = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option '{arg}'; use --config FILE.yaml and section.key=value overrides")
        else:
            overrides.append(arg)
        i += 1
    return config_file, overrides


def _read_yaml(config_file: str | Path) -> dict[str, Any]:
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass an existing YAML file to --config")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    return data


def peek(argv: list[str] | None, key: str, config_file: str | Path | None = None) -> Any:
    """The value of top-level `key` as the full config would resolve it (CLI override, else YAML), or None.

    Lets a script pick the config class before building it (e.g. `method` picks the method's sections)."""
    config_file, overrides = _split_argv(argv, config_file)
    value = _read_yaml(config_file).get(key) if config_file is not None else None
    for item in overrides:
        parsed = parse_override(item)
        if key in parsed:
            value = parsed[key]
    return value


def load_config(cls: type[T], argv: list[str] | None = None, config_file: str | Path | None = None) -> T:
    """Build a config: `cls()` defaults, then the YAML file, then `section.key=value` overrides.

    `argv` may contain `--config FILE` (or `--config=FILE`); everything else must be an override.
    """
    config_file, overrides = _split_argv(argv, config_file)
    config = cls()
    if config_file is not None:
        data = _read_yaml(config_file)
        data.pop("config_name", None)
        config = merge(config, data)
        if hasattr(config, "config_name"):
            config = dataclasses.replace(config, config_name=Path(config_file).stem)
    for item in overrides:
        config = merge(config, parse_override(item))
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
