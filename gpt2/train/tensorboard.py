"""TensorBoard event files of a run (logger=tensorboard or wandb_tensorboard), written by rank 0's `RunLogger`.

Every record of metrics.jsonl becomes scalars (one tag per key, the record's step and time) and every text
sample a text summary. The event files go into the run dir itself, so TensorBoard names a run after its folder:
`tensorboard --logdir multirun/<stamp>` overlays the jobs of a sweep (runs `0`, `1`, ...) and `--logdir outputs`
every run (`<date>/<time>-<suffix>`). A resumed run appends a new event file to the same folder; its first event
hides what the interrupted run logged after the checkpoint it resumes from (TensorBoard's purge), so each step
shows once, as the resumed run trained it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt2.errors import UserError


def text_summary(text: str) -> str:
    """A sample as TensorBoard shows it: a Markdown code block, so its line breaks and spaces stay."""
    return f"```\n{text}\n```"


class TensorBoardLog:
    """One run's event files; `resumed_at` is the step of the checkpoint a resumed run started from."""

    def __init__(self, run_dir: str | Path, resumed_at: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # the tensorboard package is a dependency of gpt2; a broken install lacks it
            raise UserError(f"logger=tensorboard needs the tensorboard package ({err}); pip install tensorboard, "
                            f"or choose logger=none or logger=wandb.") from None
        # Each session starts with a restart marker. TensorBoard takes the first one it reads as the run's start and
        # each later one as a restart, and hides what earlier sessions logged at or after that marker's step.
        purge_step = 0 if resumed_at is None else resumed_at + 1
        self.writer: Any = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def scalars(self, step: int, metrics: dict[str, float], walltime: float) -> None:
        """Every metric as a scalar at `step` (NaN and inf included, as metrics.jsonl holds them)."""
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), global_step=step, walltime=walltime)
        self.writer.flush()

    def text(self, step: int, name: str, text: str, walltime: float) -> None:
        self.writer.add_text(name, text_summary(text), global_step=step, walltime=walltime)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

