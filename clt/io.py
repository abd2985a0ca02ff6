"""Writing files so that nothing is half-written, and output paths checked before any compute.

* `atomic_write(path, data)`: the bytes go to a temporary file in the target folder, then
  `os.replace` moves it into place (atomic on POSIX within one filesystem): a reader never sees
  half a file, and an interrupted or failed write (a full disk, a kill) leaves the old file, or
  none, and no temporary file behind.
* `check_output_file(path)` / `check_output_dir(path)`: the one-line errors a command gives
  *before* loading a model when its output cannot be written: the path exists as the wrong kind
  (a directory where a file goes, or the reverse), its folder cannot be created, or it is not
  writable.

Every artifact of the project (graphs, pages, JSON exports, feature cards, transcoders, caches,
metrics) is written through these.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from clt.configs import ConfigError


def cache_root() -> Path:
    """The folder of cltrace's caches (compiled programs, converted models):
    `$CLTRACE_CACHE`, else `$XDG_CACHE_HOME/cltrace`, else `~/.cache/cltrace`."""
    if os.environ.get("CLTRACE_CACHE"):
        return Path(os.environ["CLTRACE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cltrace"


def atomic_write(path: str | Path, data: str | bytes | Callable[[BinaryIO], None]) -> Path:
    """Write `path` atomically (module docstring). `data`: text (UTF-8), bytes, or a function
    given the open binary file. Errors (a full disk, no permission) become one-line
    ConfigErrors naming the path; no partial file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}; nothing was written "
                          "(free some space, or choose another output path)") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_npz_size(path: str | Path, limit_bytes: int, what: str) -> None:
    """Refuse an .npz whose arrays would take more than `limit_bytes` once read, before reading
    any (an untrusted file: a small compressed file can hold a huge array). A file that is not
    a zip is left to the reader, which says so in its own words."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            total = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError):
        return
    if total > limit_bytes:
        raise ConfigError(f"{path} would take {total / 2**30:.1f} GiB once read, more than the "
                          f"{limit_bytes / 2**30:.1f} GiB a {what} may hold; it is not one this "
                          "tool wrote, or re-write it smaller")


def _writable_dir(d: Path, what: str) -> None:
    """Create `d` (and parents) if needed; refuse if it is a file or cannot be written."""
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{what} {d} exists and is not a directory; choose another path")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {what} {d}: {e.strerror or e}") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {d} is not writable; choose another path")


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """The output file `path`, checked before any compute: not an existing directory, its
    folder created and writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path} exists and is not writable")
    _writable_dir(path.parent if str(path.parent) else Path("."), "the folder of")
    return path


def check_output_dir(path: str | Path, what: str = "output directory",
                     create: bool = True) -> Path:
    """The output directory `path`, checked before any compute: not an existing file, created,
    writable. create=False: the same refusals without creating anything (its nearest existing
    folder must be a writable directory), so that a run refused later leaves nothing behind;
    the folder is made when the results are written."""
    path = Path(path).expanduser()
    if create:
        _writable_dir(path, what)
        return path
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a directory; choose another path")
    up = path
    while not up.exists():
        up = up.parent
    if not up.is_dir():
        raise ConfigError(f"cannot create {what} {path}: {up} is a file, which is not a "
                          "directory")
    if not os.access(up, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {up} is not writable; choose another path")
    return path


__all__ = ["atomic_write", "cache_root", "check_npz_size", "check_output_dir", "check_output_file"]
