"""The training/validation batch loader over one token stream (`gpt2.data.shards.TokenStream`, any number of
shards): deterministic, rank-sharded, and resumable at any world size (its position is global)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from gpt2.data.shards import TokenStream
from gpt2.errors import UserError

log = logging.getLogger(__name__)


class TokenLoader:
    """Batches of (x, y) windows from a token stream.

    The stream (one or many shards; a window may span a shard boundary) is cut into non-overlapping windows
    of block_size + 1 tokens (stride block_size). All ranks read one global sequence of windows: epoch e is
    a permutation of all windows seeded by seed + e (in order when shuffle is False), and the epochs follow
    one another. Each micro-step consumes the next batch_size * world_size windows of that sequence, and
    rank r takes every world_size-th of them starting at its own rank. The position is the number of windows
    consumed, the same on every rank, so a resumed run reads exactly the windows the uninterrupted run would
    have read next, whatever the world size it resumes at (the global batch of an optimizer step is the same
    set of windows at any world size and micro-batch size).
    """

    def __init__(self, stream: TokenStream, batch_size: int, block_size: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        self.stream = stream
        self.tokens = stream
        """The whole split as one sliceable token sequence (``tokens[a:b]``), e.g. for evaluation."""
        more = len(stream.paths) - 1
        self.path = stream.paths[0] + (f" (+{more} shards)" if more else "")
        n_tokens = len(stream)
        if n_tokens < block_size + 1:
            raise UserError(
                f"{self.path} holds {n_tokens} tokens, fewer than one window of block_size + 1 = {block_size + 1}; "
                f"lower block_size to at most {max(n_tokens - 1, 0)} or use a larger corpus / val_fraction."
            )
        self.n_tokens = n_tokens
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.n_windows = (n_tokens - 1) // block_size
        if self.n_windows < world_size:
            raise UserError(
                f"{self.path} holds {self.n_windows} windows of {block_size + 1} tokens, fewer than world_size="
                f"{world_size} ranks; lower block_size or use a larger corpus / val_fraction."
            )
        self.consumed = 0
        """Windows of the global sequence consumed so far, by all ranks together."""
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        return self.consumed // self.n_windows

    def window(self, g: int) -> int:
        """The window at position g of the global sequence."""
        epoch, position = divmod(g, self.n_windows)
        if epoch != self._order_epoch:
            rng = np.random.default_rng(self.seed + epoch)
            self._order = rng.permutation(self.n_windows) if self.shuffle else np.arange(self.n_windows)
            self._order_epoch = epoch
        return int(self._order[position])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 of shape (batch_size, block_size): targets y are inputs x shifted left by one."""
        B, T, W = self.batch_size, self.block_size, self.world_size
        buf = np.empty((B, T + 1), dtype=np.int64)
        for i in range(B):
            w = self.window(self.consumed + self.rank + i * W)
            buf[i] = self.stream.read(w * T, w * T + T + 1)
        self.consumed += B * W
        data = torch.from_numpy(buf)  # (B, T+1)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()  # (B, T), (B, T)

    def reset(self) -> None:
        """Restart from the first batch of epoch 0."""
        self.consumed = 0

    def source_tokens(self) -> dict[str, int]:
        """Tokens drawn from each source of a mixture (gpt2.data.mixture); a single corpus has none to report."""
        return {}

    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts: windows consumed (global), and for the record the epoch, the position
        in it and the (shard, offset) of the next window's first token."""
        shard, offset = self.stream.locate(self.window(self.consumed) * self.block_size)
        return {
            "consumed": self.consumed, "epoch": self.epoch, "position": self.consumed % self.n_windows,
            "seed": self.seed, "shuffle": int(self.shuffle), "block_size": self.block_size,
            "n_windows": self.n_windows, "n_tokens": self.n_tokens, "shard": shard, "offset": offset,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where the saved loader stopped, at any world size; a different corpus, block_size, seed or
        shuffle is refused. (An older checkpoint's per-rank position reaches here converted to the global one:
        gpt2.checkpoint.format.upgrade_trainer_state.)"""
        for key in ("block_size", "n_windows", "seed", "shuffle", "n_tokens"):
            mine = int(self.shuffle) if key == "shuffle" else getattr(self, key)
            if key in state and int(state[key]) != mine:
                raise UserError(
                    f"Cannot resume the data loader: saved {key}={state[key]} but now {key}={mine} "
                    f"({self.path}); resume with the same data and block_size, or start a fresh run."
                )
        self.consumed = int(state["consumed"])
