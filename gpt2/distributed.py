"""Process group set-up, device choice, and DDP / FSDP2 wrapping.

Works the same under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set by the launcher) and
inside SLURM jobs started by submitit (see gpt2/slurm.py), on CUDA (nccl) and CPU (gloo).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from gpt2.config import ConfigError, DistributedConfig


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


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda if available, else cpu; plain `cuda` -> this local rank's GPU (see
    `gpt2.slurm.device_index`); cuda:N and cpu as given. ConfigError for missing CUDA or a bad name."""
    from gpt2.slurm import device_index

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device={device!r} is not supported; use auto, cpu, cuda or cuda:N.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use device=cpu or device=auto.")
    if device == "cuda":
        return torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively (fast): CUDA with bf16 support, or a CPU with
    AVX512-BF16 or AMX (elsewhere CPU bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """`precision=auto` becomes bf16 where it is native (see `native_bf16`), else fp32."""
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) else "fp32"


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


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. a preemption signal)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
