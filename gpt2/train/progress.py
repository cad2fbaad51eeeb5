"""Training speed and progress on the console: tokens/s, MFU and ETA between log lines, the end-of-run
summary line, and a live progress bar on an interactive console (rank 0)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# Imported here, not lazily: importing rich draws from Python's `random`, and a run's RNG state must not
# depend on when (or whether) a progress bar first appears (seeding happens after this import).
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class Throughput:
    """Training time between log lines (evals and saves excluded): tokens/s, MFU and ETA."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_token * tokens_per_step
        self.peak_flops = peak_flops  # of all ranks together
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def flush(self) -> tuple[dict[str, float], float]:
        """perf/tokens_per_s (+ perf/mfu with a known peak) since the last flush, and the seconds per
        step (for an ETA); then start over."""
        dt = max(self.seconds, 1e-9)
        out = {"perf/tokens_per_s": self.steps * self.tokens_per_step / dt}
        if self.peak_flops:
            out["perf/mfu"] = self.flops_per_step * self.steps / dt / self.peak_flops
        per_step = dt / max(self.steps, 1)
        self.seconds, self.steps = 0.0, 0
        return out, per_step


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def run_summary(steps: int, tokens: int, seconds: float, val_loss: float, checkpoint: Path | None,
                plot: Path | None) -> str:
    """The end-of-run line: steps, tokens, time, final val loss, and where the checkpoint and plot are."""
    where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (checkpoint.save_final=false)"
    return (f"done: {steps:,} steps, {tokens:,} tokens in {format_duration(seconds)}; final val loss {val_loss:.4f}; "
            f"{where}; loss plot {plot if plot else '(none)'}")


class ProgressBar:
    """A rich progress bar on an interactive console (rank 0), otherwise nothing."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-")

    def __enter__(self) -> ProgressBar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")
