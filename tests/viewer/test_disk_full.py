"""A full disk while `cltrace trace` / `cltrace view` write: one line, and no partial or
temporary file left (every write goes through `clt.io.atomic_write`). The fault is injected at
the write (ENOSPC from the file's flush to disk); where the test runs as root and may mount, a
real 64 KiB tmpfs is filled too."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from cltrace.cli import main
from tests.viewer.conftest import PROMPT


def _no_space(monkeypatch, after: int = 0):
    """Make the (after+1)-th and later atomic writes fail as a full disk does."""
    import clt.io

    real = os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(clt.io.os, "fsync", fsync)


def _one_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("after", [0, 1, 2, 3])  # graph, config.json, JSON, page
def test_trace_on_a_full_disk(pipeline, tmp_path, monkeypatch, capsys, after):
    _no_space(monkeypatch, after)
    out = tmp_path / "run"
    rc = main(["trace", PROMPT, "--model", str(pipeline.model_dir), "--transcoder",
               str(pipeline.transcoder_dir), "--out", str(out), "--no-progress"])
    assert rc == 2
    assert "No space left on device" in _one_line(capsys)
    left = sorted(p.name for p in out.iterdir())
    assert not [n for n in left if n.endswith(".tmp")], left
    # The files written before the disk filled are whole; the one that failed is absent.
    written = [[], ["graph.npz"], ["config.json", "graph.npz"],
               ["config.json", "graph.json", "graph.npz"]][after]
    assert left == written, left


def test_view_on_a_full_disk(pipeline, tmp_path, monkeypatch, capsys):
    page = tmp_path / "p.html"
    page.write_text("the old page")
    _no_space(monkeypatch)
    assert main(["view", str(pipeline.graph), "-o", str(page)]) == 2
    assert "No space left on device" in _one_line(capsys)
    assert page.read_text() == "the old page"  # the old file stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.html"]


def test_view_on_a_real_full_tmpfs(pipeline, tmp_path, capsys):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
            capture_output=True, check=False).returncode != 0:
        pytest.skip("needs root and mount (the injected-fault tests cover the logic)")
    try:
        assert main(["view", str(pipeline.graph), "-o", str(mnt / "p.html")]) == 2
        assert "No space left on device" in _one_line(capsys)
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
