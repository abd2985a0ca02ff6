"""What a training run does around its steps: Ctrl-C / SIGTERM handling at step boundaries, the
progress bar, and TensorBoard logging when a writer is installed."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path


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


__all__ = ["Interrupts", "TrainBar", "tensorboard_writer"]
