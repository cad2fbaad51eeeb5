"""Process group set-up, this rank's device, and DDP / FSDP2 wrapping (and unwrapping).

Works the same under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set by the launcher) and
inside SLURM jobs started by submitit (see gpt2/slurm.py), on CUDA (nccl) and CPU (gloo).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gpt2.config import ConfigError, DistributedConfig
from gpt2.runtime.device import resolve_device

log = logging.getLogger("gpt2")


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
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and cfg.name == "none":
        raise ConfigError(
            f"launched with WORLD_SIZE={world_size} but distributed=none; "
            "pass distributed=ddp or distributed=fsdp."
        )
    if cfg.name != "none" and "WORLD_SIZE" not in os.environ:  # documented choice: warn, then train on one rank
        log.warning("distributed=%s but this is one plain process (not started by torchrun or SLURM): it trains on "
                    "one rank without %s. For N processes run torchrun --nproc_per_node=N run_train.py "
                    "distributed=%s", cfg.name, cfg.name.upper(), cfg.name)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        if backend == "nccl" and dev.type != "cuda":
            raise ConfigError("distributed.backend=nccl needs CUDA devices; use distributed.backend=gloo on CPU.")
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
            device_id=dev if backend == "nccl" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def wrap_model(model: nn.Module, cfg: DistributedConfig, info: DistInfo) -> nn.Module:
    """DDP-wrap or FSDP2-shard `model` (already on its device). FSDP2 shards in place, so the
    returned module is the model itself; with DDP the bare model is `returned.module`."""
    if not info.enabled or cfg.name == "none":
        return model
    if cfg.name == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
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
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of `value` over ranks (identity when not distributed)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. a preemption signal). A collective, so
    also a barrier; `device` defaults to this rank's GPU under nccl, else the CPU."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_ranks(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank only if `flag` is true on every rank (see `any_rank`)."""
    return not any_rank(not flag, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
