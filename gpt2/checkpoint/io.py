"""Checkpoints: `CheckpointManager` decides when to save, what to keep and where to resume (after
torchtitan's components/checkpoint.py); `save_checkpoint` / `load_checkpoint` do one collective, atomic
save or load. The on-disk format, discovery and deletion live in gpt2.checkpoint.format.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    checkpoints_dir,
    delete_checkpoint,
    find_latest,
    fsync_path,
    io_error,
    load_model_state,
    plain_state,
    rank_file,
    read_meta,
    remove_leftovers,
    resolve_checkpoint,
    short_error,
    step_dir_name,
    step_dirs,
    torch_load,
    torch_save,
)
from gpt2.config import CheckpointConfig, UserError
from gpt2.model.gpt import check_state_shapes
from gpt2.runtime.distributed import all_ranks, rank_and_world, unwrap_model
from gpt2.train.optim import hyperparameters, set_hyperparameters

log = logging.getLogger("gpt2")


@dataclass
class LoadedCheckpoint:
    """What `load_checkpoint` returns besides the weights and optimizer state it loads in place."""

    path: Path
    step: int
    trainer_state: dict[str, Any]
    rank_state: dict[str, Any] | None
    """This rank's ``rank_XXXXX.pt``; None when saved at another world size or no file exists for this rank."""
    meta: dict[str, Any]


