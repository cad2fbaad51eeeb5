"""gpt2.data.mixture: weighted mixtures of corpora (data=mix): the interleaving hits the weights, is the same at
any world size, repeats a source that runs out, resumes exactly; the mixture's validation; a tiny mixture that
trains with per-source token counts and val losses."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from gpt2.data.mixture import BLOCK, MixtureLoader, block_quotas
from gpt2.data.shards import TokenStream, write_shard
from gpt2.errors import ConfigError, UserError
from gpt2.train.metrics import read_metrics
from tests.helpers import BPE, compose_train


@pytest.fixture
def streams(tmp_path: Path) -> list[TokenStream]:
    """Three sources whose tokens say which source and window they are: source k's tokens are k*10000 + i."""
    out = []
    for k, n in enumerate((20_001, 5_001, 1_601)):  # 1250, 312 and 100 windows of 16
        write_shard(tmp_path / f"s{k}.bin", (k * 10_000 + np.arange(n) % 10_000).astype(np.uint16))
        out.append(TokenStream([tmp_path / f"s{k}.bin"]))
    return out


def _draws(loader: MixtureLoader, n_batches: int) -> list[int]:
    """The source of every window drawn (its first token's ten-thousands)."""
    return [int(v) // 10_000 for _ in range(n_batches) for v in loader.next_batch()[0][:, 0]]


def test_quotas_are_the_weights_of_every_block() -> None:
    for weights in ([0.5, 0.3, 0.2], [0.999, 0.001], [1 / 3] * 3, [0.7, 0.3]):
        quota = block_quotas(weights)
        assert quota.sum() == BLOCK and (quota >= 1).all()
        assert np.abs(quota / BLOCK - np.asarray(weights)).max() <= 1 / BLOCK + 1e-12


def test_token_shares_hit_the_weights_and_a_small_source_repeats(streams: list[TokenStream],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    weights = [0.5, 0.3, 0.2]
    loader = MixtureLoader(streams, weights, ["web", "code", "math"], batch_size=16, block_size=16, seed=3)
    with caplog.at_level(logging.INFO, logger="gpt2.data.mixture"):
        drawn = _draws(loader, 300)  # 300 steps of 16 windows
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.abs(shares - weights).max() < 0.01  # within 1% of tokens
    tokens = loader.source_tokens()
    assert sum(tokens.values()) == 300 * 16 * 16 and tokens["web"] == np.bincount(drawn)[0] * 16
    epochs = loader.epochs()
    assert epochs["math"] == 9 and epochs["web"] == 1  # ~960 draws of math's 100 windows, ~2400 of web's 1250
    assert any("data source math ran out: repeating it" in r.getMessage() for r in caplog.records)
    windows = [loader.window(g) for g in range(4800)]
    math_windows = [w for k, w in windows if k == 2]
    assert sorted(math_windows[:100]) == list(range(100))  # each epoch visits every window of the source once
    assert math_windows[:100] != math_windows[100:200]  # in a new order


def test_the_draws_are_the_same_at_any_world_size_and_resume_exactly(streams: list[TokenStream]) -> None:
    def loader(rank: int = 0, world: int = 1, batch: int = 12, seed: int = 1) -> MixtureLoader:
        return MixtureLoader(streams, [0.6, 0.3, 0.1], ["a", "b", "c"], batch, 16, rank=rank, world_size=world,
                             seed=seed)

    def starts(ld: MixtureLoader, n: int) -> list[int]:
        return [int(v) for _ in range(n) for v in ld.next_batch()[0][:, 0]]

    one = starts(loader(), 50)
    for world in (2, 3):
        ranks = [loader(r, world, 12 // world) for r in range(world)]
        per_rank = [starts(ld, 50) for ld in ranks]
        b = 12 // world
        steps = [sorted(w for r in per_rank for w in r[b * i: b * (i + 1)]) for i in range(50)]
        assert steps == [sorted(one[12 * i: 12 * (i + 1)]) for i in range(50)]
    first = loader(0, 2, 6)
    starts(first, 30)
    resumed = loader()
    resumed.load_state_dict(first.state_dict())  # saved on 2 ranks, resumed on 1
    reference = loader()
    starts(reference, 30)  # 30 micro-steps of 6 windows on each of 2 ranks = 30 of 12 on one
    assert starts(resumed, 20) == starts(reference, 20)
    assert starts(loader(seed=2), 5) != one[:60]
    other = MixtureLoader(streams, [0.5, 0.4, 0.1], ["a", "b", "c"], 12, 16)
    with pytest.raises(UserError, match="Cannot resume the data mixture: saved quota="):
        other.load_state_dict(first.state_dict())


@pytest.mark.parametrize("override,message", [
    ("+data.sources={a:{name:shakespeare},b:{name:tiktok}}", r"data.sources.b.name='tiktok' is not supported"),
    ("+data.sources={a:{name:shakespeare,weight:0}}", r"data.sources.a.weight=0.0 must be a finite number greater"),
    ("+data.sources={a:{name:shakespeare,weight:-1}}", r"data.sources.a.weight=-1.0 must be"),
    ("+data.sources={a:{name:mix}}", r"data.sources.a.name=mix: a mixture cannot hold a mixture"),
    ("+data.sources={a:{name:text}}", r"data.sources.a.path is required with data.sources.a.name=text"),
    ("+data.sources={a b:{name:shakespeare}}", r"data.sources.a b: a source name is made of letters"),
    ("data.max_tokens=1000", r"data.max_tokens=1000 does not apply to a mixture"),
])
def test_a_bad_mixture_is_one_error_naming_the_source(override: str, message: str) -> None:
    from gpt2.config import validate

    base = ["debug=cpu", "data=mix"]
    if not override.startswith("+data.sources"):
        base.append("+data.sources={a:{name:shakespeare}}")
    with pytest.raises(ConfigError, match=message):
        validate(compose_train([*base, override]))
    with pytest.raises(ConfigError, match="data=mix needs data.sources"):
        validate(compose_train(["debug=cpu", "data=mix"]))
    with pytest.raises(ConfigError, match="data.sources is set but data.name=shakespeare; use data=mix"):
        validate(compose_train(["debug=cpu", "+data.sources={a:{name:shakespeare}}"]))


def test_a_shards_source_prepared_with_another_tokenizer_is_refused(tmp_path: Path, tiktoken_file: str,
                                                                    small_corpus_dir: Path) -> None:
    from gpt2.config import DataConfig, TokenizerConfig
    from gpt2.data.mixture import prepare_mixture
    from gpt2.data.preprocess import prepare_data

    other = prepare_data(DataConfig(name="text", path=str(small_corpus_dir), cache_dir=str(tmp_path / "c"),
                                    num_proc=1), tokenizer=TokenizerConfig(name="bpe", vocab_size=300,
                                                                           train_max_bytes=None))
    cfg = compose_train(["debug=cpu", "data=mix", f"data.cache_dir={tmp_path / 'c'}",
                         f"tokenizer.path={tiktoken_file}",
                         f"+data.sources={{text:{{name:text,path:'{small_corpus_dir}'}},"
                         f"theirs:{{name:shards,path:'{other.folder}/train_*.bin'}}}}"])
    with pytest.raises(UserError, match=r"was prepared with tokenizer hf-.* but this run uses tiktoken-gpt2"):
        prepare_mixture(cfg.data, cfg.tokenizer)


@pytest.mark.slow
def test_a_two_source_mixture_trains_logs_each_source_and_resumes_bit_exactly(
        tmp_path: Path, bpe_cache: Path, small_corpus_dir: Path) -> None:
    """On a BPE trained on both sources (4K ids: a step costs a tenth of one with GPT-2's vocabulary)."""
    from gpt2.train.launch import train

    args = ["debug=cpu", "data=mix", f"data.cache_dir={bpe_cache}", "tokenizer=bpe",
            f"tokenizer.vocab_size={BPE.vocab_size}", f"tokenizer.train_max_bytes={BPE.train_max_bytes}",
            f"+data.sources={{books:{{name:shakespeare,weight:0.7}},"
            f"docs:{{name:text,path:'{small_corpus_dir}',weight:0.3}}}}", "total_batch_tokens=1024",
            "micro_batch_size=8", "block_size=32", "max_steps=40", "eval.interval=20", "eval.iters=2",
            "eval.sample_tokens=0", "log_interval=10", "checkpoint.interval=20", "scheduler.warmup_steps=2"]
    train(compose_train(args), tmp_path / "full")
    records = read_metrics(tmp_path / "full" / "metrics.jsonl")
    last = [r for r in records if "data/books/tokens" in r][-1]
    books, docs = last["data/books/tokens"], last["data/docs/tokens"]
    assert books + docs == 40 * 1024 and abs(books / (books + docs) - 0.7) < 0.01
    evals = [r for r in records if "val/loss" in r]
    assert len(evals) == 3 and all({"val/books/loss", "val/docs/loss"} <= set(r) for r in evals)
    final = evals[-1]
    assert final["val/loss"] == pytest.approx(0.7 * final["val/books/loss"] + 0.3 * final["val/docs/loss"])
    train(compose_train([*args, f"resume={tmp_path / 'full' / 'checkpoints' / 'step_00000020'}"]),
          tmp_path / "resumed")
    full = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    resumed = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")
               if "train/loss" in r}
    assert resumed == {s: full[s] for s in resumed} and sorted(resumed) == [30, 40]
