"""Token shards on disk and one global token stream over them (no torch import).

Shard format (llm.c's ``dev/data/data_common.py`` layout, so its shards load directly):
a header of 256 little-endian int32 -- magic, version, token count, then zeros -- followed by
the tokens: uint16 (magic 20240520, version 1) or uint32 (magic 20240801, version 7).
build-nanogpt's ``.npy`` shards (a 1-D uint16/uint32 array) are read as well.

A split is a list of shards plus a token range ``[start, stop)`` of their concatenation, so a
validation split can be the tail of the training shards when the corpus is one document.
`TokenStream` serves any slice of that range as if it were one array (memory-mapped).
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt2.errors import UserError
from gpt2.utils.fs import atomic_write

log = logging.getLogger(__name__)

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
FORMATS = {  # dtype name -> (magic, version): llm.c's "gpt-2" and "llama-3" headers
    "uint16": (20240520, 1),
    "uint32": (20240801, 7),
}
MAX_SHARD_TOKENS = 2**31 - 1
"""The header's int32 token count limits one shard to this many tokens."""


def token_dtype(n_vocab: int) -> str:
    """uint16 when every id of a vocabulary of n_vocab fits, else uint32."""
    return "uint16" if n_vocab <= 2**16 else "uint32"


def shard_header(n_tokens: int, dtype: str) -> bytes:
    """The 1024-byte header of a shard holding n_tokens tokens of `dtype`."""
    magic, version = FORMATS[dtype]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (magic, version, n_tokens)
    return header.tobytes()


def write_shard(path: str | os.PathLike[str], tokens: np.ndarray) -> None:
    """Write tokens (uint16 or uint32) as one shard, atomically (temp file + rename)."""
    dtype = np.dtype(tokens.dtype).name
    if dtype not in FORMATS:
        raise ValueError(f"shard tokens must be uint16 or uint32, got {dtype}")
    data = np.ascontiguousarray(tokens, dtype=np.dtype(dtype).newbyteorder("<"))
    atomic_write(path, lambda f: (f.write(shard_header(len(tokens), dtype)), f.write(data.tobytes())))


def open_shard(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a shard's tokens (.bin with an llm.c header, or .npy); UserError when damaged."""
    path = str(path)
    if path.endswith(".npy"):
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{path} is not a readable .npy shard ({e}); delete it or regenerate it.") from e
        if arr.ndim != 1 or arr.dtype.name not in FORMATS:
            raise UserError(f"{path} holds a {arr.dtype} array of shape {arr.shape}; a .npy shard must be a "
                            f"1-D uint16 or uint32 array (build-nanogpt's fineweb.py layout).")
        return arr
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise UserError(f"{path} is {size} bytes, shorter than the {HEADER_BYTES}-byte shard header; "
                        f"it is truncated or not a token shard.")
    header = np.fromfile(path, dtype="<i4", count=3)
    magic, version, n_tokens = (int(v) for v in header)
    dtype = next((d for d, (m, _) in FORMATS.items() if m == magic), None)
    if dtype is not None and version != FORMATS[dtype][1]:
        raise UserError(f"{path}: shard version {version} is not supported (magic {magic} needs version "
                        f"{FORMATS[dtype][1]}); regenerate it with llm.c's data scripts or run_prepare.py.")
    if dtype is None:
        known = ", ".join(f"{m} ({d})" for d, (m, _) in FORMATS.items())
        raise UserError(f"{path}: bad magic number {magic}, expected one of {known}; not an llm.c token shard.")
    itemsize = np.dtype(dtype).itemsize
    expected = HEADER_BYTES + n_tokens * itemsize
    if n_tokens < 0 or size != expected:
        raise UserError(f"{path}: header says {n_tokens} tokens ({expected} bytes) but the file has {size} bytes; "
                        f"it is truncated or damaged. Delete it and prepare the data again.")
    if n_tokens == 0:
        return np.empty(0, dtype=np.dtype(dtype).newbyteorder("<"))
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=HEADER_BYTES,
                     shape=(n_tokens,))


def expand_shard_paths(pattern: str) -> list[str]:
    """A glob, a folder (its *.bin and *.npy files) or one file, sorted; UserError when none."""
    p = os.path.expanduser(pattern)
    if os.path.isdir(p):
        files = sorted(glob.glob(os.path.join(p, "*.bin")) + glob.glob(os.path.join(p, "*.npy")))
    else:
        files = sorted(f for f in glob.glob(p) if os.path.isfile(f))
    if not files:
        raise UserError(f"data.path={pattern!r} matches no shard files; give a glob such as 'dir/*_train_*.bin' "
                        f"(quoted in the shell), a folder of .bin/.npy shards, or one shard file.")
    return files


