"""Weighted mixtures of corpora (data=mix): every source is prepared once into its own cache folder with the
run's one tokenizer, and `MixtureLoader` draws training windows from the sources in a deterministic, seeded
interleaving that hits the weights, repeats a source that runs out, and resumes exactly at any world size.

The interleaving: the global sequence of windows is cut into blocks of BLOCK windows; in every block source k
holds exactly its quota (its weight x BLOCK, rounded by largest remainder) of the positions, shuffled by a
generator seeded with (seed, block). So any run of a few blocks matches the weights to within a window per
block, and the source of window g and its index within that source follow from g alone: the position is the
count of windows consumed, as in gpt2.data.loader.TokenLoader, and carries over to any world size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpt2.config import DataConfig, TokenizerConfig
from gpt2.data.corpus import PreparedData
from gpt2.data.loader import TokenLoader
from gpt2.data.preprocess import prepare_on_ranks, run_tokenizer
from gpt2.data.shards import TokenStream
from gpt2.errors import UserError
from gpt2.runtime.distributed import main_rank_first

log = logging.getLogger(__name__)

BLOCK = 1024
"""Windows per interleaving block: the weights hold exactly within every block (up to one window per source)."""


@dataclass
class MixturePart:
    """One prepared source of a mixture."""

    name: str
    weight: float
    """Normalised: the weights of a mixture's parts sum to 1."""
    prepared: PreparedData


@dataclass
class PreparedMixture:
    """Every source of a mixture, prepared with the run's tokenizer."""

    parts: list[MixturePart]
    tokenizer: Any


def prepare_mixture(cfg: DataConfig, tokenizer: TokenizerConfig | None = None,
                    should_stop: Callable[[], bool] | None = None) -> PreparedMixture:
    """Each source of data=mix prepared (rank 0 first) into its own cache folder, all with one tokenizer: the
    GPT-2 encoding, a tokenizer.json, or our BPE trained once on the documents of all the sources. A shards
    source prepared with another tokenizer is refused (gpt2.data.corpus.external_shards)."""
    tcfg = tokenizer or TokenizerConfig()
    tok = main_rank_first(lambda: run_tokenizer(tcfg, cfg), "prepare the tokenizer", should_stop)
    parts = []
    for name, weight, part in cfg.parts():
        parts.append(MixturePart(name, weight, prepare_on_ranks(part, tcfg, should_stop, tok=tok)))
    return PreparedMixture(parts, tok)


def block_quotas(weights: list[float], block: int = BLOCK) -> np.ndarray:
    """Windows of each source per block: weight x block, rounded by largest remainder (every source >= 1)."""
    exact = np.asarray(weights, dtype=np.float64) * block
    quota = np.maximum(np.floor(exact).astype(np.int64), 1)
    while quota.sum() < block:
        quota[int(np.argmax(exact - quota))] += 1
    while quota.sum() > block:
        quota[int(np.argmax(quota - exact))] -= 1
    return quota


class MixtureLoader:
    """Batches of (x, y) windows drawn from several token streams by weight; the interface of TokenLoader."""

    def __init__(self, streams: list[TokenStream], weights: list[float], names: list[str], batch_size: int,
                 block_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.names, self.streams = list(names), list(streams)
        self.batch_size, self.block_size = batch_size, block_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        # Each source's own endless sequence of shuffled epochs (seeded apart from the others').
        self.sources = [TokenLoader(s, batch_size, block_size, seed=seed + 7919 * (k + 1))
                        for k, s in enumerate(streams)]
        self.quota = block_quotas(weights)
        self.consumed = 0
        """Windows of the global sequence consumed so far, by all ranks together."""
        self._block_index = -1
        self._counts = np.zeros((len(streams), BLOCK + 1), dtype=np.int64)
        self._owner = np.zeros(BLOCK, dtype=np.int64)
        self._epochs_logged = [0] * len(streams)
        self.tokens = None  # no single val split: the trainer scores each source's own

    def _block(self, b: int) -> None:
        """Which source owns each position of block b, and the running count of each source's positions."""
        if b == self._block_index:
            return
        owner = np.repeat(np.arange(len(self.streams)), self.quota)
        self._owner = np.random.default_rng([self.seed, b]).permutation(owner)
        one_hot = self._owner[None, :] == np.arange(len(self.streams))[:, None]  # (K, BLOCK)
        self._counts[:, 1:] = np.cumsum(one_hot, axis=1)
        self._block_index = b

    def source_windows(self, k: int, g: int) -> int:
        """Windows of source k among the first g of the global sequence."""
        b, i = divmod(g, BLOCK)
        self._block(b)
        return b * int(self.quota[k]) + int(self._counts[k, i])

    def window(self, g: int) -> tuple[int, int]:
        """(source, window of that source) at position g of the global sequence."""
        b, i = divmod(g, BLOCK)
        self._block(b)
        k = int(self._owner[i])
        return k, self.sources[k].window(self.source_windows(k, g))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 of shape (batch_size, block_size): targets y are inputs x shifted left by one."""
        B, T, W = self.batch_size, self.block_size, self.world_size
        buf = np.empty((B, T + 1), dtype=np.int64)
        for i in range(B):
            k, w = self.window(self.consumed + self.rank + i * W)
            buf[i] = self.streams[k].read(w * T, w * T + T + 1)
        self.consumed += B * W
        self._log_epochs()
        data = torch.from_numpy(buf)  # (B, T+1)
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()  # (B, T), (B, T)

    def epochs(self) -> dict[str, int]:
        """The epoch each source is in (0 until it first runs out)."""
        return {n: self.source_windows(k, self.consumed) // self.sources[k].n_windows
                for k, n in enumerate(self.names)}

    def _log_epochs(self) -> None:
        if self.rank != 0:
            return
        for k, (name, epoch) in enumerate(self.epochs().items()):
            if epoch > self._epochs_logged[k]:
                self._epochs_logged[k] = epoch
                log.info("data source %s ran out: repeating it, epoch %d (its %d windows seen %d time(s))", name,
                         epoch + 1, self.sources[k].n_windows, epoch)

    def source_tokens(self) -> dict[str, int]:
        """Training tokens (targets) drawn from each source so far, over all ranks."""
        return {n: self.source_windows(k, self.consumed) * self.block_size for k, n in enumerate(self.names)}

    def reset(self) -> None:
        self.consumed = 0

    def state_dict(self) -> dict[str, Any]:
        """The global position, and for the checks on resume each source's size and the quotas."""
        return {"consumed": self.consumed, "seed": self.seed, "block_size": self.block_size,
                "quota": [int(q) for q in self.quota], "names": list(self.names),
                "n_windows": [s.n_windows for s in self.sources], "epochs": self.epochs()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved loader stopped, at any world size. A changed mixture (sources, their sizes,
        weights), block_size or seed is refused: the run would not continue the same data order."""
        mine = self.state_dict()
        for key in ("names", "n_windows", "quota", "block_size", "seed"):
            if state.get(key) != mine[key]:
                raise UserError(f"Cannot resume the data mixture: saved {key}={state.get(key)} but now {key}="
                                f"{mine[key]}; resume with the same data.sources, weights and block_size, or start "
                                f"a fresh run.")
        self.consumed = int(state["consumed"])
        self._epochs_logged = list(self.epochs().values())
