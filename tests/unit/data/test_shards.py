"""gpt2.data.shards: llm.c and build-nanogpt shards read and trained on as they are, and damaged shards as
clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpt2.config import DataConfig
from gpt2.data.preprocess import prepare_data
from gpt2.data.shards import TokenStream, check_vocab, write_shard
from gpt2.errors import UserError
from tests.helpers import compose_train, data_cfg


def llmc_shard(path: Path, tokens: np.ndarray, magic: int = 20240520, version: int = 1, count: int | None = None,
               dtype: str = "<u2") -> None:
    """A shard in llm.c's documented layout: 256 int32 (magic, version, count, zeros), then the tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    path.write_bytes(header.tobytes() + tokens.astype(dtype).tobytes())


@pytest.mark.slow
def test_llmc_and_npy_shards_load_and_train(tmp_path: Path, base_overrides: list[str]) -> None:
    from gpt2.train.launch import train

    rng = np.random.default_rng(0)
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(3):
        llmc_shard(d / f"fineweb_train_{i:06d}.bin", rng.integers(0, 50257, 3000))
        np.save(d / f"edufineweb_train_{i:06d}.npy", rng.integers(0, 50257, 3000).astype(np.uint16))
    llmc_shard(d / "fineweb_val_000000.bin", rng.integers(0, 50257, 2000))
    common = [o for o in base_overrides if not o.startswith("data=")]
    small = ["block_size=32", "micro_batch_size=4", "total_batch_tokens=128", "max_steps=2", "eval.iters=1",
             "eval.sample_tokens=0", "scheduler.warmup_steps=0", "checkpoint.save_final=false"]
    for pattern, val_split in ((d / "fineweb_train_*.bin", "files"), (d / "edufineweb_train_*.npy", "tokens")):
        cfg = compose_train([*common, *small, "data=shards", f"data.path={pattern}"])
        prepared = prepare_data(cfg.data)
        assert prepared.meta["split"] == val_split and len(prepared.train.paths) == 3
        loss = train(cfg, tmp_path / f"run-{val_split}")
        assert 9.0 < loss < 12.0


def test_bad_shards_are_clear_errors(tmp_path: Path, tiktoken_file: str, corpora: dict[str, Path]) -> None:
    tokens = np.arange(100) % 50257
    cases = {"magic": dict(magic=12345), "version": dict(version=3), "truncated": dict(count=150)}
    for name, kw in cases.items():
        llmc_shard(tmp_path / f"{name}.bin", tokens, **kw)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="bad magic number 12345"):
        TokenStream([tmp_path / "magic.bin"])
    with pytest.raises(UserError, match="shard version 3 is not supported"):
        TokenStream([tmp_path / "version.bin"])
    with pytest.raises(UserError, match="header says 150 tokens .* truncated"):
        TokenStream([tmp_path / "truncated.bin"])
    write_shard(tmp_path / "ok.bin", tokens.astype(np.uint16))
    with pytest.raises(UserError, match="n_vocab=100277 .* uint16"):
        check_vocab(TokenStream([tmp_path / "ok.bin"]), 100277)
    check_vocab(TokenStream([tmp_path / "ok.bin"]), 50257)

    # A manifest naming a shard that is gone: an error, and nothing is rewritten.
    cfg = data_cfg("text", corpora["text"], tmp_path / "cache", shard_tokens=2000)
    prepared = prepare_data(cfg)
    Path(prepared.train.paths[1]).unlink()
    manifest = (Path(prepared.folder) / "manifest.json").read_bytes()
    with pytest.raises(UserError, match=r"names train_000001\.bin, which is missing"):
        prepare_data(cfg)
    assert (Path(prepared.folder) / "manifest.json").read_bytes() == manifest


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
def test_token_ids_beyond_the_vocabulary_are_one_error_naming_the_shard(suffix: str, tmp_path: Path,
                                                                         tiktoken_file: str) -> None:
    from gpt2.data.preprocess import prepare_data

    shards = tmp_path / "shards"
    shards.mkdir()
    ok = (np.arange(5000) % 50257).astype(np.uint16)
    bad = ok.copy()
    bad[1234] = 60000  # made with a 64K-token tokenizer
    for name, tokens in (("x_train_000000", ok), ("x_train_000001", bad), ("x_val_000000", ok)):
        if suffix == ".npy":
            np.save(shards / f"{name}.npy", tokens)
        else:
            write_shard(shards / f"{name}.bin", tokens)
    cfg = DataConfig(name="shards", path=str(shards / f"x_train_*{suffix}"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=rf"x_train_000001\{suffix} holds token id 60000, but the tokenizer .* "
                                        rf"has n_vocab=50257"):
        prepare_data(cfg)
    cached = list((tmp_path / "cache" / "shard-ids").glob("*.json"))
    assert len(cached) == 2  # each shard read once, ever: the largest ids are cached
    (shards / f"x_val_000000{suffix}").unlink()  # a val split given by data.val_path is checked the same way
    if suffix == ".npy":
        np.save(shards / "v.npy", bad)
    else:
        write_shard(shards / "v.bin", bad)
    ok_train = DataConfig(name="shards", path=str(shards / f"x_train_000000{suffix}"),
                          val_path=str(shards / f"v{suffix}"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=rf"v\{suffix} holds token id 60000"):
        prepare_data(ok_train)
