"""JAX's persistent compilation cache, on for every `cltrace` command by default.

Every command compiles the same XLA programs at every run (the model's forward, the tracer's
row sweep for each prompt-prefix bucket, the train step): 5-60 s of a short command. With the
cache, the second run of a command with the same shapes reads them from disk instead. The cache
lives in `jax/` under `clt.io.cache_root()` (`$CLTRACE_CACHE`, else
`$XDG_CACHE_HOME/cltrace`, else `~/.cache/cltrace`);
`cltrace --no-compile-cache ...` or `CLTRACE_COMPILE_CACHE=0` turns it off, `cltrace
--compile-cache DIR ...` moves it. Entries are keyed by the program, the JAX version and the
device, so a stale entry is never used; deleting the folder is always safe.

On an NVIDIA GPU, every command also compiles without XLA's Triton gemm fusions
(`--xla_gpu_enable_triton_gemm=false` added to `XLA_FLAGS`, `xla_flags`): autotuning their
configurations took over 100 s to compile one trace's row program on an H200 (over 40 s for the
128-token forward pass), against a 16 s whole trace without them, rows no slower (4.19 s with
cuBLAS's autotuned gemms, 4.29 s untuned; session 19, `docs/benchmarks/bench_trace_gpu_h200.json`).
A user's `XLA_FLAGS` that names the flag is kept as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

OFF_VAR = "CLTRACE_COMPILE_CACHE"
TRITON_GEMM = "--xla_gpu_enable_triton_gemm"


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


def xla_flags(flags: str | None) -> str:
    """`XLA_FLAGS` for a command: `flags` (the user's) with Triton gemm fusions off, unless
    they name that flag themselves (module docstring)."""
    flags = (flags or "").strip()
    if TRITON_GEMM.lstrip("-") in flags:
        return flags
    return f"{flags} {TRITON_GEMM}=false".strip()


def _cuda_jax() -> bool:
    """Whether JAX's CUDA plugin is installed (`jax[cuda12]`, `jax[cuda13]`, ...: the
    `jax_cudaNN_plugin` package or the PJRT plugin `jax_plugins.xla_cudaNN`): found by name,
    without importing JAX or starting a backend."""
    import importlib.util
    import pkgutil
    import re

    if any(re.fullmatch(r"jax_cuda\d+_plugin", m.name) for m in pkgutil.iter_modules()):
        return True
    spec = importlib.util.find_spec("jax_plugins")
    paths = spec.submodule_search_locations if spec is not None else None
    return any(re.fullmatch(r"xla_cuda\d+", m.name) for m in pkgutil.iter_modules(paths or []))


def set_xla_flags(environ=os.environ) -> None:
    """Put `xla_flags` in `environ` where JAX has a CUDA plugin; before JAX starts a backend
    (XLA reads `XLA_FLAGS` once, then). Elsewhere nothing changes (a CPU does not read it, and a
    future XLA that drops the flag would refuse every command)."""
    if _cuda_jax():
        environ["XLA_FLAGS"] = xla_flags(environ.get("XLA_FLAGS"))


__all__ = ["OFF_VAR", "TRITON_GEMM", "default_dir", "enable", "set_xla_flags", "xla_flags"]
