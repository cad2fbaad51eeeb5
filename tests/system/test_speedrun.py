"""The speedrun recipe end to end, as real subprocesses: an ablation sweep over two of its switches as one
Hydra multirun, and the dry run's budgets side by side."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.checkpoint.handle import find_checkpoint
from gpt2.train.metrics import read_metrics
from tests.helpers import REPO, subprocess_env

TINY = ["compile=false", "max_steps=4", "block_size=32", "micro_batch_size=4", "total_batch_tokens=128",
        "scheduler.warmup_steps=1", "eval.interval=0", "eval.iters=1", "eval.sample_tokens=0", "log_interval=1",
        "progress_bar=false", "data.num_proc=1"]


def test_an_ablation_of_two_switches_runs_as_one_multirun(tmp_path: Path, base_overrides: list[str]) -> None:
    args = ["-m", "experiment=speedrun_cpu", "ablate=qk_norm,rope", *base_overrides, *TINY,
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run([sys.executable, str(REPO / "run_train.py"), *args], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    returned = {int(n): float(v) for n, v in re.findall(r"job #(\d+) returned final val loss (\S+)", output)}
    assert sorted(returned) == [0, 1], output
    models = {}
    for num in (0, 1):
        job = tmp_path / "sweep" / str(num)
        models[num] = find_checkpoint(job).model_config  # what each job trained, as its checkpoint records it
        assert [r["val/loss"] for r in read_metrics(job / "metrics.jsonl") if "val/loss" in r][-1] == pytest.approx(
            returned[num], abs=1e-6)
    # job 0 trained the recipe without QK-norm, job 1 without rotary positions; each kept the other switches
    assert (models[0].qk_norm, models[0].position_embedding) == (False, "rope")
    assert (models[1].qk_norm, models[1].position_embedding) == (True, "learned")
    for model in models.values():
        assert (model.mlp_activation, model.norm, model.tie_embeddings) == ("relu2", "rmsnorm", False)


def test_the_dry_run_prints_the_flagship_and_speedrun_budgets(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "run_train.py"), "experiment=speedrun_cpu", "dry_run=true",
                           f"data.cache_dir={tmp_path / 'empty-cache'}"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^#   experiment=gpt2_124m_fineweb +10\.0B tokens.*\[1x the flagship's tokens\]$", proc.stdout,
                     re.MULTILINE), proc.stdout
    assert re.search(r"^#   experiment=gpt2_124m_speedrun +2\.6B tokens.*\[0\.26x the flagship's tokens\]$",
                     proc.stdout, re.MULTILINE), proc.stdout
