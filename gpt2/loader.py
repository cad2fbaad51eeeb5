"""The training/validation batch loader over prepared uint16 token files: deterministic,
rank-sharded and resumable (its position is part of the checkpoint)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
import torch

from gpt2.config import UserError

log = logging.getLogger(__name__)

class TokenLoader:
    """Batches of (x, y) windows from a uint16 token file, deterministic and resumable.

    The file is cut into non-overlapping windows of block_size + 1 tokens (stride block_size).
    Each epoch visits them in a permutation seeded by seed + epoch (or in order when shuffle is
    False); rank r takes every world_size-th window, and every rank gets the same number of
    windows per epoch, so all ranks share one (epoch, position) state.
    """

    def __init__(self, path: str | os.PathLike[str], batch_size: int, block_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        self.path = str(path)
        n_tokens = os.path.getsize(self.path) // 2
        if n_tokens < block_size + 1:
            raise UserError(
                f"{self.path} holds {n_tokens} tokens, fewer than one window of block_size + 1 = {block_size + 1}; "
                f"lower block_size to at most {max(n_tokens - 1, 0)} or use a larger corpus / val_fraction."
            )
        self.n_tokens = n_tokens
        self.tokens = np.memmap(self.path, dtype=np.uint16, mode="r", shape=(n_tokens,))
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.n_windows = (n_tokens - 1) // block_size
        self.windows_per_rank = self.n_windows // world_size
        if self.windows_per_rank == 0:
            raise UserError(
                f"{self.path} holds {self.n_windows} windows of {block_size + 1} tokens, fewer than world_size="
                f"{world_size} ranks; lower block_size or use a larger corpus / val_fraction."
            )
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _windows(self, epoch: int) -> np.ndarray:
        """This rank's window indices for `epoch`."""
        if epoch != self._order_epoch:
            if self.shuffle:
                perm = np.random.default_rng(self.seed + epoch).permutation(self.n_windows)
            else:
                perm = np.arange(self.n_windows)
            self._order = perm[self.rank :: self.world_size][: self.windows_per_rank]
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 of shape (batch_size, block_size): targets y are inputs x shifted left by one."""
        B, T = self.batch_size, self.block_size
        buf = np.empty((B, T + 1), dtype=np.int64)
        for i in range(B):
            w = int(self._windows(self.epoch)[self.position])
            buf[i] = self.tokens[w * T : w * T + T + 1]
            self.position += 1
            if self.position == self.windows_per_rank:
                self.epoch, self.position = self.epoch + 1, 0
        data = torch.from_numpy(buf)  # (B, T+1)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()  # (B, T), (B, T)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def reset(self) -> None:
        """Restart from the first batch of epoch 0 (validation: the same batches every time)."""
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": int(self.shuffle),
            "block_size": self.block_size, "world_size": self.world_size, "n_windows": self.n_windows,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where the saved loader stopped. A different world_size keeps the same share of
        the epoch done (approximately); a different corpus, block_size, seed or shuffle is refused."""
        for key in ("block_size", "n_windows", "seed", "shuffle"):
            mine = int(self.shuffle) if key == "shuffle" else getattr(self, key)
            if int(state[key]) != mine:
                raise UserError(
                    f"Cannot resume the data loader: saved {key}={state[key]} but now {key}={mine} "
                    f"({self.path}); resume with the same data and block_size, or start a fresh run."
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if int(state["world_size"]) != self.world_size:
            self.position = self.position * int(state["world_size"]) // self.world_size
            log.warning("Data loader resumed with world_size %s -> %s; position rescaled to %d",
                        state["world_size"], self.world_size, self.position)
            if self.position >= self.windows_per_rank:
                self.epoch, self.position = self.epoch + 1, 0
