"""The training/validation batch loader over one token stream (`gpt2.data.shards.TokenStream`, any
number of shards): deterministic, rank-sharded and resumable (its position is part of the checkpoint)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from gpt2.config import DataConfig, TokenizerConfig, UserError
from gpt2.data.shards import TokenStream

if TYPE_CHECKING:
    from gpt2.data.prepare import PreparedData

log = logging.getLogger(__name__)


class TokenLoader:
    """Batches of (x, y) windows from a token stream, deterministic and resumable.

    The stream (one or many shards; a window may span a shard boundary) is cut into
    non-overlapping windows of block_size + 1 tokens (stride block_size).
    Each epoch visits them in a permutation seeded by seed + epoch (or in order when shuffle is
    False); rank r takes every world_size-th window, and every rank gets the same number of
    windows per epoch, so all ranks share one (epoch, position) state.
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
            buf[i] = self.stream.read(w * T, w * T + T + 1)
            self.position += 1
            if self.position == self.windows_per_rank:
                self.epoch, self.position = self.epoch + 1, 0
        data = torch.from_numpy(buf)  # (B, T+1)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()  # (B, T), (B, T)

    def reset(self) -> None:
        """Restart from the first batch of epoch 0 (validation: the same batches every time)."""
        self.epoch, self.position = 0, 0

    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts: (epoch, position) in this rank's window order, and for
        the record the (shard, offset) of that window's first token."""
        shard, offset = self.stream.locate(int(self._windows(self.epoch)[self.position]) * self.block_size)
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": int(self.shuffle),
            "block_size": self.block_size, "world_size": self.world_size, "n_windows": self.n_windows,
            "n_tokens": self.n_tokens, "shard": shard, "offset": offset,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where the saved loader stopped. A different world_size keeps the same share of
        the epoch done (approximately); a different corpus, block_size, seed or shuffle is refused."""
        for key in ("block_size", "n_windows", "seed", "shuffle", "n_tokens"):
            if key not in state:  # n_tokens: checkpoints written before shards
                continue
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


# --------------------------------------------------------------- preparation across ranks

POLL_S = 1.0
"""How often waiting ranks look whether rank 0 has finished preparing."""
WAIT_LOG_S = 60.0
"""How often waiting ranks log that they are still waiting."""


def prepare_on_main_rank(cfg: DataConfig, is_main: bool, should_stop: Callable[[], bool] | None = None,
                         tokenizer: TokenizerConfig | None = None) -> PreparedData:
    """Rank 0 prepares the data; the other ranks wait for it without a deadline, then reuse it.

    No collective is used while waiting (a barrier would time out after distributed.timeout_s on a
    long preparation): rank 0 publishes "ok" or its error in the process group's key-value store,
    and the others poll that key, logging every minute. A store that stops answering means the
    preparing rank died: a clear error.
    """
    import torch.distributed as dist

    from gpt2.data.prepare import prepare as D
    if not dist.is_initialized():
        return D.prepare_data(cfg, should_stop, tokenizer)
    store = dist.distributed_c10d._get_default_store()
    key = f"gpt2/data-prepared/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if is_main:
        try:
            prepared = D.prepare_data(cfg, should_stop, tokenizer)
        except D.PreparationInterrupted:
            store.set(key, "interrupted")
            raise
        except BaseException as e:
            store.set(key, f"failed: {type(e).__name__}: {e}"[:2000])
            raise
        store.set(key, "ok")
        return prepared
    t0 = last_log = time.time()
    while True:
        try:
            ready = store.check([key])
            status = store.get(key).decode() if ready else None
        except Exception as e:  # the store lives with rank 0 (or torchrun's agent): it is gone
            raise UserError(f"rank 0, which prepares the data, stopped answering ({type(e).__name__}: {e}); "
                            f"see its log for the cause, then rerun (preparation resumes where it stopped).") from e
        if status == "ok":
            return D.prepare_data(cfg, should_stop, tokenizer)  # the cache is there (or this node prepares its own)
        if status == "interrupted":
            raise D.PreparationInterrupted("rank 0 was interrupted while preparing the data; rerun to resume")
        if status is not None:
            raise UserError(f"rank 0 could not prepare the data: {status}")
        if should_stop is not None and should_stop():
            raise D.PreparationInterrupted("interrupted while waiting for rank 0 to prepare the data")
        if time.time() - last_log >= WAIT_LOG_S:
            log.info("waiting for rank 0 to prepare the data (%.0f min so far)", (time.time() - t0) / 60)
            last_log = time.time()
        time.sleep(POLL_S)
