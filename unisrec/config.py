"""Typed configuration: dataclasses loaded from YAML, overridable with ``key=value``.

Every job (shard, pretrain, finetune, ...) describes its settings as a tree of dataclasses.
``load_config(JobConfig, "job.yaml", ["train.lr=3e-4", "data.dir=/tmp/d"])`` reads the YAML,
applies the dotted overrides (values parsed as YAML scalars), and checks every key and type.
A wrong key or value raises :class:`ConfigError` naming it, e.g. ``train.lr: expected float,
got 'fast'`` or ``unknown key 'train.lrr' (did you mean 'train.lr'?)``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from unisrec.errors import ConfigError

T = TypeVar("T")


def check_range(
    key: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> None:
    """Raise ConfigError naming ``key`` unless ``value`` is a finite number in ``[low, high]``
    (``(low, high]`` with ``low_open``); ``None`` leaves that side open."""
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"{key}: must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"{key}: must be <= {high}, got {value}")


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides=()) -> T:
    """Build ``cls`` from a YAML file (optional) plus ``key=value`` overrides.

    ``${ENV:-default}`` in string values expands from the environment, so a config can say
    ``root: ${UNISREC_DATA_ROOT:-../shared/data}``.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        raw = loaded
    parsed: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parsed[key.strip()] = yaml.safe_load(value) if value != "" else ""
    return from_dict(cls, apply_overrides(raw, parsed))


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
        raise ConfigError(f"unknown key '{prefix}{key}'{hint}; known: {', '.join(fields)}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    for name, f in fields.items():  # defaults may name environment variables too
        if name in kwargs:
            continue
        if isinstance(f.default, str) and "${" in f.default:
            kwargs[name] = expand_env(f.default)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = from_dict(hints[name], {}, f"{prefix}{name}.")
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: {err}") from err
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}") from err
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for YAML, JSON and MLflow params)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept as values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with dotted ``overrides`` (``{"data.domain": "x"}``) applied; ``tree`` itself
    is not changed. Missing sections are created (the typed config then checks every key);
    a list or value in the way of a dotted key is an error."""
    out = copy.deepcopy(tree)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{dotted}': '{part}' is not a section; set it whole")
            node = child
        node[leaf] = value
    return out


def expand_env(value: str) -> str:
    """``${NAME:-default}`` references in ``value`` replaced from the environment."""
    out, i = [], 0
    while True:
        start = value.find("${", i)
        if start < 0:
            out.append(value[i:])
            return "".join(out)
        end = value.find("}", start)
        if end < 0:
            out.append(value[i:])
            return "".join(out)
        out.append(value[i:start])
        name, _, default = value[start + 2 : end].partition(":-")
        out.append(os.environ.get(name, default))
        i = end + 1


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, f"{key}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        inner = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(inner, v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return expand_env(str(value))
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value
