"""Shared machinery for the stages' frozen config dataclasses.

Every stage has one frozen dataclass whose fields carry their own help text (`doc(...)`). From it we
derive the JSON saved beside checkpoints and graphs (`to_dict` / `from_dict`, strict about unknown
keys and wrong types) and the command-line flags (`add_arguments` / `from_arguments`), so the CLI
documents every field without repeating it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")

_NO_DEFAULT = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def doc(help: str, default: Any = _NO_DEFAULT, *, positional: bool = False,
        short: str | None = None, repeat: bool = False, metavar: str | None = None) -> Any:
    """A dataclass field with its help text (shown by `--help`) and an optional default.

    Command line (`add_arguments`): `positional` makes it an argument without a flag; `short`
    adds a one-letter flag (e.g. "-o"); `repeat` makes a tuple field a repeatable flag (each use
    appends one value) instead of one flag taking several values; `metavar` names its value."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in frozen configs; use a tuple")
    meta = {"help": help, "positional": positional, "short": short, "repeat": repeat,
            "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def _resolved_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def to_dict(cfg) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a JSON/CLI value to the annotated type, or raise ConfigError naming the field."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(name, opt, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: cannot be {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{name} must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(name, inner, v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from a dict, refusing unknown keys and values of the wrong type."""
    hints = _resolved_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(f"{cls.__name__}.{k}", hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{cls.__name__}: {e}") from None


def save_config(cfg, path: str | Path, kind: str) -> None:
    """Write `cfg` as JSON with its kind and schema version, for artifacts to carry."""
    payload = {"kind": kind, "config": to_dict(cfg)}
    Path(path).write_text(json.dumps(payload, indent=2))


def load_config(cls: type[T], path: str | Path, kind: str) -> T:
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    if payload.get("kind") != kind:
        raise ConfigError(f"{path} holds a {payload.get('kind')!r} config, expected {kind!r}")
    return from_dict(cls, payload["config"])


# --- command line ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One `--flag` (or positional argument) per field of `cls`, with the field's help text,
    type and choices (see `doc` for the command-line options of a field)."""
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name == "schema_version":
            continue
        tp = hints[f.name]
        meta = f.metadata
        required = f.default is _NO_DEFAULT
        help_text = field_help(f) + ("" if required or f.default in ("", (), None)
                                     else f" (default: {f.default})")
        kw: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS}
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        args = [a for a in get_args(tp) if a is not type(None)]
        base = args[0] if get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 \
            else tp
        if meta.get("positional"):
            parser.add_argument(f.name, **kw, **({} if required else {"nargs": "?"}))
            continue
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is Literal:
            kw["choices"] = list(get_args(base))
        elif get_origin(base) is tuple and meta.get("repeat"):
            kw["action"] = "append"
        elif get_origin(base) is tuple:
            kw["nargs"] = "*"
        names = ["--" + f.name.replace("_", "-")] + ([meta["short"]] if meta.get("short") else [])
        parser.add_argument(*names, dest=f.name, required=required, **kw)


def from_arguments(cls: type[T], ns: argparse.Namespace, **extra) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in vars(ns).items() if k in names}
    data.update(extra)
    return from_dict(cls, data)
