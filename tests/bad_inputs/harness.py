"""The bad-input suite's harness: each case runs the real CLI in-process (`cltrace.cli.main`)
and asserts the exit code, that the error is one line naming the fix (`message` found in it), no
traceback, and that nothing was written under the output folder.

A case is `Case(args, message, rc=2)`; `args` may hold `{tmp}` (the case's own empty folder),
`{file}` / `{dir}` (an existing file / directory in it) and the names of the fixtures passed to
`run_case` as `{name}`. Per-command tables live in `tests/bad_inputs/test_<command>.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    message: str  # must appear in the one error line
    rc: int = 2
    id: str = ""

    def __str__(self) -> str:
        return self.id or " ".join(self.args)[:60]


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_case(case: Case, tmp_path: Path, capsys, **fixtures) -> str:
    """Run one case; returns its error line."""
    from cltrace.cli import main

    (tmp_path / "a_file.txt").write_text("not a directory\n")
    (tmp_path / "a_dir").mkdir(exist_ok=True)
    subs = {"tmp": str(tmp_path), "file": str(tmp_path / "a_file.txt"),
            "dir": str(tmp_path / "a_dir"), **{k: str(v) for k, v in fixtures.items()}}
    args = [a.format(**subs) for a in case.args]
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own refusals (exit 2, usage + one error line)
        rc = e.code
    out = capsys.readouterr()
    assert rc == case.rc, f"{args}: exit {rc}, expected {case.rc}\n{out.err[-2000:]}"
    assert "Traceback" not in out.err, out.err
    lines = [ln for ln in out.err.splitlines() if "error:" in ln]
    assert len(lines) == 1, f"{args}: expected one error line, got {out.err[-2000:]!r}"
    assert case.message in lines[0], f"{args}: {lines[0]!r} lacks {case.message!r}"
    assert snapshot(tmp_path) == before, f"{args} wrote {snapshot(tmp_path) - before}"
    return lines[0]
