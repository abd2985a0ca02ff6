"""Transcoders shipped inside the package, one directory per embedded model.

`clt/bundled/<model name>/` holds a transcoder in our own layout (config.json, float16 safetensors
shards of at most 16 MB, info.json with its recipe and metrics) and its `feature_cards.npz`. It is
what `cltrace trace`, `cltrace steer` and the case studies use when no --transcoder is given.
"""

from __future__ import annotations

from pathlib import Path

from clt.configs import ConfigError

ROOT = Path(__file__).resolve().parent
PREFIX = "bundled:"  # how artifacts record a bundled transcoder: by name, valid in any install


def bundled_transcoder(model_name: str) -> Path | None:
    """The directory of the transcoder bundled for `model_name`, or None."""
    d = ROOT / model_name
    if d.is_dir() and (d / "config.json").exists():
        return d
    return None


def available() -> list[str]:
    """Model names with a bundled transcoder."""
    return sorted(p.name for p in ROOT.iterdir() if bundled_transcoder(p.name) is not None)


def resolve_transcoder(ref: str | None, model_name: str) -> str:
    """`ref` when given; otherwise the transcoder bundled for the model, or a one-line error."""
    if ref:
        return str(ref)
    d = bundled_transcoder(model_name)
    if d is None:
        have = ", ".join(available()) or "none"
        raise ConfigError(f"no transcoder given and none is bundled for '{model_name}' (bundled: "
                          f"{have}): pass --transcoder PATH")
    return str(d)


def record(ref: str) -> str:
    """How a graph or page records a transcoder so that it resolves from any folder: a bundled
    one by name (`bundled:smollm2-135m`), a local directory by its absolute path, anything else
    (a hub id) as given."""
    ref = str(ref)
    if ref.startswith(PREFIX):
        return ref
    p = Path(ref).expanduser()
    if not p.is_dir():
        return ref
    p = p.resolve()
    if p.parent == ROOT and bundled_transcoder(p.name) is not None:
        return PREFIX + p.name
    return str(p)


def locate(ref: str) -> str:
    """The path of a recorded `bundled:NAME` (a one-line error if this install lacks it); any
    other reference as given."""
    ref = str(ref)
    if not ref.startswith(PREFIX):
        return ref
    d = bundled_transcoder(ref[len(PREFIX):])
    if d is None:
        raise ConfigError(f"'{ref}': this install bundles no such transcoder (bundled: "
                          f"{', '.join(available()) or 'none'})")
    return str(d)


__all__ = ["PREFIX", "ROOT", "available", "bundled_transcoder", "locate", "record",
           "resolve_transcoder"]
