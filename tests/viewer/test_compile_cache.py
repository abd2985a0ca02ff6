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


def test_xla_flags_turn_triton_gemms_off_unless_the_user_names_the_flag():
    from cltrace.compile_cache import xla_flags

    assert xla_flags(None) == "--xla_gpu_enable_triton_gemm=false"
    assert xla_flags("--xla_force_host_platform_device_count=8") == (
        "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=false")
    for user in ("--xla_gpu_enable_triton_gemm=true", "--xla_gpu_enable_triton_gemm"):
        assert xla_flags(f"--a=1 {user}") == f"--a=1 {user}"


_ORDER = r'''
import json, os, sys
import cltrace.compile_cache as cc
cc._cuda_jax = lambda: sys.argv[1] == "cuda"  # as if JAX's CUDA plugin were (not) installed
from argparse import Namespace
from cltrace import cli
from jax._src import xla_bridge

# A real command line parses without starting a backend (XLA reads XLA_FLAGS once, at the start).
cli.build_parser().parse_args(["trace", "x", "--model", "m", "--transcoder", "t"])
assert not xla_bridge.backends_are_initialized()
seen = {}
def run(args):
    seen["started"] = xla_bridge.backends_are_initialized()
    seen["flags"] = os.environ.get("XLA_FLAGS")
    return 0
real = cli.build_parser
cli.build_parser = lambda: Namespace(parse_args=lambda argv: Namespace(
    no_compile_cache=True, compile_cache=None, command="x", run=run))
assert cli.main([]) == 0
print(json.dumps(seen))
'''


def test_a_command_sets_the_flags_before_any_backend_starts_and_only_with_cuda():
    """`cltrace.cli.main` puts the flag in XLA_FLAGS before the command runs, with no backend
    started by then (importing the CLI and parsing a command line start none); without JAX's
    CUDA plugin XLA_FLAGS is left as it was."""
    import json

    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    for plugin, flags in [("cuda", ("--xla_cpu_enable_fast_math=false "
                                    "--xla_gpu_enable_triton_gemm=false")),
                          ("none", "--xla_cpu_enable_fast_math=false")]:
        r = subprocess.run([sys.executable, "-c", _ORDER, plugin], env=env, capture_output=True,
                           text=True, check=False, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout.strip().splitlines()[-1]) == {"started": False,
                                                                  "flags": flags}


def test_cuda_plugins_are_found_by_name_without_importing_jax(tmp_path):
    """Either of JAX's CUDA plugin packages counts; with neither (this machine), none does."""
    code = ("import sys; from cltrace.compile_cache import _cuda_jax; "
            "print(_cuda_jax(), 'jax' in sys.modules)")
    for name, pkg in [("none", None), ("plugin", "jax_cuda13_plugin"),
                      ("pjrt", "jax_plugins/xla_cuda12")]:
        root = tmp_path / name
        if pkg:
            (root / pkg).mkdir(parents=True)
            (root / pkg / "__init__.py").write_text("")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(root), str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=False, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split() == [str(pkg is not None), "False"], name
