"""gpt2.train.launch: a tiny model learns the demo corpus; W&B offline files in the run dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2.train.launch import train
from gpt2.train.metrics import read_metrics
from tests.helpers import TINY_RUN, compose_train, losses


@pytest.mark.slow
def test_tiny_model_learns_shakespeare(tmp_path: Path, base_overrides: list[str]) -> None:
    cfg = compose_train([*base_overrides, "max_steps=50", "eval.interval=25", "eval.iters=4", "optimizer.lr=3e-3",
                         "scheduler.warmup_steps=5", "total_batch_tokens=1024", "micro_batch_size=8",
                         "block_size=64"])
    final = train(cfg, tmp_path)
    val = losses(tmp_path, "val/loss")
    assert sorted(val) == [0, 25, 50]
    assert val[0] > 10.0  # ln(50257) = 10.8 at random init
    assert final == val[50] and final < val[0] - 3.0, val
    samples = [r["sample"] for r in read_metrics(tmp_path / "metrics.jsonl") if "sample" in r]
    assert samples[-1].startswith("ROMEO:") and len(samples[-1]) > len("ROMEO:") + 20
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert any((tmp_path / "checkpoints").glob("step_00000050/COMPLETE"))


@pytest.mark.slow
def test_wandb_offline_files_in_run_dir(tmp_path: Path, base_overrides: list[str], monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_train([*base_overrides, *TINY_RUN, "micro_batch_size=8", "logger=wandb", "max_steps=2",
                         "checkpoint.save_final=false"])
    train(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    (records,) = runs[0].glob("*.wandb")
    data = records.read_bytes()  # the run's protobuf log: config, history and samples
    assert b"total_batch_tokens" in data and b"train/loss" in data
    assert list((runs[0] / "files" / "media" / "html").glob("sample_*.html"))
