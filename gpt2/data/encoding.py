"""Documents -> token arrays, in document order, on a pool of processes (memory stays flat).

Workers run only the tokenizer and numpy; they reset SIGTERM/SIGINT/SIGUSR1 to the default so a
trainer's preemption handler (installed before data preparation) is never inherited, and a pool
that does not shut down in POOL_EXIT_S is reported and killed, never waited on forever.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from gpt2.data.sources import Source
from gpt2.tokenizers.gpt2 import Tokenizer

log = logging.getLogger(__name__)

BATCH_CHARS = 1 << 18
"""Characters per task sent to an encoding worker."""
POOL_EXIT_S = 30.0
"""How long to wait for tokenizer workers to exit before killing and reporting them."""


def tasks(source: Source, skip_docs: int = 0) -> Iterator[tuple[list[str], list[bool]]]:
    """Pieces grouped into tasks of about BATCH_CHARS; ends[i] marks a document's last piece."""
    texts: list[str] = []
    ends: list[bool] = []
    size = 0
    for i, doc in enumerate(source.docs()):
        if i < skip_docs:
            continue  # already in the shards of an interrupted run
        prev: str | None = None
        for piece in doc:  # look one piece ahead to know which is the document's last
            if prev is not None:
                texts.append(prev)
                ends.append(False)
                size += len(prev)
                if size >= BATCH_CHARS:
                    yield texts, ends
                    texts, ends, size = [], [], 0
            prev = piece
        texts.append(prev or "")
        ends.append(True)
        size += len(prev or "")
        if size >= BATCH_CHARS:
            yield texts, ends
            texts, ends, size = [], [], 0
    if texts:
        yield texts, ends


_WORKER: tuple[Tokenizer, str] | None = None


def _init_worker(tok: Tokenizer, dtype: str) -> None:
    """Pool initializer: default signal handling (a trainer's preemption handler must not be
    inherited, or SIGTERM from Pool.terminate would be swallowed and the pool never exit)."""
    global _WORKER
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    _WORKER = (tok, dtype)


def encode_array(tok: Tokenizer, text: str, dtype: str) -> np.ndarray:
    """tok.encode(text) as an array of `dtype`; a tiktoken encoding fills the array directly
    (encode_to_numpy with no special tokens equals encode_ordinary, without a Python list)."""
    enc = getattr(tok, "encoding", None)
    if hasattr(enc, "encode_to_numpy"):
        try:
            return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()).astype(dtype)  # type: ignore[union-attr]
        except UnicodeEncodeError:  # lone surrogates (e.g. "\ud800" escapes in a jsonl corpus): encode replaces them
            pass
    return np.asarray(tok.encode(text), dtype=dtype)


def _encode_task(texts: list[str]) -> list[np.ndarray]:
    assert _WORKER is not None
    tok, dtype = _WORKER
    return [encode_array(tok, t, dtype) for t in texts]


def _shutdown(pool: Any, graceful: bool) -> None:
    """close+join (or terminate) the pool, but never wait forever: report and kill stuck workers."""
    done = threading.Thread(target=(lambda: (pool.close(), pool.join())) if graceful else pool.terminate,
                            daemon=True)
    done.start()
    done.join(POOL_EXIT_S)
    if done.is_alive():
        stuck = [p.pid for p in getattr(pool, "_pool", []) if p.is_alive()]
        log.error("tokenizer worker process(es) %s did not exit within %.0fs; killing them", stuck, POOL_EXIT_S)
        for pid in stuck:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        done.join(5)


def encoded(tasks: Iterator[tuple[list[str], list[bool]]], tok: Tokenizer, dtype: str,
             num_proc: int) -> Iterator[tuple[list[np.ndarray], list[bool]]]:
    """Encoded tasks in order; a pool of `num_proc` processes with a bounded queue (flat memory)."""
    if num_proc <= 1:
        for texts, ends in tasks:
            yield [encode_array(tok, t, dtype) for t in texts], ends
        return
    # fork: workers only run the tokenizer and numpy (no torch, no CUDA), and unlike spawn it works
    # from scripts without an `if __name__ == "__main__":` guard.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(tok, dtype))
    finished = False
    try:
        pending: deque = deque()
        for texts, ends in tasks:
            pending.append((pool.apply_async(_encode_task, (texts,)), ends))
            if len(pending) >= 2 * num_proc:
                result, e = pending.popleft()
                yield result.get(), e
        while pending:
            result, e = pending.popleft()
            yield result.get(), e
        finished = True
    finally:
        _shutdown(pool, graceful=finished)
