"""One checkpoint written or read: `write_checkpoint` is one collective, atomic save of a `CheckpointContent`,
`load_checkpoint` loads weights and optimizer state in place and returns the rest. When to save, what to
keep and where to resume is gpt2.checkpoint.manager's business; names and formats are gpt2.checkpoint.format's.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from gpt2.checkpoint.format import (
    COMPLETE,
    DCP_DIR,
    FORMAT,
    META,
    MODEL_FILE,
    OPTIMIZER_FILE,
    TRAINER_FILE,
    io_error,
    load_model_state,
    plain_state,
    rank_file,
    short_error,
    step_dir_name,
    torch_load,
    torch_save,
    upgrade_trainer_state,
)
from gpt2.checkpoint.store import delete_checkpoint
from gpt2.errors import UserError
from gpt2.model.gpt import check_state_shapes
from gpt2.runtime.distributed import all_ranks, unwrap_model
from gpt2.runtime.world import rank_and_world
from gpt2.utils.fs import atomic_write, fsync_path, rename_durably


@dataclass
class CheckpointContent:
    """Everything one checkpoint holds besides its step."""

    model: nn.Module
    """The (possibly DDP/FSDP/compile-wrapped) model; the bare module's weights are saved."""
    optimizer: torch.optim.Optimizer
    trainer_state: dict[str, Any]
    """The global training state (step, data position, scaler, ...), the same on every rank: rank 0 writes it."""
    rank_state: dict[str, Any]
    """This rank's own state (its RNG streams)."""
    record: dict[str, Any] = field(default_factory=dict)
    """What meta.json says about the run: config, plan, tokenizer."""
    files: dict[str, bytes] = field(default_factory=dict)
    """Extra files, e.g. the tokenizer.json the model's ids belong to."""
    val_loss: float | None = None
    """The last val loss (retention keeps the best checkpoint by it)."""


