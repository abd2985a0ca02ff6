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
        short: str | None = None, repeat: bool = False, metavar: str | None = None,
        flatten: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its help text (shown by `--help`) and an optional default.

    Command line (`add_arguments`): `positional` makes it an argument without a flag; `short`
    adds a one-letter flag (e.g. "-o"); `repeat` makes a tuple field a repeatable flag (each use
    appends one value) instead of one flag taking several values; `metavar` names its value.
    A field holding another config dataclass (nested) lists in `flatten` the fields of that
    config that are also given at the top level: as flags, and as keys of a flat dict or file
    (`from_dict` moves them into the nested config)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in frozen configs; use a tuple")
    meta = {"help": help, "positional": positional, "short": short, "repeat": repeat,
            "metavar": metavar, "flatten": tuple(flatten)}
    return dataclasses.field(default=default, metadata=meta)


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def _resolved_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def to_dict(cfg) -> dict[str, Any]:
    """JSON-ready fields (tuples as lists, nested configs as dicts)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _nested(cls) -> dict[str, tuple[type, dataclasses.Field]]:
    """Fields of `cls` holding another config dataclass: name -> (its class, the field)."""
    hints = _resolved_types(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)
            if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])}


def flat_names(cls) -> set[str]:
    """Names `from_dict(cls, ...)` accepts: its fields and those its nested fields flatten."""
    names = {f.name for f in dataclasses.fields(cls)}
    for _, f in _nested(cls).values():
        names.update(f.metadata.get("flatten", ()))
    return names


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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value)
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build `cls` from a dict, refusing unknown keys and values of the wrong type. A nested
    config may be given as a dict (over its default's values) or by its flattened keys at the
    top level (see `doc`), or both."""
    hints = _resolved_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = dict(data)
    for name, (sub, f) in _nested(cls).items():
        flat = {k: data.pop(k) for k in f.metadata.get("flatten", ()) if k in data}
        if name not in data and not flat:
            continue
        given = data.get(name, {})
        if isinstance(given, sub):
            given = to_dict(given)
        if not isinstance(given, dict):
            raise ConfigError(f"{cls.__name__}.{name} must be a table of {sub.__name__} fields, "
                              f"got {given!r}")
        base = to_dict(f.default) if dataclasses.is_dataclass(f.default) else {}
        data[name] = {**base, **given, **flat}
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
    from clt.io import atomic_write  # clt.io imports this module

    payload = {"kind": kind, "config": to_dict(cfg)}
    atomic_write(path, json.dumps(payload, indent=2))


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
    nested = _nested(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name == "schema_version":
            continue
        if f.name in nested:  # its flattened fields, documented by the nested config
            sub, outer = nested[f.name]
            default = outer.default
            _add_fields(parser, sub, [g for g in dataclasses.fields(sub)
                                      if g.name in outer.metadata.get("flatten", ())],
                        default if dataclasses.is_dataclass(default) else None)
            continue
        _add_fields(parser, cls, [f], None)


def _add_fields(parser: argparse.ArgumentParser, cls, fields: list, defaults) -> None:
    """The flags of these fields of `cls` (`defaults`: an instance whose values to show)."""
    hints = _resolved_types(cls)
    for f in fields:
        tp = hints[f.name]
        meta = f.metadata
        default = getattr(defaults, f.name) if defaults is not None else f.default
        required = default is _NO_DEFAULT
        help_text = field_help(f) + ("" if required or default in ("", (), None)
                                     else f" (default: {default})")
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
    names = flat_names(cls)
    data = {k: v for k, v in vars(ns).items() if k in names}
    data.update(extra)
    return from_dict(cls, data)
