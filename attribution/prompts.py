"""Many prompts for one tracer (`cltrace trace --prompts FILE`): the file's prompts as one
`TraceConfig` each, every line checked before any model is loaded.

A `.jsonl` file holds one JSON object per line: `{"prompt": "...", "name": "...", "target": " A"
or [" A", " B"], "minus": " B" or [...], "target_vector": "v.npy"}`; only "prompt" is required, a
relative target_vector is read from the file's folder, and fields a line leaves out come from
the command's flags. Any other file holds one prompt per line, exactly as written (leading and
trailing spaces kept: they are tokens); blank lines are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from clt.configs import ConfigError

MAX_PROMPT_FILE_BYTES = 64 << 20
_FIELDS = {"prompt", "name", "target", "minus", "target_vector"}


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a batch: its index in the file, a name (for its output folder and the
    summary), the file's line, and its full trace config."""

    index: int
    name: str
    line: int
    config: object  # attribution.trace.TraceConfig

    @property
    def folder(self) -> str:
        """The prompt's output folder inside the batch's: `003-the-capital-of-france-is`."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")[:48].strip("-")
        return f"{self.index:03d}-{slug}" if slug else f"{self.index:03d}"


def _strings(v, what: str, where: str) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return tuple(v)
    raise ConfigError(f"{where}: \"{what}\" must be a string or a list of strings")


def read_prompts(path: str | Path, base) -> list[PromptItem]:
    """The prompts of `path`, each `base` (a TraceConfig) with its own prompt and targets;
    one-line errors name the file and line."""
    from attribution.trace import check_prompt

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--prompts: no file at {path}")
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise ConfigError(f"--prompts {path}: {path.stat().st_size >> 20} MiB is more than "
                          f"{MAX_PROMPT_FILE_BYTES >> 20} MiB of prompts; split it")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--prompts {path} is not UTF-8 text (byte at offset {e.start})"
                          ) from None
    if "\x00" in text:
        raise ConfigError(f"--prompts {path} looks binary (a NUL character); give one prompt "
                          "per line, or JSONL")
    jsonl = path.suffix == ".jsonl"
    items: list[PromptItem] = []
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{n}"
        if jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not JSON ({e.msg}); give one object per line"
                                  ) from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ConfigError(f"{where}: each line must be an object with a \"prompt\" "
                                  "string")
            unknown = sorted(set(row) - _FIELDS)
            if unknown:
                raise ConfigError(f"{where}: unknown field(s) {unknown}; known: "
                                  f"{sorted(_FIELDS)}")
            change = {"prompt": row["prompt"]}
            for key in ("target", "minus"):
                if key in row:
                    change[key] = _strings(row[key], key, where)
            if "target" in row and "minus" not in row:
                change["minus"] = ()  # a line's own targets do not take the flags' minus
            if "target_vector" in row:
                if not isinstance(row["target_vector"], str):
                    raise ConfigError(f"{where}: \"target_vector\" must be a path string")
                v = Path(row["target_vector"]).expanduser()
                change["target_vector"] = str(v if v.is_absolute() else path.parent / v)
                change.setdefault("target", ())
                change.setdefault("minus", ())
            name = row.get("name", row["prompt"])
            if "name" in row and (not isinstance(name, str) or not name.strip()):
                raise ConfigError(f"{where}: \"name\" must be a non-empty string")
        else:
            change, name = {"prompt": line}, line
        try:
            config = dataclasses.replace(base, **change)
            check_prompt(config)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        items.append(PromptItem(len(items), name.strip(), n, config))
    if not items:
        raise ConfigError(f"--prompts {path} holds no prompt (only blank lines)")
    return items


__all__ = ["PromptItem", "read_prompts"]