class CheckpointManager:
    """Owns the save interval, retention, start-up clean-up and resume resolution of one run dir."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, *, sharded: bool, is_main: bool) -> None:
        self.dir = checkpoints_dir(run_dir)
        self.cfg = cfg
        self.sharded = sharded
        self.is_main = is_main
        if is_main:  # no save runs yet: half-deleted or interrupted dirs of an earlier process can go
            live = frozenset(p for _, p in step_dirs(self.dir))
            for p in remove_leftovers(self.dir, keep=live):
                log.info("removed the leftover %s of an interrupted save or deletion", p)

    def should_save(self, step: int, max_steps: int) -> bool:
        """A periodic save is due after `step` (the final one is `save_final`'s business)."""
        return self.cfg.interval > 0 and step % self.cfg.interval == 0 and step < max_steps

    @staticmethod
    def find_resume(resume: str | None, run_dir: Path) -> Path | None:
        """The checkpoint to resume from: `resume=auto` looks in this run dir, a path must hold one."""
        if not resume:
            return None
        if resume == "auto":
            found = find_latest(run_dir)
            log.info("resume=auto: %s", f"resuming from {found}" if found else
                     f"no checkpoint in {run_dir}, starting fresh")
            return found
        return resolve_checkpoint(resume)

    def save(self, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
             rank_state: dict, config: dict, plan: dict, val_loss: float | None, tokenizer: dict | None = None,
             files: dict[str, bytes] | None = None) -> Path:
        """Collective: write checkpoint `step` (with `files`, e.g. the tokenizer's), then purge the ones retention
        does not keep."""
        path = save_checkpoint(self.dir, step, model=model, optimizer=optimizer, trainer_state=trainer_state,
                               rank_state=rank_state, config=config, plan=plan, val_loss=val_loss,
                               tokenizer=tokenizer, files=files,
                               keep_last=self.cfg.keep_last, keep_best=self.cfg.keep_best, sharded=self.sharded)
        log.info("saved checkpoint %s", path)
        return path

    def load(self, path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> LoadedCheckpoint:
        """Weights, optimizer state and trainer/rank state of `path`. The optimizer keeps the hyperparameters
        it was built with (this run's config), not the checkpoint's."""
        if optimizer is None:
            return load_checkpoint(path, model=model, optimizer=None, sharded=self.sharded)
        settings = hyperparameters(optimizer)
        loaded = load_checkpoint(path, model=model, optimizer=optimizer, sharded=self.sharded)
        set_hyperparameters(optimizer, settings)
        return loaded


# ------------------------------------------------------------------ save


class _SaveJob:
    """One save in three agreed phases (prepare, write, publish): after each, the ranks agree that all
    succeeded; on any failure the partial ``.tmp`` dir is removed and a UserError names the cause."""

    def __init__(self, ckpt_dir: Path, step: int, meta: dict[str, Any], files: dict[str, bytes] | None = None) -> None:
        self.rank, _ = rank_and_world()
        self.files = files or {}
        self.dir = ckpt_dir
        self.step = step
        self.final = ckpt_dir / step_dir_name(step)
        self.tmp = ckpt_dir / f"{self.final.name}.tmp"
        self.meta = meta
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

    def write(self, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict, rank_state: dict,
              sharded: bool) -> None:
        if sharded:
            from gpt2.checkpoint.dcp import save_sharded

            save_sharded(self.tmp / DCP_DIR, model, optimizer)
        if self.rank == 0:
            if not sharded:
                tensors, aliases = plain_state(model)
                self.meta["tied"] = aliases
                save_file(tensors, self.tmp / MODEL_FILE, metadata={"format": "pt", "aliases": json.dumps(aliases)})
                fsync_path(self.tmp / MODEL_FILE)
                torch_save(optimizer.state_dict(), self.tmp / OPTIMIZER_FILE)
            torch_save(trainer_state, self.tmp / TRAINER_FILE)
        torch_save(rank_state, self.tmp / rank_file(self.rank))

    def publish(self) -> None:
        """Rank 0: meta.json, then COMPLETE, then the rename into place (a re-saved step keeps its old
        copy as ``.old`` until the new one is in place, so there is never neither)."""
        if self.rank != 0:
            return
        if (self.tmp / DCP_DIR).is_dir():
            fsync_path(self.tmp / DCP_DIR)
        for name, data in self.files.items():  # e.g. the tokenizer.json the model's ids belong to
            (self.tmp / name).write_bytes(data)
            fsync_path(self.tmp / name)
        (self.tmp / META).write_text(json.dumps(self.meta, indent=2))
        fsync_path(self.tmp / META)
        with open(self.tmp / COMPLETE, "w") as f:
            f.write(f"{self.step}\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_path(self.tmp)
        if self.final.exists():
            old = self.dir / f"{self.final.name}.old"
            delete_checkpoint(old)
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            fsync_path(self.dir)
            delete_checkpoint(old)
        else:
            os.replace(self.tmp, self.final)
        fsync_path(self.dir)


def save_checkpoint(root: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, rank_state: dict, config: dict, val_loss: float | None,
                    keep_last: int, keep_best: bool, sharded: bool, plan: dict | None = None,
                    tokenizer: dict | None = None, files: dict[str, bytes] | None = None) -> Path:
    """Write checkpoint `step` under ``root/checkpoints/`` (root = run dir; a dir named checkpoints is used as is).

    `config` is the run's config as composed, `plan` its run plan (with the model actually trained),
    `tokenizer` meta.json's record of the tokenizer and `files` extra files (its tokenizer.json) to include.
    Collective when torch.distributed is initialized: every rank calls it. Returns the final directory.
    On any failure the partial ``.tmp`` dir is removed and earlier checkpoints are untouched.
    """
    started = time.time()
    _, world = rank_and_world()
    loss = float(val_loss) if val_loss is not None and math.isfinite(val_loss) else None
    meta = {"format": FORMAT, "step": int(step), "val_loss": loss, "config": config, "plan": plan, "world_size": world,
            "sharded": bool(sharded), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer
    job = _SaveJob(checkpoints_dir(root), step, meta, files)
    job.run(job.prepare)
    job.run(lambda: job.write(model, optimizer, trainer_state, rank_state, sharded))
    job.run(job.publish)
    if job.rank == 0:
        apply_retention(job.dir, keep_last=keep_last, keep_best=keep_best, newest=job.final, older_than=started)
    return job.final


def apply_retention(ckpt_dir: Path, *, keep_last: int, keep_best: bool, newest: Path | None = None,
                    older_than: float | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last` (keeping the best by val_loss when keep_best,
    and `newest`), and interrupted ``*.tmp`` / ``*.old`` leftovers last modified before `older_than`.
    Each is retired atomically first (see `delete_checkpoint`)."""
    found = step_dirs(ckpt_dir)
    keep = {p for _, p in found[-max(keep_last, 1):]}
    if newest is not None:
        keep.add(newest)
    if keep_best:
        scored = [(read_meta(p)["val_loss"], s, p) for s, p in found]
        scored = [x for x in scored if isinstance(x[0], (int, float))]
        if scored:
            keep.add(min(scored, key=lambda x: (x[0], -x[1]))[2])
    removed = [p for _, p in found if p not in keep]
    for p in removed:
        delete_checkpoint(p)
    return removed + remove_leftovers(ckpt_dir, older_than=older_than, keep=frozenset(keep))


# ------------------------------------------------------------------ load


def load_checkpoint(ckpt: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    sharded: bool) -> LoadedCheckpoint:
    """Load weights (and optimizer state when given) in place; return step, trainer and this rank's state.

    ``rank_state`` is None when the checkpoint was written at another world size (per-rank data positions and
    RNG streams do not carry over) or has no file for this rank.

    Collective for sharded checkpoints (every rank calls it); plain checkpoints are read by each rank.
    """
    ckpt = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt)
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
    rpath = ckpt / rank_file(rank)
    same_world = meta.get("world_size") == world
    rank_state = torch_load(rpath) if same_world and rpath.exists() else None
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
