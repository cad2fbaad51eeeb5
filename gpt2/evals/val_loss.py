"""Validation loss as an unbiased estimate of a whole split.

`select_windows` picks the windows once: every non-overlapping window of the split when it holds at
most `max_tokens` tokens (plus an end-aligned window for the tail, so every token but the first is
scored exactly once), else a fixed seeded random sample of windows, drawn without replacement from
the whole split (the same windows at every evaluation). `val_loss` scores them, split over ranks,
and returns the mean loss per scored token and how many tokens it covered.

Both work on any 1-D token sequence supporting len() and slicing (a numpy memmap of a split).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gpt2.errors import UserError
from gpt2.evals.batching import gather_rows, per_row_loss, rank_batches
from gpt2.runtime.world import rank_and_world


@dataclass(frozen=True)
class ValWindows:
    """Which windows of block_size + 1 tokens are scored."""

    starts: np.ndarray
    """Start offset of each window (int64, ascending)."""
    skip: np.ndarray
    """Leading targets of each window that are not scored (non-zero only for the tail window)."""
    block_size: int
    full: bool
    """True when the whole split is covered."""
    n_split_tokens: int

    @property
    def n_tokens(self) -> int:
        """Target tokens scored."""
        return int(len(self.starts) * self.block_size - self.skip.sum())


def select_windows(n_tokens: int, block_size: int, max_tokens: int, seed: int, max_windows: int = 0) -> ValWindows:
    """The windows to score on a split of `n_tokens` tokens.

    The whole split when it holds at most `max_tokens` tokens (max_tokens <= 0: always), else
    max_tokens // block_size windows drawn at random (seeded) from all of its windows.
    `max_windows` > 0 caps the number of windows the same way (a sample when there are more).
    """
    n_windows = (n_tokens - 1) // block_size
    if n_windows < 1:
        raise UserError(f"the validation split holds {n_tokens} tokens, fewer than one window of block_size + 1 = "
                        f"{block_size + 1}; lower block_size to at most {max(n_tokens - 1, 1)} or use a larger "
                        f"corpus / data.val_fraction.")
    budget = max_tokens // block_size if max_tokens > 0 else n_windows + 1
    if max_windows > 0:
        budget = min(budget, max_windows)
    budget = max(budget, 1)
    tail = (n_tokens - 1) - n_windows * block_size  # targets after the last whole window
    if n_windows + (tail > 0) <= budget:
        starts = list(range(0, n_windows * block_size, block_size))
        skip = [0] * n_windows
        if tail > 0:  # end-aligned: full context, only its last `tail` targets are new
            starts.append(n_tokens - 1 - block_size)
            skip.append(block_size - tail)
        return ValWindows(np.asarray(starts, dtype=np.int64), np.asarray(skip, dtype=np.int64), block_size,
                          full=True, n_split_tokens=n_tokens)
    chosen = np.sort(np.random.default_rng(seed).choice(n_windows, size=budget, replace=False))
    return ValWindows(chosen.astype(np.int64) * block_size, np.zeros(budget, dtype=np.int64), block_size,
                      full=False, n_split_tokens=n_tokens)


@dataclass(frozen=True)
class ValLoss:
    loss: float
    """Mean cross-entropy per scored token."""
    n_tokens: int
    """Tokens scored (over all ranks)."""
    n_windows: int
    full: bool
    """Whether the whole split was scored."""
    complete: bool = True
    """False when `should_stop` cut the evaluation short (the loss is then partial)."""

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


@torch.no_grad()
def val_loss(model: nn.Module, tokens: Sequence[int] | np.ndarray, windows: ValWindows, *, batch_size: int,
             device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             should_stop: Callable[[], bool] | None = None) -> ValLoss:
    """Mean loss per scored token over `windows` of `tokens`, split over the ranks of the process
    group (every rank returns the same number). `should_stop` is asked before each batch (on every
    rank, so it must agree across ranks); when it says stop, the result is marked incomplete."""
    T = windows.block_size
    n = len(windows.starts)
    rank, world_size = rank_and_world()
    was_training = model.training
    model.eval()
    index: list[int] = []
    sums: list[float] = []
    complete = True
    try:
        for batch in rank_batches(n, batch_size, rank, world_size):
            if should_stop is not None and should_stop():
                complete = False
                break
            ids = list(batch) if batch is not None else [0]  # dummy forward: FSDP needs every rank
            buf = np.stack([np.asarray(tokens[int(windows.starts[i]): int(windows.starts[i]) + T + 1], dtype=np.int64)
                            for i in ids])  # (B, T+1)
            data = torch.from_numpy(buf).to(device)
            x, y = data[:, :-1], data[:, 1:].clone()  # (B, T), (B, T)
            for row, i in enumerate(ids):
                y[row, : int(windows.skip[i])] = -1
            with autocast():
                logits = model(x).logits  # (B, T, V)
            if batch is None:
                continue
            sums.extend(per_row_loss(logits, y).double().sum(dim=1).tolist())
            index.extend(ids)
    finally:
        model.train(was_training)
    rows = np.asarray(sums, dtype=np.float64).reshape(-1, 1)
    per_window = gather_rows(rows, np.asarray(index, dtype=np.int64), n)[:, 0]  # (n,), NaN where not scored
    done = ~np.isnan(per_window)
    counts = T - windows.skip[done]
    total = float(per_window[done].sum())  # in window order: the same sum on every world size
    n_scored = int(counts.sum())
    loss = total / n_scored if n_scored else math.nan
    return ValLoss(loss=loss, n_tokens=n_scored, n_windows=int(done.sum()), full=windows.full and complete,
                   complete=complete)
