"""Bit-for-bit repeatable runs: the one place that switches PyTorch (eager and torch.compile) to deterministic
kernels, for the `deterministic` setting of a run.

Same seed, data, machine, software and thread count: with the switch on, two runs produce the same losses to
the last bit, compiled or not, in every precision. What it sets:

- `torch.use_deterministic_algorithms(True)`: an eager op with a nondeterministic kernel uses a deterministic
  one (or raises naming the op). It also sets `torch._inductor.config.deterministic` (no kernel, padding or
  reduction config chosen by timing), and Inductor reads it while lowering: `index_put(accumulate=True)`, the
  token embedding's backward, falls back to ATen's deterministic kernel instead of a parallel C++ loop of
  atomic adds, whose order (with more than one CPU thread) changes from run to run, and with it the last bits
  of the gradient of every token that occurs more than once in a batch.
- `torch.utils.deterministic.fill_uninitialized_memory = False`: PyTorch's default under the first setting fills
  every `torch.empty` with NaN, a bug detector for kernels that read memory they did not write, not part of
  repeatability; it cost 20% of the quickstart recipe's tokens/s on CPU, while the switch without it costs
  about 1%, within the noise (benchmarks/deterministic.py, figures in benchmarks/RESULTS.md).
- `CUBLAS_WORKSPACE_CONFIG=:4096:8` (unless set already), which cuBLAS needs for deterministic matmuls.

Inductor's compile cache keys on the setting, so a kernel compiled without it is not reused with it.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS workspace setting that makes its matmuls deterministic (CUDA >= 10.2)."""


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels on (`enabled`) or PyTorch's defaults (off), process-wide; call it before the
    first CUDA matmul and before torch.compile traces the model."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.utils.deterministic.fill_uninitialized_memory = not enabled  # off: PyTorch's default (True)
