"""One config convention for every script: typed dataclass defaults, YAML overrides, CLI overrides last.

    SCRIPT.py [--config FILE.yaml] [section.key=value ...]

A config is a dataclass whose fields are section dataclasses. Unknown sections or keys fail with the closest
valid names; values are checked against the field types so a typo such as `optim.epochs=ten` fails at start-up,
not an hour into a run.

Values are also checked against the ranges their fields declare, so a method's own sections get the same checks
with one line per field::

    sample_probability: float = field(default=0.5, metadata=check(ge=0, le=1))
    global_scale: tuple[float, float] = field(default=(0.32, 1.0), metadata=check(gt=0, le=1, ordered=True))

Scalars keep the text the user wrote: YAML 1.1 reads `off` as false and `010` as 8, but a string field gets
`"off"` / `"010"` and an integer field reads `010` as 10 (as YAML 1.2 does).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tempfile
import types
import typing
from collections.abc import Callable
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


# ---- YAML that keeps the text of its scalars ----------------------------------------------------------------


class RawValue:
    """A YAML scalar as parsed and as written (plus `file:line` for config files), so a `str` field can take the
    text (`off`, `010`, `1.10`) instead of what YAML 1.1 made of it, and errors can point at the line."""

    __slots__ = ("text", "value", "origin")

    def __init__(self, text: str, value: Any, origin: str | None = None) -> None:
        self.text, self.value, self.origin = text, value, origin

    def __repr__(self) -> str:
        return repr(self.value)


class _TextKeepingLoader(yaml.SafeLoader):
    """`yaml.safe_load` that wraps every scalar in `RawValue` (mapping keys stay plain text)."""

    origin_name: str | None = None

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        value = super().construct_object(node, deep)
        if isinstance(node, yaml.ScalarNode):
            where = f"{self.origin_name}:{node.start_mark.line + 1}" if self.origin_name else None
            return RawValue(node.value, value, where)
        return value

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)
        mapping = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            mapping[key.text if isinstance(key, RawValue) else key] = self.construct_object(value_node, deep=deep)
        return mapping


def _load_yaml(text: str, origin: str | None = None) -> Any:
    loader = _TextKeepingLoader(text)
    loader.origin_name = origin
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def plain(value: Any) -> Any:
    """`value` with every `RawValue` replaced by its parsed value (for fields typed `Any` or `dict`)."""
    if isinstance(value, RawValue):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


_DECIMAL = re.compile(r"[-+]?[0-9]+")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a YAML-parsed value (scalars possibly `RawValue`) against a field annotation."""
    raw = value if isinstance(value, RawValue) else None
    field_where = where
    if raw is not None:
        value = raw.value
        if raw.origin:
            where = f"{where} ({raw.origin})"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return plain(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:  # each member decides between the text and the parsed value
                return _coerce(raw if raw is not None else value, arg, field_where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} does not fit {annotation}")
    if origin is typing.Literal:
        if raw is not None and raw.text in args:  # Literal["no", ...] written as a bare no
            return raw.text
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
        return plain(dict(value))
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
        if raw is not None and _DECIMAL.fullmatch(raw.text):  # `010` is ten (YAML 1.2), not octal 8
            return int(raw.text, 10)
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
        if raw is not None and value is not None:  # what was written: `off` stays "off", `010` stays "010"
            return raw.text
        if isinstance(value, (int, float)):  # set from Python code, not parsed from text
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return plain(value)


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


# ---- value checks declared on the fields --------------------------------------------------------------------

CHECK = "dinoforge_check"  # the field-metadata key


@dataclasses.dataclass(frozen=True)
class Check:
    """What a field accepts: bounds (each number of a list/tuple value too), `ordered` (a (min, max) pair, or any
    list, must not decrease), `choices`, and `rule` for anything else: value -> None, or what is wrong, worded to
    complete "key=value is ...". `None` values (optional fields left unset) are not checked."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    ordered: bool = False
    choices: tuple[Any, ...] | None = None
    rule: Callable[[Any], str | None] | None = None

    def allowed(self) -> str:
        """The accepted values in words, e.g. `>= 1`, `in [0, 1]`, `a [min, max] pair with 0 < min <= max <= 1`."""
        low = f">= {self.ge}" if self.ge is not None else f"> {self.gt}" if self.gt is not None else ""
        high = f"<= {self.le}" if self.le is not None else f"< {self.lt}" if self.lt is not None else ""
        if self.ordered:
            return "a [min, max] pair with " + " ".join(x for x in (_flip(low), "min <= max", high) if x)
        if low and high:
            left = f"[{self.ge}" if self.ge is not None else f"({self.gt}"
            right = f"{self.le}]" if self.le is not None else f"{self.lt})"
            return f"in {left}, {right}"
        return low or high

    def _in_bounds(self, x: Any) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        return not math.isnan(x) and all((
            self.ge is None or x >= self.ge, self.gt is None or x > self.gt,
            self.le is None or x <= self.le, self.lt is None or x < self.lt,
        ))

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (completing "key=value is ..."), or None."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"not one of {list(self.choices)}"
        bounded = (self.ge, self.gt, self.le, self.lt) != (None,) * 4
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if (bounded and not all(self._in_bounds(x) for x in items)) or (
                self.ordered and any(a > b for a, b in zip(items, items[1:]))):
            return f"out of range: allowed {self.allowed()}"
        if self.rule is not None:
            return self.rule(value)
        return None


def _flip(low: str) -> str:
    """`>= 0` -> `0 <=` and `> 0` -> `0 <`, to read `0 < min <= max <= 1`."""
    if not low:
        return ""
    op, number = low.split(" ", 1)
    return f"{number} {'<=' if op == '>=' else '<'}"


def check(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    ordered: bool = False,
    choices: tuple[Any, ...] | list[Any] | None = None,
    rule: Callable[[Any], str | None] | None = None,
) -> dict[str, Check]:
    """Field metadata declaring what a config field accepts: `field(default=64, metadata=check(ge=1))`."""
    return {CHECK: Check(ge, gt, le, lt, ordered, tuple(choices) if choices is not None else None, rule)}


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def config_problems(config: Any, where: str = "") -> list[str]:
    """Every declared check that `config` (a dataclass, walked into its sections) fails, as `key=value: why`."""
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{where}.{f.name}" if where else f.name
        rule = f.metadata.get(CHECK)
        problem = rule.problem(value) if rule is not None else None
        if problem:
            problems.append(f"{key}={_show(value)} is {problem}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            problems += config_problems(value, key)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item) and not isinstance(item, type):
                    problems += config_problems(item, f"{key}[{i}]")
    return problems


def validate(config: Any) -> None:
    """Raise a `ConfigError` listing every value outside what its field declares (see `check`)."""
    problems = config_problems(config)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} config values are invalid:\n  " + "\n  ".join(problems))


def parse_override(item: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (numbers, lists, null, ...),
    keeping the text of its scalars for string fields (`RawValue`)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    dotted, raw = item.split("=", 1)
    try:
        value = _load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)}); quote it, e.g. "
                          f"{dotted}='\"...\"'") from None
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
    try:
        data = _load_yaml(path.read_text(), origin=str(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: {_yaml_problem(e)} (YAML syntax)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    if problem is None:
        return str(e).splitlines()[0]
    return f"{problem} ({context})" if context else problem


def peek(argv: list[str] | None, key: str, config_file: str | Path | None = None) -> Any:
    """The value of top-level `key` as the full config would resolve it (CLI override, else YAML), or None.

    Lets a script pick the config class before building it (e.g. `method` picks the method's sections)."""
    config_file, overrides = _split_argv(argv, config_file)
    value = _read_yaml(config_file).get(key) if config_file is not None else None
    for item in overrides:
        parsed = parse_override(item)
        if key in parsed:
            value = parsed[key]
    return plain(value)


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
    validate(config)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for YAML/JSON."""

    def lists(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: lists(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [lists(x) for x in v]
        return v

    return lists(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a kill never leaves half a file)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
