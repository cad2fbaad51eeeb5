"""run_train.py as a subprocess: the run directory's layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from gpt2.train.metrics import read_metrics
from tests.helpers import TINY_RUN, run_train_cli


@pytest.mark.slow
def test_cli_run_dir_layout(tmp_path: Path, base_overrides: list[str]) -> None:
    result = run_train_cli([*base_overrides, *TINY_RUN, "micro_batch_size=8", "max_steps=2"], cwd=tmp_path)
    names = {p.name for p in result.run_dir.iterdir()}
    assert {".hydra", "checkpoints", "metrics.jsonl", "train.log", "loss.png"} <= names, names
    assert "step 2/2" in (result.run_dir / "train.log").read_text()
    # the end-of-run summary: steps, tokens, time, final val loss, where the checkpoint and plot are
    final_val = [r["val/loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "val/loss" in r][-1]
    summary = re.search(r"done: 2 steps, 1,024 tokens in \d\d:\d\d; final val loss (\S+); checkpoint (\S+); "
                        r"loss plot (\S+)$", result.proc.stdout + result.proc.stderr, re.MULTILINE)
    assert summary, result.proc.stdout + result.proc.stderr
    assert float(summary[1]) == pytest.approx(final_val, abs=1e-4)
    assert Path(summary[2]) == result.run_dir / "checkpoints" / "step_00000002" and Path(summary[3]).is_file()
    overrides = json.dumps(sorted((result.run_dir / ".hydra" / "overrides.yaml").read_text().split()))
    assert "max_steps=2" in overrides
