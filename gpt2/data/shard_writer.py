"""`ShardWriter`: appends a split's tokens to ``<name>_NNNNNN.bin`` shards in a preparation's work folder,
resumable from the state it reports (the work folder is published as a whole once complete)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from gpt2.data.shards import HEADER_BYTES, shard_header
from gpt2.utils.download import sha256_file

log = logging.getLogger(__name__)


class ShardWriter:
    """Appends tokens to ``<name>_NNNNNN.bin`` shards of `shard_tokens`; resumable from its state."""

    def __init__(self, folder: Path, name: str, dtype: str, shard_tokens: int, state: dict[str, Any]) -> None:
        self.folder, self.name, self.dtype, self.shard_tokens = folder, name, dtype, shard_tokens
        self.itemsize = np.dtype(dtype).itemsize
        self.shards: list[dict[str, Any]] = list(state.get("shards", []))
        self.current = int(state.get("current_tokens", 0))
        self.n_tokens = sum(s["n_tokens"] for s in self.shards) + self.current
        self.header_bytes = HEADER_BYTES
        self.f: Any = None
        for stale in folder.glob(f"{name}_*.bin"):  # written after the last saved state: redone
            if int(stale.stem.rsplit("_", 1)[1]) > len(self.shards) or (self.current == 0 and
                                                                         stale.name == self._file()):
                stale.unlink()
        if self.current:
            self.f = open(folder / self._file(), "r+b")
            self.f.truncate(HEADER_BYTES + self.current * self.itemsize)
            self.f.seek(0, os.SEEK_END)

    def _file(self) -> str:
        return f"{self.name}_{len(self.shards):06d}.bin"

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.f is None:
                self.f = open(self.folder / self._file(), "wb")
                self.f.write(shard_header(0, self.dtype))
            n = min(len(tokens), self.shard_tokens - self.current)
            self.f.write(tokens[:n].tobytes())
            self.current += n
            self.n_tokens += n
            tokens = tokens[n:]
            if self.current == self.shard_tokens:
                self.finish_shard()

    def finish_shard(self) -> None:
        """Write the header's token count, sync, and record the shard with its sha256."""
        if self.f is None:
            return
        self.f.seek(0)
        self.f.write(shard_header(self.current, self.dtype))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        self.shards.append({"file": self._file(), "n_tokens": self.current,
                            "sha256": sha256_file(self.folder / self._file())})
        log.info("finished shard %s (%d tokens)", self.shards[-1]["file"], self.current)
        self.current = 0

    def sync(self) -> dict[str, Any]:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
        return {"shards": self.shards, "current_tokens": self.current}

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
