"""gpt2.data.encoding: documents encoded in order on a pool of processes (the same bytes as one process,
flat memory for long documents, a pool that cannot exit is killed, tiktoken's array encoding)."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2.data import encoding as E
from gpt2.data import sources as S
from gpt2.data.preprocess import prepare_data
from gpt2.tokenizers.gpt2 import get_tokenizer
from tests.helpers import make_docs, split_tokens, text_cfg


def test_pool_gives_same_files_as_one_process(small_corpus_dir: Path, tmp_path: Path, tiktoken_file: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(E, "BATCH_CHARS", 2000)  # several tasks, so two workers really run
    one = prepare_data(text_cfg(small_corpus_dir, tmp_path / "a"))
    two = prepare_data(text_cfg(small_corpus_dir, tmp_path / "b", num_proc=2))
    assert one.meta["key"] == two.meta["key"]
    for x, y in zip(split_tokens(one), split_tokens(two)):
        np.testing.assert_array_equal(x, y)


def test_long_document_is_streamed_in_bounded_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Peak memory stays flat: a long document reaches the workers in small tasks, not whole.
    monkeypatch.setattr(S, "PIECE_CHARS", 100)
    monkeypatch.setattr(E, "BATCH_CHARS", 300)
    text = "".join(f"word{i} and more\n" for i in range(2000))
    (tmp_path / "long.txt").write_text(text)
    tasks = list(E.tasks(S._file_source([tmp_path / "long.txt"], "long")))
    assert len(tasks) > 50
    assert max(sum(map(len, texts)) for texts, _ in tasks) < 300 + 2 * 100
    assert "".join(t for texts, _ in tasks for t in texts) == text
    assert [e for _, ends in tasks for e in ends].count(True) == 1 and tasks[-1][1][-1]


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def test_a_pool_that_cannot_exit_is_reported_and_killed(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    # Workers that swallow SIGTERM (what an inherited preemption handler did) made Pool.terminate
    # wait for ever; _shutdown gives up after POOL_EXIT_S, names the workers and kills them.
    import multiprocessing

    from gpt2.data import encoding as E
    monkeypatch.setattr(E, "POOL_EXIT_S", 1.0)
    pool = multiprocessing.get_context("fork").Pool(2, initializer=_ignore_sigterm)
    pids = [p.pid for p in pool._pool]  # type: ignore[attr-defined]
    for _ in range(2):
        pool.apply_async(time.sleep, (60,))  # busy workers: they do not pick up the exit sentinel
    time.sleep(0.3)
    caplog.set_level(logging.ERROR, logger="gpt2")
    t0 = time.time()
    E._shutdown(pool, graceful=False)
    assert time.time() - t0 < 10
    assert "did not exit within 1s; killing them" in caplog.text and str(pids[0]) in caplog.text
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_array_encoding_equals_encode_ordinary(tiktoken_file: str) -> None:
    from gpt2.data.encoding import encode_array

    tok = get_tokenizer(tiktoken_file)
    text = "A literal <|endoftext|> is text.\r\n  héllo 🙂 12345\n\n" + " ".join(make_docs(20))
    arr = encode_array(tok, text, "uint16")
    assert arr.dtype == np.uint16 and arr.tolist() == tok.encode(text) == tok.encoding.encode_ordinary(text)
    assert encode_array(tok, text, "uint32").tolist() == arr.tolist()
