"""`ShardWriter`: appends a split's tokens to ``<name>_NNNNNN.bin`` shards in a preparation's work folder,
resumable from the state it reports (the work folder is published as a whole once complete). Each finished
shard is recorded with its token count, sha256 and largest token id. `move_tail` moves the last tokens of one
split into another (the val split of a one-document corpus)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from gpt2.data.shards import HEADER_BYTES, TokenStream, shard_header
from gpt2.utils.download import sha256_file

log = logging.getLogger(__name__)


class ShardWriter:
    """Appends tokens to ``<name>_NNNNNN.bin`` shards of `shard_tokens`; resumable from its state."""

    def __init__(self, folder: Path, name: str, dtype: str, shard_tokens: int, state: dict[str, Any]) -> None:
        self.folder, self.name, self.dtype, self.shard_tokens = folder, name, dtype, shard_tokens
        self.itemsize = np.dtype(dtype).itemsize
        self.shards: list[dict[str, Any]] = list(state.get("shards", []))
        self.current = int(state.get("current_tokens", 0))
        self.current_max = int(state.get("current_max", -1))
        """The largest id in the shard being written (-1 while it is empty)."""
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
            if n:
                self.current_max = max(self.current_max, int(tokens[:n].max()))
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
                            "sha256": sha256_file(self.folder / self._file()), "max_id": self.current_max})
        log.info("finished shard %s (%d tokens)", self.shards[-1]["file"], self.current)
        self.current, self.current_max = 0, -1

    def sync(self) -> dict[str, Any]:
        if self.f is not None:
            self.f.flush()
            os.fsync(self.f.fileno())
        return {"shards": self.shards, "current_tokens": self.current, "current_max": self.current_max}

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def truncate(self, n_tokens: int) -> None:
        """Keep only the first `n_tokens` tokens of this split's finished shards: later shards are deleted, the
        one holding the cut is shortened in place (header, sha256 and largest id recomputed). Idempotent, so a
        truncation interrupted by a kill is simply done again."""
        if self.f is not None:
            raise RuntimeError("truncate needs every shard finished")
        kept, start = [], 0
        for shard in self.shards:
            path = self.folder / shard["file"]
            if start >= n_tokens:
                path.unlink(missing_ok=True)
                continue
            keep = min(shard["n_tokens"], n_tokens - start)
            if keep < shard["n_tokens"]:
                with open(path, "r+b") as f:
                    f.truncate(HEADER_BYTES + keep * self.itemsize)
                    f.seek(0)
                    f.write(shard_header(keep, self.dtype))
                    f.flush()
                    os.fsync(f.fileno())
                tokens = np.memmap(path, dtype=np.dtype(self.dtype).newbyteorder("<"), mode="r", offset=HEADER_BYTES,
                                   shape=(keep,))
                shard = {**shard, "n_tokens": keep, "sha256": sha256_file(path), "max_id": int(tokens.max())}
            kept.append(shard)
            start += shard["n_tokens"]
        self.shards = kept
        self.n_tokens = sum(s["n_tokens"] for s in kept)


MOVE_CHUNK = 1 << 24
"""Tokens copied at a time by `move_tail` (memory stays flat)."""


def move_tail(src: ShardWriter, dst: ShardWriter, n: int) -> None:
    """Copy the last `n` tokens of `src`'s finished shards into `dst` (finished as shards of their own), in
    chunks of MOVE_CHUNK tokens. `src` is not changed: truncate it afterwards."""
    stream = TokenStream([src.folder / s["file"] for s in src.shards])
    total = len(stream)
    for a in range(total - n, total, MOVE_CHUNK):
        dst.add(stream.read(a, min(a + MOVE_CHUNK, total), dtype=np.dtype(dst.dtype)))
    dst.finish_shard()
