"""`CheckpointManager`: one run's checkpoints (after torchtitan's components/checkpoint.py). Given the states
once (model, optimizer, the trainer's global state, this rank's RNG streams, what meta.json records), it
decides when a save is due (every N steps, every N minutes of wall time, final, preemption), writes it, keeps
the newest and the best, and loads a checkpoint back into the same states. Building one touches no files;
which checkpoint a run resumes is gpt2.checkpoint.handle.find_checkpoint's answer, and the start-up clean-up
is gpt2.checkpoint.store's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gpt2.checkpoint.format import checkpoints_dir
from gpt2.checkpoint.handle import Checkpoint
from gpt2.checkpoint.io import CheckpointContent, load_checkpoint, write_checkpoint
from gpt2.checkpoint.store import apply_retention
from gpt2.config import CheckpointConfig
from gpt2.runtime.distributed import any_rank
from gpt2.runtime.world import rank_and_world

log = logging.getLogger("gpt2")


class Stateful(Protocol):
    """What a checkpoint saves and restores (torch.distributed.checkpoint.stateful.Stateful's shape)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointManager:
    """Owns the cadence and retention of one run dir's checkpoints, and loading one back into the states.

    `trainer` is the global training state (rank 0 saves it), `rng` this rank's RNG streams (each rank saves
    its own); `max_steps` is the run plan's. `clock` (seconds) times the wall-time cadence; only rank 0's counts."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, *, max_steps: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer, trainer: Stateful, rng: Stateful, record: dict[str, Any],
                 files: dict[str, bytes] | None = None, val_loss: Callable[[], float | None] = lambda: None,
                 sharded: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.dir = checkpoints_dir(run_dir)
        self.cfg = cfg
        self.max_steps = max_steps
        self.model, self.optimizer, self.trainer, self.rng = model, optimizer, trainer, rng
        self.record, self.files, self.val_loss = record, files or {}, val_loss
        self.sharded = sharded
        self.is_main = rank_and_world()[0] == 0
        self.clock = clock
        self.last_save = clock()  # the wall-time cadence counts from the start of this process's run

    def due(self, step: int, *, final: bool = False, preempted: bool = False) -> bool:
        """Whether `save` writes at `step`: always on preemption; at the end when checkpoint.save_final; else,
        before the end, every checkpoint.interval steps and when checkpoint.interval_minutes passed since the
        last save of any kind. Collective when checkpoint.interval_minutes > 0: rank 0's clock decides for
        every rank, so all ranks save at the same step."""
        if preempted:
            return True
        if final:
            return self.cfg.save_final
        if step >= self.max_steps:
            return False
        if self.cfg.interval > 0 and step % self.cfg.interval == 0:
            return True
        if self.cfg.interval_minutes <= 0:
            return False
        elapsed = self.clock() - self.last_save
        return any_rank(self.is_main and elapsed >= self.cfg.interval_minutes * 60)

    def save(self, step: int, *, final: bool = False, preempted: bool = False) -> Path | None:
        """Collective: write checkpoint `step` from the states when one is `due`, then delete the ones retention
        does not keep. Returns its directory, or None when no save was due."""
        if not self.due(step, final=final, preempted=preempted):
            return None
        started = time.time()
        content = CheckpointContent(model=self.model, optimizer=self.optimizer,
                                    trainer_state=self.trainer.state_dict(), rank_state=self.rng.state_dict(),
                                    record=self.record, files=self.files, val_loss=self.val_loss())
        path = write_checkpoint(self.dir, step, content, sharded=self.sharded)
        self.last_save = self.clock()
        if self.is_main:
            apply_retention(self.dir, keep_last=self.cfg.keep_last, keep_best=self.cfg.keep_best, newest=path,
                            older_than=started)
        log.info("saved checkpoint %s", path)
        return path

    def load(self, ckpt: Checkpoint) -> None:
        """Load checkpoint `ckpt` into the states. The optimizer keeps the hyperparameters it was built with
        (this run's config wins), not the checkpoint's. The trainer's state is global, so it carries over at
        any world size; each rank's own state (RNG) only at the world size it was saved at."""
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        loaded = load_checkpoint(ckpt.path, ckpt.meta, model=self.model, optimizer=self.optimizer,
                                 sharded=self.sharded)
        for group, values in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(values)
        self.trainer.load_state_dict(loaded.trainer_state)
        if loaded.rank_state is not None:
            self.rng.load_state_dict(loaded.rank_state)
        elif rank_and_world()[0] == 0:
            log.warning("checkpoint %s was saved at world size %s and this run has %d rank(s): the data position "
                        "carries over exactly; each rank's RNG streams (dropout) restart from the seed", ckpt.path,
                        ckpt.meta.get("world_size"), rank_and_world()[1])
