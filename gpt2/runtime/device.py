"""Device and precision: the one place that resolves `device=` and precision names, knows which
dtype a name means, whether bf16 is native, what a GPU's peak FLOP/s are, and builds autocast contexts
and the fp16 GradScaler.

Training, generation, evaluation and the benchmarks all ask this module (no other dtype tables); the
allowed names themselves are gpt2.config.PRECISIONS.
"""

from __future__ import annotations

import contextlib

import torch

from gpt2.config import PRECISIONS, check_device
from gpt2.errors import ConfigError, UserError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Precision name -> the dtype computations run in (auto is resolved per device, see `resolve_precision`)."""

PEAK_FLOPS_BF16: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}
"""Dense bf16 peak FLOP/s per device, by substring of torch.cuda.get_device_name() (or of budget.gpu)."""


def detect_peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s for a GPU name holding a key of PEAK_FLOPS_BF16 (any case), else None (MFU is
    then not reported)."""
    if not device_name:
        return None
    return next((flops for key, flops in PEAK_FLOPS_BF16.items() if key.lower() in device_name.lower()), None)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda if available, else cpu; plain `cuda` -> this local rank's GPU (see
    `gpt2.runtime.slurm.device_index`); cuda:N and cpu as given. ConfigError for missing CUDA or a bad name."""
    from gpt2.runtime.slurm import device_index

    check_device("device", device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
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
    """A concrete precision name for `device`: `auto` becomes bf16 where it is native (see
    `native_bf16`), else fp32. UserError for bf16 on a GPU without bf16 or an unknown name."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name not in DTYPES:
        raise ConfigError(f"precision {name!r} is not one of {', '.join(PRECISIONS)}.")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("precision=bf16 but this GPU has no bf16 support; use precision=fp16 or fp32.")
    return name


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for a precision name (`auto` resolved for `device`)."""
    return DTYPES[resolve_precision(name, device)]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes: torch.autocast in bf16/fp16, nothing for fp32."""
    dtype = DTYPES[precision]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, active only for fp16 (bf16 and fp32 have fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def set_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 matmuls/convolutions on CUDA (ignored elsewhere)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
