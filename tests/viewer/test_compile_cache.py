"""JAX's persistent compilation cache (cltrace/compile_cache.py): a command fills it, a second
run of the same command reads it (and compiles less), and the off switches hold."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.viewer.conftest import PROMPT


def _run(args, env):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cltrace", *args], env=env, capture_output=True,
                       text=True, check=False, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return time.perf_counter() - t


def test_second_run_reads_the_cache(pipeline, tmp_path):
    root = tmp_path / "cache"
    cache = root / "jax"
    env = {**os.environ, "CLTRACE_COMPILE_CACHE": "1", "CLTRACE_CACHE": str(root),
           "CLTRACE_HUGE_PAGES": "0"}
    args = ["trace", PROMPT, "--model", str(pipeline.model_dir), "--transcoder",
            str(pipeline.transcoder_dir), "--no-progress", "--out", str(tmp_path / "a")]
    _run(args, env)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run wrote no cache entry"
    mtimes = {p: p.stat().st_mtime for p in cache.iterdir()}
    _run(args[:-1] + [str(tmp_path / "b")], env)
    # The second run added nothing: every program it needed was read from the cache.
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert {p: p.stat().st_mtime for p in cache.iterdir()} == mtimes
    # Off: by flag (and the environment variable, set by tests/conftest.py for in-process runs).
    other = tmp_path / "other"
    _run(["--no-compile-cache", *args[:-1], str(tmp_path / "c")],
         {**env, "CLTRACE_CACHE": str(other)})
    assert not (other / "jax").exists() or not list(Path(other / "jax").iterdir())