@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` returns besides the weights and optimizer state it loads in place."""

    path: Path
    step: int
    trainer_state: dict[str, Any]
    rank_state: dict[str, Any] | None
    """This rank's ``rank_XXXXX.pt``; None when saved at another world size or no file exists for this rank."""
    meta: dict[str, Any]


# ------------------------------------------------------------------ save


class _SaveJob:
    """One save in three agreed phases (prepare, write, publish): after each, the ranks agree that all
    succeeded; on any failure the partial ``.tmp`` dir is removed and a UserError names the cause."""

    def __init__(self, ckpt_dir: Path, step: int, content: CheckpointContent, sharded: bool) -> None:
        self.rank, world = rank_and_world()
        self.content = content
        self.sharded = sharded
        self.dir = ckpt_dir
        self.step = step
        self.final = ckpt_dir / step_dir_name(step)
        self.tmp = ckpt_dir / f"{self.final.name}.tmp"
        loss = content.val_loss
        self.meta: dict[str, Any] = {
            "format": FORMAT, "step": int(step), "val_loss": float(loss) if loss is not None and math.isfinite(loss)
            else None, **content.record, "world_size": world, "sharded": bool(sharded),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.error: BaseException | None = None

    def run(self, phase: Callable[[], None]) -> None:
        if self.error is None:
            try:
                phase()
            except Exception as e:
                self.error = e
        if all_ranks(self.error is None):
            return
        if self.rank == 0:
            delete_checkpoint(self.tmp)
        cause = io_error(self.error)
        if self.error is None or cause is not None:
            why = short_error(cause) if cause is not None else "another rank failed to write its part"
            raise UserError(f"could not write checkpoint to {self.final}: {why}; earlier checkpoints are intact.") \
                from self.error
        raise self.error

    def prepare(self) -> None:
        json.dumps(self.meta)  # fail early on a config that is not JSON
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            delete_checkpoint(self.tmp)
            self.tmp.mkdir()

    def write(self) -> None:
        c = self.content
        if self.sharded:
            from gpt2.checkpoint.dcp import save_sharded

            save_sharded(self.tmp / DCP_DIR, c.model, c.optimizer)
        if self.rank == 0:
            if not self.sharded:
                tensors, aliases = plain_state(c.model)
                self.meta["tied"] = aliases
                save_file(tensors, self.tmp / MODEL_FILE, metadata={"format": "pt", "aliases": json.dumps(aliases)})
                fsync_path(self.tmp / MODEL_FILE)
                torch_save(c.optimizer.state_dict(), self.tmp / OPTIMIZER_FILE)
            torch_save(c.trainer_state, self.tmp / TRAINER_FILE)
        torch_save(c.rank_state, self.tmp / rank_file(self.rank))

    def publish(self) -> None:
        """Rank 0: the extra files and meta.json, then COMPLETE, then the rename into place (a re-saved step
        keeps its old copy as ``.old`` until the new one is in place, so there is never neither)."""
        if self.rank != 0:
            return
        if (self.tmp / DCP_DIR).is_dir():
            fsync_path(self.tmp / DCP_DIR)
        for name, data in self.content.files.items():
            atomic_write(self.tmp / name, data)
        atomic_write(self.tmp / META, json.dumps(self.meta, indent=2))
        atomic_write(self.tmp / COMPLETE, f"{self.step}\n")
        fsync_path(self.tmp)
        if self.final.exists():
            old = self.dir / f"{self.final.name}.old"
            delete_checkpoint(old)
            rename_durably(self.final, old)
            rename_durably(self.tmp, self.final)
            delete_checkpoint(old)
        else:
            rename_durably(self.tmp, self.final)


def write_checkpoint(ckpt_dir: Path, step: int, content: CheckpointContent, *, sharded: bool) -> Path:
    """Write checkpoint `step` as ``ckpt_dir/step_XXXXXXXX/``. Collective when torch.distributed is initialized:
    every rank calls it. On any failure the partial ``.tmp`` dir is removed, earlier checkpoints are untouched,
    and a UserError names the cause. Returns the final directory."""
    job = _SaveJob(Path(ckpt_dir), step, content, sharded)
    job.run(job.prepare)
    job.run(job.write)
    job.run(job.publish)
    return job.final


# ------------------------------------------------------------------ load


def load_checkpoint(ckpt: Path, meta: dict[str, Any], *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None, sharded: bool) -> LoadedCheckpoint:
    """Load weights (and optimizer state when given) of checkpoint `ckpt` (its `meta` already read) in place;
    return step, trainer state and this rank's state.

    ``rank_state`` is None when the checkpoint was written at another world size (per-rank RNG streams do
    not carry over) or has no file for this rank. Collective for sharded checkpoints (every rank calls it);
    plain checkpoints are read by each rank."""
    rank, world = rank_and_world()
    bare = unwrap_model(model)
    if meta.get("sharded") and (ckpt / DCP_DIR).is_dir():
        from gpt2.checkpoint.dcp import load_sharded

        load_sharded(ckpt / DCP_DIR, bare, optimizer)
    else:
        _load_plain(ckpt, bare, optimizer, sharded)
    trainer_state = torch_load(ckpt / TRAINER_FILE)
    if not isinstance(trainer_state, dict):
        raise UserError(f"{ckpt / TRAINER_FILE} holds a {type(trainer_state).__name__}, not a dict.")
    trainer_state = upgrade_trainer_state(trainer_state, ckpt)
    rpath = ckpt / rank_file(rank)
    same_world = meta.get("world_size") == world
    rank_state = torch_load(rpath) if same_world and os.path.exists(rpath) else None
    return LoadedCheckpoint(path=ckpt, step=meta["step"], trainer_state=trainer_state, rank_state=rank_state,
                            meta=meta)


def _load_plain(ckpt: Path, bare: nn.Module, optimizer: torch.optim.Optimizer | None, sharded: bool) -> None:
    """model.safetensors (+ optimizer.pt) into a plain or FSDP-sharded model."""
    state = load_model_state(ckpt)
    check_state_shapes({k: tuple(v.shape) for k, v in bare.state_dict().items()},
                       {k: tuple(v.shape) for k, v in state.items()}, str(ckpt / MODEL_FILE))
    if sharded:
        from gpt2.checkpoint.dcp import load_full_into_sharded

        load_full_into_sharded(bare, state)
    else:
        bare.load_state_dict(state)
    if optimizer is None:
        return
    if sharded:
        raise UserError(f"{ckpt} was saved without FSDP; its optimizer state cannot be resumed under "
                        f"distributed=fsdp. Resume with distributed=ddp or none, or load weights only.")
    opt_state = torch_load(ckpt / OPTIMIZER_FILE)
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{ckpt / OPTIMIZER_FILE} does not match the optimizer ({short_error(e)}); resume with "
                        f"the optimizer settings the checkpoint was trained with.") from None
