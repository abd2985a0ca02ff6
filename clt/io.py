"""Writing files so that nothing is half-written, and output paths checked before any compute.

* `atomic_write(path, data)`: the bytes go to a temporary file in the target folder, then
  `os.replace` moves it into place (atomic on POSIX within one filesystem): a reader never sees
  half a file, and an interrupted or failed write (a full disk, a kill) leaves the old file, or
  none, and no temporary file behind.
* `check_output_file(path)` / `check_output_dir(path)`: the one-line errors a command gives
  *before* loading a model when its output cannot be written: the path exists as the wrong kind
  (a directory where a file goes, or the reverse), its folder cannot be created, or it is not
  writable.
* `read_safetensors(file)`: a safetensors file's tensors as read-only numpy views of the file
  mapped into memory, read without importing a framework; `to_device(view)` copies one into a
  jax array.

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


# safetensors dtype codes -> numpy (little-endian, as the format stores them).
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2",
                       "U8": "u1", "BOOL": "?"}


def read_safetensors(file: str | Path) -> dict:
    """A safetensors file's tensors as read-only numpy views of the file mapped into memory (an
    8-byte little-endian header length, the JSON header, then the data). Nothing is read until
    used, so copying the views once into jax arrays is the only copy: `safetensors.numpy`
    reads every tensor into a fresh array first (1.5 s against 0.2 s for SmolLM2's 0.54 GB on
    this project's 2-core VM), and `safetensors.flax` imports flax (0.5 s or more) on its first call.
    A file that is not a well-formed safetensors file raises ValueError (OSError if
    unreadable)."""
    import json

    import numpy as np

    raw = np.memmap(file, np.uint8, mode="r")  # ValueError when empty
    if raw.size < 8:
        raise ValueError(f"{raw.size} bytes: shorter than a safetensors header")
    n = int(np.frombuffer(raw[:8], "<u8")[0])
    if n > raw.size - 8:
        raise ValueError(f"header length {n} past the end of the file ({raw.size} bytes)")
    header = json.loads(bytes(raw[8:8 + n]))  # JSONDecodeError, UnicodeDecodeError: ValueErrors
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")  # noqa: TRY004 - a malformed file
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            if t["dtype"] == "BF16":  # numpy has no bfloat16; jax's ml_dtypes does
                import ml_dtypes

                dtype = np.dtype(ml_dtypes.bfloat16)
            else:
                dtype = np.dtype(_SAFETENSORS_DTYPES[t["dtype"]])
            begin, end = (8 + n + int(o) for o in t["data_offsets"])
            shape = tuple(int(d) for d in t["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tensor {name!r}: bad header entry ({e!r})") from None
        if not 8 + n <= begin <= end <= raw.size:
            raise ValueError(f"tensor {name!r}: data {begin}..{end} outside the file")
        out[name] = raw[begin:end].view(dtype).reshape(shape)  # ValueError if sizes disagree
    return out


def to_device(a, dtype=None):
    """A jax array with its own copy of host array `a`, converted to `dtype` on the host first
    (numpy's conversion: callers pass exact ones). No program is lowered (an eager
    `jnp.asarray` lowers one per shape, ~10 ms each even with the program in the compilation
    cache). On a CPU, `jax.device_put` adopts a 64-byte-aligned buffer instead of copying it
    (jax 0.10, even with may_alias=False): such a buffer, unless the conversion just made it, is
    copied, so that the result never holds a file's mapped pages (`read_safetensors`) or a
    buffer its owner writes again."""
    import jax
    import numpy as np

    a = np.asarray(a)
    b = a if dtype is None else a.astype(dtype, copy=False)
    out = jax.device_put(b)
    if b is a and a.size and out.unsafe_buffer_pointer() == a.ctypes.data:  # adopted
        out = jax.device_put(a.copy())
    return out


__all__ = ["atomic_write", "cache_root", "check_npz_size", "check_output_dir", "check_output_file",
           "read_safetensors", "to_device"]
