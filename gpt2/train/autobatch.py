"""`micro_batch_size=auto`: the largest micro-batch that trains in this GPU's memory.

Candidates are the divisors of the per-rank sequences per optimizer step (so the gradient accumulation
stays an integer); a binary search over them runs one forward + backward of the bare model per probe,
with the optimizer's state and DDP's gradient buckets reserved up front. The eager model is probed:
torch.compile'd training needs less activation memory, so the choice errs on the safe side.
CUDA only: on other devices there is no memory to measure, and `resolve_micro_batch_size` says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from gpt2.config import TrainConfig
from gpt2.errors import UserError
from gpt2.runtime.device import autocast, resolve_precision

log = logging.getLogger("gpt2")

HEADROOM = 0.05
"""Fraction of the GPU's memory kept free on top of what a probe used (allocator fragmentation, evals)."""


def candidate_sizes(total_batch_tokens: int, block_size: int, world_size: int) -> list[int]:
    """Micro-batch sizes that divide the sequences one rank sees per optimizer step, smallest first."""
    per_rank = total_batch_tokens // (block_size * world_size)
    return [b for b in range(1, per_rank + 1) if per_rank % b == 0]


def largest_fitting(candidates: list[int], fits: Callable[[int], bool]) -> int | None:
    """Binary search for the largest candidate with fits(candidate) true, assuming that fitting is
    monotone (a batch that fits means every smaller one fits). None when even the smallest fails."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _reserved_bytes(model: nn.Module, distributed: bool) -> int:
    """Memory the real run needs beyond one forward/backward: AdamW's two fp32 moments per parameter
    (Muon needs less), plus DDP's gradient buckets (one more gradient copy)."""
    param_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    return param_bytes * (3 if distributed else 2)


def fits_in_memory(model: nn.Module, batch: int, block_size: int, device: torch.device, precision: str,
                   reserve_bytes: int) -> bool:
    """Whether one training forward + backward of (batch, block_size) tokens runs out of CUDA memory, with
    `reserve_bytes` and HEADROOM of the card held back. Leaves no gradients and the RNG streams untouched."""
    total = torch.cuda.get_device_properties(device).total_memory
    held: list[torch.Tensor] = []
    try:
        with torch.random.fork_rng(devices=[device]):
            held.append(torch.empty(reserve_bytes + int(HEADROOM * total), dtype=torch.uint8, device=device))
            x = torch.zeros(batch, block_size, dtype=torch.long, device=device)  # (B, T)
            with autocast(device, precision):
                loss = model(x, x).loss
            loss.backward()
            torch.cuda.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        held.clear()
        loss = x = None  # noqa: F841 (drop the graph before emptying the cache)
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def resolve_micro_batch_size(cfg: TrainConfig, build: Callable[[], nn.Module], device: torch.device,
                             world_size: int) -> int:
    """The largest micro-batch in `candidate_sizes` that `fits_in_memory` for a throwaway bare model from
    `build()` (built with the RNG streams forked, so the real init is unchanged); every rank then takes the
    smallest rank's answer. UserError off CUDA, under FSDP, or when not even one sequence fits."""
    distributed = cfg.distributed.name
    if device.type != "cuda":
        raise UserError(f"micro_batch_size=auto needs a CUDA device (it measures GPU memory), but training runs on "
                        f"{device.type}; set a number instead, e.g. micro_batch_size=8.")
    if distributed == "fsdp":
        raise UserError("micro_batch_size=auto is not supported with distributed=fsdp (the probe runs the unsharded "
                        "model); set a number, e.g. micro_batch_size=8.")
    precision = resolve_precision(cfg.precision.name, device)
    candidates = candidate_sizes(cfg.total_batch_tokens, cfg.block_size, world_size)
    with torch.random.fork_rng(devices=[device]):
        probe = build().to(device).train()
    reserve = _reserved_bytes(probe, distributed == "ddp" and world_size > 1)
    best = largest_fitting(candidates, lambda b: fits_in_memory(probe, b, cfg.block_size, device, precision, reserve))
    probe.to("meta")  # free its GPU memory now (the caller builds the real model next)
    torch.cuda.empty_cache()
    found = torch.tensor(best or 0, device=device)
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
    if int(found) == 0:
        raise UserError(f"micro_batch_size=auto: not even one sequence of block_size={cfg.block_size} trains in "
                        f"this GPU's memory; lower block_size or use a smaller model.")
    log.info("micro_batch_size=auto: %d (largest of %s that fits on %s)", int(found), candidates,
             torch.cuda.get_device_name(device))
    return int(found)
