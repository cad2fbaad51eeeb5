"""How evaluation items are split over ranks, and how per-item results come back together.

Items are cut into global batches of `batch_size` consecutive items, and batch j runs on rank
j % world_size. Every batch therefore holds the same items (and the same shapes) whatever the world
size, so per-item results are bit-identical to a single process; the results are gathered and
reduced in item order on every rank. All ranks run the same number of forwards (a rank without a
batch in the last round gets `None` and runs a dummy forward): FSDP forwards are collective.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist


def rank_batches(n_items: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[range | None]:
    """This rank's batches (ranges of item indices), one per round; None where it has no batch."""
    n_batches = math.ceil(n_items / batch_size)
    rounds = math.ceil(n_batches / world_size)
    for r in range(rounds):
        j = r * world_size + rank
        yield range(j * batch_size, min((j + 1) * batch_size, n_items)) if j < n_batches else None


def gather_rows(rows: np.ndarray, index: np.ndarray, n_items: int) -> np.ndarray:
    """Rows computed on this rank for items `index`, assembled into (n_items, ...) on every rank.
    Without a process group: placed by index (items never computed stay NaN)."""
    out = np.full((n_items, *rows.shape[1:]), np.nan, dtype=np.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[tuple[np.ndarray, np.ndarray] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (index, rows))
    else:
        parts = [(index, rows)]
    for idx, values in filter(None, parts):
        out[idx] = values
    return out


def per_row_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each target (B, T) in fp32, 0 where the target is -1 (not scored).
    Row by row, so that only one row's fp32 logits exist at a time."""
    out = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    for i in range(logits.size(0)):
        out[i] = torch.nn.functional.cross_entropy(logits[i].float(), targets[i], ignore_index=-1,
                                                   reduction="none")
    return out  # (B, T)
