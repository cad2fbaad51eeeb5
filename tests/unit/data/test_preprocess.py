"""gpt2.data.preprocess: corpus preparation into shards (real files, real tokenizer, real pool): splits by
document and by token, caching, multiple shards, max_tokens, a full disk."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2.data import sources as S
from gpt2.data.preprocess import prepare_data
from gpt2.data.shards import open_shard
from gpt2.tokenizers.gpt2 import get_tokenizer
from tests.helpers import EOT, REPO, data_cfg, make_docs, split_docs, split_tokens, subprocess_env, text_cfg


def test_round_trip_document_split(small_corpus_dir: Path, tmp_path: Path, tiktoken_file: str) -> None:
    tok = get_tokenizer(tiktoken_file)
    p = prepare_data(text_cfg(small_corpus_dir, tmp_path / "cache", val_fraction=0.1))
    train, val = split_tokens(p)
    assert (len(train), len(val)) == (p.n_train_tokens, p.n_val_tokens)
    assert p.meta["split"] == "documents" and p.meta["n_docs"] == 24 and p.meta["n_val_docs"] >= 1
    assert 0.1 <= p.n_val_tokens / (p.n_train_tokens + p.n_val_tokens) <= 0.2
    decoded = sorted(tok.decode(d) for d in split_docs(train) + split_docs(val))
    originals = sorted(f.read_bytes().decode() for f in small_corpus_dir.glob("*.txt"))
    assert decoded == originals
    assert Path(p.folder) == tmp_path / "cache" / "prepared" / p.meta["key"]
    assert json.loads((Path(p.folder) / "manifest.json").read_text()) == p.meta


def test_round_trip_token_split_and_long_document(tmp_path: Path, tiktoken_file: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # One document: the split falls by tokens at the end. Tiny pieces exercise the safe cuts of
    # long documents, which must give exactly the tokens of encoding the whole text.
    tok = get_tokenizer(tiktoken_file)
    text = "".join(f"Line {i}:  x\n\n  y \nz\r\n{'é' * (i % 7)}\t\n" for i in range(400))
    (tmp_path / "one.txt").write_bytes(text.encode())
    monkeypatch.setattr(S, "PIECE_CHARS", 64)
    p = prepare_data(text_cfg(tmp_path / "one.txt", tmp_path / "cache", val_fraction=0.05))
    train, val = split_tokens(p)
    assert p.meta["split"] == "tokens" and p.n_val_tokens > 0
    assert p.n_val_tokens == int(np.ceil(0.05 * (len(train) + len(val))))
    both = np.concatenate([train, val]).tolist()
    assert both == tok.encode(text) + [EOT]


def test_cache_reuse_and_invalidation(small_corpus_dir: Path, tmp_path: Path, tiktoken_file: str) -> None:
    cfg = text_cfg(small_corpus_dir, tmp_path / "cache")
    first = prepare_data(cfg)
    files = first.train.paths + first.val.paths
    stamps = [os.stat(f).st_mtime_ns for f in files]
    time.sleep(0.01)
    again = prepare_data(cfg)
    assert again == first
    assert [os.stat(f).st_mtime_ns for f in files] == stamps  # not rewritten
    assert [p.name for p in (tmp_path / "cache" / "prepared").iterdir() if p.is_dir()] == [first.meta["key"]]

    other_split = prepare_data(text_cfg(small_corpus_dir, tmp_path / "cache", val_fraction=0.2))
    assert other_split.meta["key"] != first.meta["key"]
    with open(small_corpus_dir / "doc_03.txt", "a") as f:
        f.write("one more line\n")
    changed = prepare_data(cfg)
    assert changed.meta["key"] != first.meta["key"]
    assert changed.n_train_tokens + changed.n_val_tokens > first.n_train_tokens + first.n_val_tokens
    assert Path(first.train.paths[0]).exists()  # old cache untouched


def all_tokens(p) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    return p.stream("train")[:], p.stream("val")[:]


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet"])
def test_multi_shard_preparation_equals_single_shard(corpora: dict[str, Path], tmp_path: Path, tiktoken_file: str,
                                                    kind: str) -> None:
    tok = get_tokenizer(tiktoken_file)
    one = prepare_data(data_cfg(kind, corpora[kind], tmp_path / "one"))
    many = prepare_data(data_cfg(kind, corpora[kind], tmp_path / "many", shard_tokens=997, num_proc=2,
                                streaming=kind != "text"))
    assert len(one.train.paths) == 1 and len(many.train.paths) >= 5
    for a, b in zip(all_tokens(one), all_tokens(many)):
        np.testing.assert_array_equal(a, b)
    train, val = all_tokens(many)
    assert one.meta["n_docs"] == 300 and 0.04 < len(val) / (len(train) + len(val)) < 0.08
    docs = sorted(tok.decode(d.tolist()) for d in np.split(np.concatenate([train, val]),
                                                          np.flatnonzero(np.concatenate([train, val]) == EOT) + 1)
                  if len(d))
    assert docs == sorted(d + "<|endoftext|>" for d in make_docs())
    for shard in many.meta["splits"]["train"]["shards"]:  # the manifest's counts match the files
        assert len(open_shard(Path(many.folder) / shard["file"])) == shard["n_tokens"]


def test_max_tokens_caps_the_corpus(corpora: dict[str, Path], tmp_path: Path, tiktoken_file: str) -> None:
    full = prepare_data(data_cfg("text", corpora["text"], tmp_path / "a"))
    capped = prepare_data(data_cfg("text", corpora["text"], tmp_path / "b", max_tokens=3000))
    assert capped.n_train_tokens + capped.n_val_tokens == 3000
    both = np.concatenate(all_tokens(full))
    assert capped.n_val_tokens > 0 and capped.meta["n_docs"] < full.meta["n_docs"]
    assert set(np.concatenate(all_tokens(capped)).tolist()) <= set(both.tolist())


@pytest.mark.slow
def test_full_disk_is_one_clear_error_and_leaves_nothing(corpora: dict[str, Path], tmp_path: Path,
                                                         tiktoken_file: str) -> None:
    # RLIMIT_FSIZE makes writes past 20 kB fail with EFBIG, as a full disk fails them with ENOSPC.
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    cache = tmp_path / "cache"
    cmd = [sys.executable, str(REPO / "run_prepare.py"), "data=text", f"data.path={corpora['text']}",
           f"data.cache_dir={cache}", f"tokenizer.path={tiktoken_file}", "data.num_proc=1"]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120, preexec_fn=limit)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"data.cache_dir={cache} is full" in lines[0] and "removed" in lines[0], out
    assert not [p for p in (cache / "prepared").iterdir() if p.is_dir()]  # no partial folder, no shard left


def test_a_one_document_corpus_keeps_its_val_tokens_out_of_every_train_shard(tmp_path: Path,
                                                                            tiktoken_file: str) -> None:
    """llm.c's loader (or modded-nanogpt) pointed at *_train_*.bin must never read val tokens."""
    from gpt2.data.shards import TokenStream

    tok = get_tokenizer(tiktoken_file)
    text = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i * 7}.\n" for i in range(3000))
    (tmp_path / "one.txt").write_text(text)
    p = prepare_data(text_cfg(tmp_path / "one.txt", tmp_path / "cache", shard_tokens=9000))
    folder = Path(p.folder)
    train_files = sorted(folder.glob("train_*.bin"))
    assert [Path(f).name for f in p.val.paths] == ["val_000000.bin"] and len(train_files) > 2
    assert p.meta["split"] == "tokens" and p.val.start == 0 and p.val.stop == p.n_val_tokens
    train_tokens = TokenStream(train_files)[:].tolist()
    val_tokens = TokenStream([folder / "val_000000.bin"])[:].tolist()
    assert train_tokens + val_tokens == tok.encode(text) + [EOT]  # every token once, in order
    assert len(train_tokens) == p.n_train_tokens and len(val_tokens) == int(np.ceil(0.05 * len(tok.encode(text))))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert all(s["max_id"] < 50257 for split in manifest["splits"].values() for s in split["shards"])


def test_a_folder_prepared_with_val_inside_the_train_shards_still_loads(tmp_path: Path) -> None:
    """The layout of format 2: a one-document corpus's val split was a token range of the last train shard."""
    from gpt2.data.corpus import load_prepared
    from gpt2.data.shards import write_shard

    folder = tmp_path / "old"
    folder.mkdir()
    tokens = (np.arange(1000) % 50000).astype(np.uint16)
    write_shard(folder / "train_000000.bin", tokens[:600])
    write_shard(folder / "train_000001.bin", tokens[600:])
    shards = [{"file": "train_000000.bin", "n_tokens": 600}, {"file": "train_000001.bin", "n_tokens": 400}]
    (folder / "manifest.json").write_text(json.dumps({"format_version": 2, "split": "tokens", "splits": {
        "train": {"shards": shards, "start": 0, "stop": 950}, "val": {"shards": shards, "start": 950, "stop": 1000}}}))
    p = load_prepared(folder)
    assert p.stream("train")[:].tolist() == tokens[:950].tolist()
    assert p.stream("val")[:].tolist() == tokens[950:].tolist()
