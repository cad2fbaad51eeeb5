"""gpt2.evals: the val-loss estimate over a whole split (issue #17) and HellaSwag scoring, the
trainer's periodic evaluation, and run_eval.py (issue #11). CPU only, no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.config import ModelConfig, TrainConfig, UserError
from gpt2.distributed import DistInfo
from gpt2.evals.val_loss import select_windows
from gpt2.model import GPT
from gpt2.optim import build_optimizer
from gpt2.shards import write_shard
from gpt2.trainer import Trainer

from .helpers import compose_train

CPU = torch.device("cpu")


# ------------------------------------------------------------------ val windows


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


def _learned_model(steps: int = 60) -> GPT:
    """A tiny GPT trained on EASY (so EASY tokens are easy and random tokens hard)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_positions=64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.from_numpy(EASY[: 8 * 33].reshape(8, 33).astype(np.int64))
    for _ in range(steps):
        loss = model(data[:, :-1], data[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _reference_loss(model: GPT, tokens: np.ndarray, block: int) -> tuple[float, int]:
    """Sum of the loss of every target token of `tokens` (non-overlapping windows, then the
    remaining targets with the preceding context), independent of gpt2.evals."""
    t = torch.from_numpy(tokens.astype(np.int64))
    total, count, pos = 0.0, 0, 1  # pos: next target to score
    with torch.no_grad():
        while pos < len(t):
            end = min(pos + block, len(t))
            start = max(0, end - 1 - block)
            logp = torch.log_softmax(model(t[start : end - 1][None]).logits[0].double(), dim=-1)
            tgt = t[start + 1 : end]
            nll = -logp[torch.arange(len(tgt)), tgt]
            new = end - pos
            total += float(nll[-new:].sum())
            count += new
            pos = end
    return total, count


@pytest.fixture(scope="module")
def easy_hard(tmp_path_factory: pytest.TempPathFactory) -> tuple[GPT, Path, np.ndarray]:
    """A learned model and a val file whose first half is easy and second half hard."""
    model = _learned_model()
    rng = np.random.default_rng(0)
    val = np.concatenate([EASY[:3000], rng.integers(0, 50257, 3001)]).astype(np.uint16)
    path = tmp_path_factory.mktemp("val") / "val.bin"
    write_shard(path, val)
    return model, path, val


def _trainer(tmp_path: Path, val_path: Path, model: GPT, overrides: list[str]) -> Trainer:
    from gpt2.loader import TokenLoader
    from gpt2.shards import TokenStream

    cfg: TrainConfig = compose_train(["model=tiny", "model.n_positions=64", "block_size=32", "micro_batch_size=4",
                                      "total_batch_tokens=128", "device=cpu", "precision=fp32", "logger=none",
                                      "sample_tokens=0", "progress_bar=false", *overrides])
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=CPU)
    loader = TokenLoader(TokenStream([val_path]), cfg.micro_batch_size, cfg.block_size, shuffle=False)
    return Trainer(cfg, model, build_optimizer(model, cfg.optimizer, "cpu"), loader, loader, info, tmp_path)


def test_logged_val_loss_is_the_whole_split_when_small(easy_hard, tmp_path: Path) -> None:
    model, path, val = easy_hard
    half = len(val) // 2
    easy = _reference_loss(model, val[: half + 1], 32)
    hard = _reference_loss(model, val[half:], 32)
    easy_loss, hard_loss = easy[0] / easy[1], hard[0] / hard[1]
    assert easy_loss < 1.0 and hard_loss > 8.0, (easy_loss, hard_loss)
    full_sum, full_count = _reference_loss(model, val, 32)
    trainer = _trainer(tmp_path, path, model, [])  # defaults: eval.val_tokens=1M > 6001 tokens
    metrics = trainer.evaluate()
    assert metrics["val/tokens"] == full_count == len(val) - 1
    assert metrics["val/loss"] == pytest.approx(full_sum / full_count, rel=1e-5)  # fp32 vs fp64 reference
    assert easy_loss < metrics["val/loss"] < hard_loss
    # the old estimate (a prefix of the split) would have reported the easy half only
    assert metrics["val/loss"] > 3 * easy_loss


def test_logged_val_loss_samples_a_large_split_the_same_way_each_time(easy_hard, tmp_path: Path) -> None:
    model, path, val = easy_hard
    trainer = _trainer(tmp_path, path, model, ["eval.val_tokens=1600"])  # 50 of 187 windows
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second and first["val/tokens"] == 1600
    half = len(val) // 2
    easy = _reference_loss(model, val[: half + 1], 32)
    hard = _reference_loss(model, val[half:], 32)
    assert easy[0] / easy[1] < first["val/loss"] < hard[0] / hard[1]
    full = _reference_loss(model, val, 32)
    assert first["val/loss"] == pytest.approx(full[0] / full[1], rel=0.25)  # an estimate of the whole split
