"""What a training run does around its steps: the run directory's lock, moving an old run aside
(`--no-resume`), the metrics log, Ctrl-C / SIGTERM handling at step boundaries, the progress
bar, and TensorBoard logging when a writer is installed."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from clt.configs import ConfigError
from clt.data import process_alive
from clt.io import atomic_write

# What a run directory holds (and `--no-resume` moves aside); anything else in it is left alone.
RUN_FILES = ("config.json", "transcoder_config.json", "checkpoints", "metrics.jsonl",
             "transcoder", "tensorboard")


def note(msg: str) -> None:
    print(f"cltrace: note: {msg}", file=sys.stderr)


class RunLock:
    """The lock of a run directory while a process trains in it: `out/.lock`, held with
    `flock` (released by the kernel however the process ends) and holding the pid, so a second
    process refuses naming the first. The lock of a process that is gone is taken over, with a
    note. Where `flock` is not supported (some network filesystems) the pid alone decides.
    `release()` empties the file, and removes it and `out` when this run created `out` and
    left nothing else in it (a run refused before it wrote anything)."""

    NAME = ".lock"

    def __init__(self, out: Path):
        self.out = Path(out)
        self.created = not self.out.exists()
        self.path = self.out / self.NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{self.out} is in use: process {holder or '(unknown)'} is "
                                  f"training in it (lock {self.path}); wait for it to end, or "
                                  "choose another --out") from None
            if holder and process_alive(holder):  # no flock here: trust a live pid on this host
                raise ConfigError(f"{self.out} is in use: process {holder} is training in it "
                                  f"(lock {self.path}); wait for it to end, or choose another "
                                  "--out") from None
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        old = _read_holder(fd)
        if old and old != os.getpid():
            note(f"took over the lock of {self.out} from process {old}, which is no longer "
                 "running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        try:
            if self.created and {p.name for p in self.out.iterdir()} <= {self.NAME}:
                self.path.unlink(missing_ok=True)
                self.out.rmdir()
        except OSError:
            pass
        os.close(self.fd)  # releases the flock
        self.fd = None


def _read_holder(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 64, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def move_aside(out: Path) -> Path | None:
    """Move the run in `out` (its `RUN_FILES`) to a new sibling directory `<out>.replaced-<time>`
    so that a fresh run (`--no-resume`) never mixes with it; returns that directory, or None if
    `out` held no run. Call it holding the run's lock."""
    entries = [out / name for name in RUN_FILES if (out / name).exists()]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.replaced-{stamp}")
    i = 1
    while aside.exists():
        aside, i = out.with_name(f"{out.name}.replaced-{stamp}-{i}"), i + 1
    try:
        aside.mkdir()
        for p in entries:
            os.rename(p, aside / p.name)
    except OSError as e:
        raise ConfigError(f"cannot move the previous run in {out} aside to {aside}: "
                          f"{e.strerror or e}; move or delete it yourself") from None
    return aside


class MetricsLog:
    """metrics.jsonl, one JSON row per logged step. Opening it for a run that resumes from
    `start_step` drops the rows after that step (a killed run logged steps its checkpoint does
    not hold: they are run again) and any half-written last line, rewriting the file atomically.
    A row is appended whole or not at all: a failed write (a full disk) is cut back off and
    becomes one ConfigError line."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        if path.exists():
            lines = path.read_bytes().split(b"\n")
            keep = [ln for ln in lines if _row_step(ln) is not None
                    and _row_step(ln) <= start_step]
            later = [ln for ln in lines if (_row_step(ln) or 0) > start_step]
            if later:
                note(f"{path}: dropped {len(later)} rows logged after step {start_step}, the "
                     "checkpoint this run resumes from (those steps run again)")
            if len(keep) != len([ln for ln in lines if ln.strip()]):
                atomic_write(path, b"".join(ln + b"\n" for ln in keep))
        self.file = open(path, "ab", buffering=0)  # noqa: SIM115 (closed by close())

    def write(self, row: dict, resume_hint=lambda: "") -> None:
        """Append `row`; `resume_hint()` ends the error message of a failed write."""
        size = self.file.seek(0, os.SEEK_END)
        try:
            self.file.write((json.dumps(row) + "\n").encode())
        except OSError as e:
            try:
                self.file.truncate(size)
            except OSError:
                pass
            raise ConfigError(f"cannot write {self.path}: {e.strerror or e}; the row of step "
                              f"{row.get('step')} was not written{resume_hint()}") from None

    def close(self) -> None:
        self.file.close()


def _row_step(line: bytes) -> int | None:
    try:
        row = json.loads(line)
        return int(row["step"])
    except (ValueError, KeyError, TypeError):
        return None


class Interrupts:
    """Until `restore()`, SIGTERM (a scheduler's preemption notice, `kill`) stops training as
    Ctrl-C does: a checkpoint is saved and the same command resumes. Inside `step()` (the step
    reuses the state's buffers, so until it returns there is no state to save) both wait for the
    step's end; a second one stops at once. Only the main thread can handle signals; elsewhere
    this does nothing and Ctrl-C keeps Python's default."""

    def __init__(self):
        self.in_step, self.pending = False, False
        self._old: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.in_step and not self.pending:
            self.pending = True
            return
        raise KeyboardInterrupt(f"signal {signum}")

    @contextmanager
    def step(self):
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt("signal during a step")

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class TrainBar:
    def __init__(self, enabled: bool, total: int, start: int):
        self.progress = None
        if enabled:
            from clt.progress import progress_bar

            self.progress = progress_bar(info=True, transient=False)
            self.task = self.progress.add_task("train", total=total, completed=start, info="")
            self.progress.start()

    def update(self, step: int, row: dict):
        if self.progress is not None:
            info = (f"loss {row['loss']:.4f}  nmse {row['nmse']:.3f}  L0 {row['l0']:.1f}  "
                    f"{row['tokens_per_s']:.0f} tok/s")
            self.progress.update(self.task, completed=step, info=info)

    def close(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def tensorboard_writer(out: Path):
    """A TensorBoard writer when tensorboardX or torch's tensorboard is installed, else None."""
    for mod in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            module = __import__(mod, fromlist=["SummaryWriter"])
            return module.SummaryWriter(str(out / "tensorboard"))
        except Exception:  # not installed (torch's needs the tensorboard package)
            continue
    return None


__all__ = ["RUN_FILES", "Interrupts", "MetricsLog", "RunLock", "TrainBar", "move_aside",
           "note", "tensorboard_writer"]
