"""Graceful preemption: turn SIGTERM / SIGUSR1 into a "checkpoint and exit" request.

SLURM (``--signal=USR1@90``), Kubernetes and torchrun send SIGTERM or SIGUSR1 some time before killing a job.
The first signal only sets ``requested``; the trainer checks it between steps, saves a checkpoint and exits
with ``PREEMPTED_EXIT_CODE`` so a wrapper can requeue the job. A second signal kills the process at once.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from types import FrameType
from typing import Any

from gpt2.errors import Interrupted

PREEMPTED_EXIT_CODE = 75
"""Exit status meaning "stopped early after preemption, checkpoint written, requeue me" (EX_TEMPFAIL)."""


class TrainingInterrupted(Interrupted):
    """Training stopped early on purpose (preemption signal); a checkpoint was written (unless it came while the
    corpus was being prepared). The entry point exits with `exit_code` so that a scheduler can requeue the job."""

    def __init__(self, message: str, exit_code: int = PREEMPTED_EXIT_CODE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class PreemptionHandler:
    """Record a preemption signal instead of dying; use ``with PreemptionHandler() as h:`` or install()/uninstall().

    ``requested`` is per process; in a distributed run combine it with `gpt2.runtime.distributed.any_rank` at the
    same point on every rank so that all of them stop at the same step.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signals = signals
        self.requested = False
        """True once a preemption signal arrived."""
        self.signal_name: str | None = None
        """Name of the first signal received, e.g. "SIGTERM"."""
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> PreemptionHandler:
        """Register the handlers (main thread only; elsewhere a warning and no-op). Returns self."""
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptionHandler.install() called outside the main thread; signals will not be "
                          "caught and preemption will kill the process without a checkpoint.", stacklevel=2)
            return self
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before install()."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            # Second signal: the scheduler is out of patience (or the user pressed twice); die now, by the signal.
            os.write(2, f"gpt2: second {name} received; exiting immediately without a checkpoint.\n".encode())
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            os._exit(128 + signum)  # only reached if the default action does not terminate
        self.requested = True
        self.signal_name = name
        # os.write, not print: print is not re-entrant and the signal may interrupt a print.
        os.write(2, f"gpt2: {name} received; will save a checkpoint and exit after the current step "
                    f"(send it again to exit immediately).\n".encode())
