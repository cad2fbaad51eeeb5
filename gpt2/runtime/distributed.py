"""Process group set-up, this rank's device, DDP / FSDP2 wrapping (and unwrapping), the collectives the
trainer and evaluations use, and `main_rank_first` (rank 0 does a long job while the others wait).

Works the same under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set by the launcher) and inside SLURM jobs
started by submitit (see gpt2.runtime.slurm), on CUDA (nccl) and CPU (gloo).
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as torch_dist
from torch import nn

from gpt2.config import DistributedConfig
from gpt2.errors import ConfigError, Interrupted, UserError
from gpt2.runtime import world as launch
from gpt2.runtime.device import resolve_device

log = logging.getLogger("gpt2")
T = TypeVar("T")


@dataclass
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: DistributedConfig, device: str) -> DistInfo:
    """Join the process group when launched with several ranks; pick this rank's device."""
    rank, world_size = launch.rank_and_world()
    local_rank = launch.local_rank()
    if world_size > 1 and cfg.name == "none":
        raise ConfigError(
            f"launched with WORLD_SIZE={world_size} but distributed=none; "
            "pass distributed=ddp or distributed=fsdp."
        )
    if cfg.name != "none" and not launch.launched_distributed():  # documented choice: warn, then train on one rank
        log.warning("distributed=%s but this is one plain process (not started by torchrun or SLURM): it trains on "
                    "one rank without %s. For N processes run torchrun --nproc_per_node=N run_train.py "
                    "distributed=%s", cfg.name, cfg.name.upper(), cfg.name)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not torch_dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        if backend == "nccl" and dev.type != "cuda":
            raise ConfigError("distributed.backend=nccl needs CUDA devices; use distributed.backend=gloo on CPU.")
        torch_dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
            device_id=dev if backend == "nccl" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def local_dist(device: str) -> DistInfo:
    """Where this process would sit in the job and compute, without joining a process group (the dry run)."""
    rank, world_size = launch.rank_and_world()
    return DistInfo(rank=rank, local_rank=launch.local_rank(), world_size=world_size,
                    device=resolve_device(device, launch.local_rank()))


def wrap_model(model: nn.Module, cfg: DistributedConfig, dist: DistInfo) -> nn.Module:
    """DDP-wrap or FSDP2-shard `model` (already on its device). FSDP2 shards in place, so the
    returned module is the model itself; with DDP the bare model is `returned.module`."""
    if not dist.enabled or cfg.name == "none":
        return model
    if cfg.name == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    # One FSDP unit per transformer block, then the root (embeddings, final norm, head).
    for block in model.transformer.h:  # type: ignore[union-attr]
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers; FSDP2
    shards in place, so a fully_shard'ed model is already bare."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over ranks (identity when not distributed)."""
    if torch_dist.is_initialized():
        value = value.clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        value /= torch_dist.get_world_size()
    return value


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. a preemption signal). A collective, so
    also a barrier; `device` defaults to this rank's GPU under nccl, else the CPU."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return flag
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch_dist.get_backend() == "nccl" else None
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_ranks(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank only if `flag` is true on every rank (see `any_rank`)."""
    return not any_rank(not flag, device)


def cleanup() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# --------------------------------------------------------------- rank 0 first

POLL_S = 1.0
"""How often waiting ranks look whether rank 0 has finished."""
WAIT_LOG_S = 60.0
"""How often waiting ranks log that they are still waiting."""
_calls = itertools.count()  # the same sequence on every rank: one store key per call


def main_rank_first(work: Callable[[], T], what: str, should_stop: Callable[[], bool] | None = None) -> T:
    """Run `work` on rank 0 while the other ranks wait, then on the other ranks, which find what rank 0
    prepared (downloads, prepared shards, a trained tokenizer) in the caches it filled. Without a process
    group it is just `work()`. `what` names the work in log lines and errors ("prepare the data").

    No collective is used while waiting (a barrier would time out after distributed.timeout_s on a long
    preparation): rank 0 publishes "ok", "interrupted" or its error under a key of the process group's
    store, and the others poll that key without a deadline, logging every minute. A store that stops
    answering means rank 0 died: a UserError. An interruption (rank 0's `Interrupted`, or `should_stop`
    on a waiting rank) is an `Interrupted` on every rank.
    """
    if not torch_dist.is_initialized():
        return work()
    store = torch_dist.distributed_c10d._get_default_store()
    slug = re.sub(r"\W+", "-", what).strip("-")
    key = f"gpt2/main-rank-first/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_calls)}/{slug}"
    if launch.is_main():
        try:
            result = work()
        except Interrupted:
            store.set(key, "interrupted")
            raise
        except BaseException as e:
            store.set(key, f"failed: {type(e).__name__}: {e}"[:2000])
            raise
        store.set(key, "ok")
        return result
    t0 = last_log = time.time()
    while True:
        try:
            status = store.get(key).decode() if store.check([key]) else None
        except Exception as e:  # the store lives with rank 0 (or torchrun's agent): it is gone
            raise UserError(f"rank 0, which was to {what}, stopped answering ({type(e).__name__}: {e}); see its "
                            f"log for the cause, then rerun (finished work is kept in the caches).") from e
        if status == "ok":
            return work()
        if status == "interrupted":
            raise Interrupted(f"rank 0 was interrupted while it was to {what}; rerun to resume")
        if status is not None:
            raise UserError(f"rank 0 could not {what}: {status}")
        if should_stop is not None and should_stop():
            raise Interrupted(f"interrupted while waiting for rank 0 to {what}")
        if time.time() - last_log >= WAIT_LOG_S:
            log.info("waiting for rank 0 to %s (%.0f min so far)", what, (time.time() - t0) / 60)
            last_log = time.time()
        time.sleep(POLL_S)
