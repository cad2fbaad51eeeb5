"""Shared by the evaluation tests: HellaSwag-like items and helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2.train.metrics import read_metrics
from tests.helpers import compose_train
from tests.unit.evals.common import CYCLE, predictable_items, write_jsonl


@pytest.fixture(scope="module")
def hellaswag_run(tmp_path_factory: pytest.TempPathFactory, gpt2_cache: Path, tiktoken_file: str) -> dict:
    """A tiny model trained on the word cycle, with HellaSwag on predictable items during training."""
    from gpt2.train.launch import train

    root = tmp_path_factory.mktemp("hs_run")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(20):
        words = [CYCLE[(5 * i + j) % len(CYCLE)] for j in range(400)]
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    items_path = write_jsonl(root / "items.jsonl", predictable_items(200, seed=1))
    overrides = ["model=tiny", "data=text", f"data.path={corpus}", f"data.cache_dir={root / 'cache'}",
                 f"tokenizer.path={tiktoken_file}", "data.num_proc=1", "logger=none", "progress_bar=false",
                 "device=cpu", "precision=fp32", "block_size=32", "micro_batch_size=8", "total_batch_tokens=256",
                 "max_steps=30", "eval.interval=0", "eval.hellaswag_interval=30", f"eval.hellaswag.path={items_path}",
                 "optimizer.lr=1e-2", "scheduler.warmup_steps=3", "eval.sample_tokens=0", "log_interval=10"]
    run_dir = root / "run"
    train(compose_train(overrides), run_dir)
    return {"run_dir": run_dir, "items": items_path, "metrics": read_metrics(run_dir / "metrics.jsonl")}
