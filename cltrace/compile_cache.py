"""JAX's persistent compilation cache, on for every `cltrace` command by default.

Every command compiles the same XLA programs at every run (the model's forward, the tracer's
row sweep for each prompt-prefix bucket, the train step): 5-60 s of a short command. With the
cache, the second run of a command with the same shapes reads them from disk instead. The cache
lives in `jax/` under `clt.io.cache_root()` (`$CLTRACE_CACHE`, else
`$XDG_CACHE_HOME/cltrace`, else `~/.cache/cltrace`);
`cltrace --no-compile-cache ...` or `CLTRACE_COMPILE_CACHE=0` turns it off, `cltrace
--compile-cache DIR ...` moves it. Entries are keyed by the program, the JAX version and the
device, so a stale entry is never used; deleting the folder is always safe.
"""

from __future__ import annotations

import os
from pathlib import Path

OFF_VAR = "CLTRACE_COMPILE_CACHE"


def default_dir() -> Path:
    from clt.io import cache_root

    return cache_root() / "jax"


def enable(path: str | Path | None = None) -> Path | None:
    """Turn the cache on (at `path`, default `default_dir()`); None when turned off by the
    environment or when the folder cannot be made (then commands just compile, as before)."""
    if os.environ.get(OFF_VAR) == "0":
        return None
    d = Path(path).expanduser() if path else default_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(d))
    # Cache every program that took a noticeable time to compile, whatever its size.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return d


__all__ = ["OFF_VAR", "default_dir", "enable"]
