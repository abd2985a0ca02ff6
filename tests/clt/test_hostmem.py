"""The `cltrace` command's restart with huge pages for malloc (cltrace.hostmem)."""

import os
import subprocess
import sys

import pytest

from cltrace.hostmem import KEEP_HEAP, OFF_VAR, TUNABLE, huge_pages_env


def test_env_adds_the_tunable_once_and_keeps_others():
    env = huge_pages_env({"PATH": "/bin"})
    if env is None:
        pytest.skip("no glibc or transparent huge pages here: nothing to add")
    assert env["GLIBC_TUNABLES"] == TUNABLE and env["PATH"] == "/bin"
    kept = huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + TUNABLE
    assert huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # user's choice
    assert huge_pages_env({OFF_VAR: "0"}) is None


def test_keep_heap_adds_its_tunables_but_not_over_the_users():
    env = huge_pages_env({"PATH": "/bin"}, keep_heap=True)
    if env is None:
        pytest.skip("no glibc or transparent huge pages here: nothing to add")
    assert env["GLIBC_TUNABLES"].split(":") == [TUNABLE, *KEEP_HEAP]
    mine = huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, keep_heap=True)
    assert mine["GLIBC_TUNABLES"].split(":") == ["glibc.malloc.arena_max=4", TUNABLE,
                                                 *KEEP_HEAP[1:]]
    # Huge pages already on (the Makefile exports them): the kept heap is still added, once.
    made = huge_pages_env({"GLIBC_TUNABLES": TUNABLE}, keep_heap=True)
    assert made["GLIBC_TUNABLES"].split(":") == [TUNABLE, *KEEP_HEAP]
    assert huge_pages_env(made, keep_heap=True) is None


def test_restart_runs_the_module_again_with_the_tunable(tmp_path):
    """A module that calls reexec_with_huge_pages first runs once more with the tunable (and
    its arguments), and only once."""
    if huge_pages_env({}) is None:
        pytest.skip("no glibc or transparent huge pages here: nothing to add")
    (tmp_path / "probe.py").write_text(
        "import os, sys\n"
        "from cltrace.hostmem import reexec_with_huge_pages\n"
        "print('start', flush=True)\n"
        "reexec_with_huge_pages('probe', sys.argv[1:])\n"
        "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OFF_VAR)}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.getcwd()])
    out = subprocess.run([sys.executable, "-m", "probe", "a", "--b"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["start", "start", f"{TUNABLE} ['a', '--b']"]
