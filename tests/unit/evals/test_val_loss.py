"""gpt2.evals.val_loss: the val loss as an estimate of the whole split (every token once, or a fixed seeded
sample), and what the trainer logs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.config import ModelConfig, TrainConfig
from gpt2.data.shards import write_shard
from gpt2.errors import UserError
from gpt2.evals.val_loss import select_windows
from gpt2.model.gpt import GPT
from gpt2.train.trainer import Trainer
from tests.helpers import compose_train, tiny_trainer


def test_small_split_is_scored_whole_every_token_once() -> None:
    w = select_windows(n_tokens=1000, block_size=64, max_tokens=10_000, seed=0)
    assert w.full and w.n_tokens == 999  # every token but the first is a target once
    scored = np.zeros(1000, dtype=int)
    for start, skip in zip(w.starts, w.skip):
        scored[start + 1 + skip : start + 65] += 1
    assert scored[0] == 0 and (scored[1:] == 1).all()


def test_large_split_gets_a_fixed_seeded_sample_spread_over_it() -> None:
    w = select_windows(n_tokens=1_000_001, block_size=100, max_tokens=50_000, seed=3)
    again = select_windows(n_tokens=1_000_001, block_size=100, max_tokens=50_000, seed=3)
    other = select_windows(n_tokens=1_000_001, block_size=100, max_tokens=50_000, seed=4)
    assert not w.full and len(w.starts) == 500 and w.n_tokens == 50_000
    np.testing.assert_array_equal(w.starts, again.starts)  # the same windows at every evaluation
    assert not np.array_equal(w.starts, other.starts)
    assert (w.starts % 100 == 0).all() and len(set(w.starts.tolist())) == 500
    # spread over the split, not a prefix: every tenth of the split holds some windows
    assert np.histogram(w.starts, bins=10, range=(0, 1_000_000))[0].min() > 20
    assert len(select_windows(10_001, 100, 0, seed=0).starts) == 100  # max_tokens=0: always whole
    assert len(select_windows(10_001, 100, 1_000_000, seed=0, max_windows=7).starts) == 7


def test_split_shorter_than_one_window_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="fewer than one window.*lower block_size"):
        select_windows(n_tokens=10, block_size=64, max_tokens=1000, seed=0)


EASY = np.tile(np.arange(100, 116), 400)  # a 16-token cycle: predictable once learned


def _learned_model(steps: int = 30) -> GPT:
    """A tiny GPT trained on EASY (so EASY tokens are easy and random tokens hard)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=512))  # small: fast
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.from_numpy(EASY[: 8 * 33].reshape(8, 33).astype(np.int64))
    for _ in range(steps):
        loss = model(data[:, :-1], data[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _token_nll(model: GPT, tokens: np.ndarray, block: int) -> np.ndarray:
    """nll[i] = loss of predicting tokens[i + 1], every target once, independent of gpt2.evals: plain
    non-overlapping windows, and for the last targets the window ending at the split's end."""
    t = torch.from_numpy(tokens.astype(np.int64))
    n_targets = len(t) - 1
    starts = list(range(0, n_targets - block + 1, block))
    if starts[-1] + block < n_targets:
        starts.append(n_targets - block)
    nll = np.full(n_targets, np.nan)
    with torch.no_grad():
        for chunk in range(0, len(starts), 16):
            s = starts[chunk : chunk + 16]
            x = torch.stack([t[a : a + block] for a in s])  # (B, block)
            y = torch.stack([t[a + 1 : a + block + 1] for a in s])
            logp = torch.log_softmax(model(x).logits.double(), dim=-1)  # (B, block, V)
            losses = -logp.gather(-1, y[..., None])[..., 0].numpy()
            for a, row in zip(s, losses):
                nll[a : a + block] = row
    assert not np.isnan(nll).any()
    return nll


@pytest.fixture(scope="module")
def easy_hard(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, Path, np.ndarray]:
    """A learned model, a val file whose first half is easy and second half hard, and the
    reference loss of every target token."""
    model = _learned_model()
    rng = np.random.default_rng(0)
    val = np.concatenate([EASY[:2000], rng.integers(0, 512, 2001)]).astype(np.uint16)
    path = tmp_path_factory.mktemp("val") / "val.bin"
    write_shard(path, val)
    return model, path, _token_nll(model, val, 32)


def _trainer(tmp_path: Path, val_path: Path, model: GPT, overrides: list[str]) -> Trainer:
    from gpt2.data.loader import TokenLoader
    from gpt2.data.shards import TokenStream

    cfg: TrainConfig = compose_train(["model=tiny", "model.n_positions=64", "block_size=32", "micro_batch_size=4",
                                      "total_batch_tokens=128", "device=cpu", "precision=fp32", "logger=none",
                                      "eval.sample_tokens=0", "progress_bar=false", *overrides])
    loader = TokenLoader(TokenStream([val_path]), cfg.micro_batch_size, cfg.block_size, shuffle=False)
    return tiny_trainer(cfg, tmp_path, model, (loader, loader))


@pytest.mark.slow
def test_logged_val_loss_is_the_whole_split_when_small(easy_hard, tmp_path: Path) -> None:
    model, path, nll = easy_hard
    half = len(nll) // 2
    easy_loss, hard_loss = nll[:half].mean(), nll[half:].mean()
    assert easy_loss < 2.5 and hard_loss > 5.0, (easy_loss, hard_loss)  # ln(512) = 6.2
    trainer = _trainer(tmp_path, path, model, [])  # defaults: eval.val_tokens=1M > 4001 tokens
    metrics = trainer.evaluate()
    assert metrics["val/tokens"] == len(nll)  # every token but the first
    assert metrics["val/loss"] == pytest.approx(nll.mean(), rel=1e-5)  # fp32 vs an fp64 reference
    assert easy_loss < metrics["val/loss"] < hard_loss
    # the old estimate (a prefix of the split) would have reported the easy half only
    assert metrics["val/loss"] > easy_loss + 1.0


@pytest.mark.slow
def test_logged_val_loss_samples_a_large_split_the_same_way_each_time(easy_hard, tmp_path: Path) -> None:
    model, path, nll = easy_hard
    trainer = _trainer(tmp_path, path, model, ["eval.val_tokens=1600"])  # 50 of 125 windows
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second and first["val/tokens"] == 1600
    half = len(nll) // 2
    assert nll[:half].mean() < first["val/loss"] < nll[half:].mean()
    assert first["val/loss"] == pytest.approx(nll.mean(), rel=0.25)  # an estimate of the whole split


"""100 words, each one GPT-2 token with its leading space: every ending is 3 tokens."""