def max_token_id(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> int:
    """The largest token id in a shard, read once per shard file and cached in `<cache_dir>/shard-ids/` under a
    key of the file's absolute path, size and modification time (a shard written again is read again)."""
    path = Path(path).absolute()
    st = path.stat()
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    cached = Path(os.path.expanduser(str(cache_dir))) / "shard-ids" / f"{key}.json"
    try:
        return int(json.loads(cached.read_text())["max_id"])
    except (OSError, ValueError, KeyError):
        pass
    tokens = open_shard(path)
    largest = max((int(tokens[a : a + (1 << 24)].max()) for a in range(0, len(tokens), 1 << 24)), default=-1)
    try:
        atomic_write(cached, json.dumps({"path": str(path), "max_id": largest}) + "\n")
    except OSError:  # a read-only cache only costs the pass again next time
        pass
    return largest


def check_token_ids(paths: Sequence[str | os.PathLike[str]], n_vocab: int, tokenizer_id: str,
                    cache_dir: str | os.PathLike[str], known: dict[str, int] | None = None) -> None:
    """UserError naming the first shard that holds an id the tokenizer does not have (ids >= n_vocab would
    crash the embedding, and on a GPU kill every rank with a device-side assert). `known` gives the largest id
    of shards whose manifest records it; the others are read once (see `max_token_id`)."""
    for p in paths:
        largest = (known or {}).get(str(p))
        if largest is None:
            largest = max_token_id(p, cache_dir)
        if largest >= n_vocab:
            raise UserError(f"{p} holds token id {largest}, but the tokenizer ({tokenizer_id}) has n_vocab={n_vocab}: "
                            f"the shard was made with another tokenizer. Train with the tokenizer it was made with "
                            f"(tokenizer=gpt2, or tokenizer=file tokenizer.path=...json), or prepare the corpus "
                            f"again with this one.")


def check_vocab(stream: TokenStream, n_vocab: int) -> None:
    """UserError when ids of a vocabulary of n_vocab cannot be stored in the stream's token type."""
    if np.iinfo(stream.dtype).max < n_vocab - 1:
        raise UserError(f"the tokenizer has n_vocab={n_vocab} but {stream.paths[0]} stores {stream.dtype} tokens "
                        f"(ids up to {np.iinfo(stream.dtype).max}); use shards written with uint32 tokens "
                        f"(run_prepare.py picks them for this tokenizer) or a tokenizer that fits.")


class TokenStream:
    """The tokens ``[start, stop)`` of several shards read as one array: ``len(s)``, ``s[a:b]``.

    Slices are copied out of the memory maps (int64 when asked via `read`), so they stay valid
    after the stream is closed. Shards are opened once, lazily mapped by the OS.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], start: int = 0, stop: int | None = None) -> None:
        if not paths:
            raise UserError("a token stream needs at least one shard file.")
        self.paths = [str(p) for p in paths]
        self.shards = [open_shard(p) for p in self.paths]
        dtypes = {s.dtype.name for s in self.shards}
        if len(dtypes) != 1:
            raise UserError(f"shards mix token types {sorted(dtypes)}: {self.paths[0]} ...; use shards of one type.")
        self.dtype = dtypes.pop()
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.shards])]).astype(np.int64)
        total = int(self.offsets[-1])
        stop = total if stop is None else stop
        if not 0 <= start <= stop <= total:
            raise UserError(f"token range [{start}, {stop}) lies outside the {total} tokens of {self.paths[0]} ...; "
                            f"the manifest does not match its shards. Delete the prepared folder and rerun.")
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, offset in that shard) of stream token i."""
        g = self.start + i
        s = bisect.bisect_right(self.offsets, g) - 1
        s = min(s, len(self.shards) - 1)
        return s, g - int(self.offsets[s])

    def read(self, a: int, b: int, dtype: Any = np.int64) -> np.ndarray:
        """Tokens a..b-1 of the stream as a new array of `dtype` (may span shards)."""
        if not 0 <= a <= b <= len(self):
            raise IndexError(f"slice [{a}, {b}) outside a stream of {len(self)} tokens")
        out = np.empty(b - a, dtype=dtype)
        pos = 0
        while a + pos < b:
            s, off = self.locate(a + pos)
            n = min(b - a - pos, len(self.shards[s]) - off)
            out[pos : pos + n] = self.shards[s][off : off + n]
            pos += n
        return out

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenStream supports contiguous slices only, e.g. stream[a:b]")
        a, b, _ = key.indices(len(self))
        return self.read(a, max(a, b), dtype=self.dtype)


@dataclass
class Split:
    """One split of a prepared corpus: shard files and the token range of their concatenation."""

    paths: list[str]
    start: int
    stop: int

    @property
    def n_tokens(self) -> int:
        return self.stop - self.start

    def stream(self) -> TokenStream:
        return TokenStream(self.paths, self.start, self.stop)
