"""gpt2.train.plan and the dry run: the run plan resolved once, saved in checkpoints, printed by dry_run=true."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.checkpoint.format import read_meta
from gpt2.train.train import train
from tests.helpers import REPO, TINY_RUN, bpe_overrides, compose_train, run_train_cli, subprocess_env


def test_dry_run_plans_the_tokenizer_vocabulary(tmp_path: Path, bpe_cache: Path) -> None:
    from gpt2.train.dry_run import dry_run

    text = dry_run(compose_train(bpe_overrides(bpe_cache)), tmp_path)
    plan = text.split("# run plan (derived)")[1]
    assert "vocab_size: 4096" in plan and "vocab_size: null" in text.split("# run plan (derived)")[0]
    assert not list(tmp_path.iterdir())


def test_config_is_not_mutated_and_the_plan_is_saved(tmp_path: Path, base_overrides: list[str]) -> None:
    import copy


    cfg = compose_train([*base_overrides, *TINY_RUN, "micro_batch_size=8", "precision=auto", "max_steps=2",
                         "eval_interval=0"])
    before = copy.deepcopy(cfg)
    train(cfg, tmp_path)
    assert cfg == before  # precision stays "auto", the model stays the composed one
    meta = read_meta(tmp_path / "checkpoints" / "step_00000002")
    assert meta["config"]["precision"]["name"] == "auto"
    assert meta["plan"]["precision"] in ("bf16", "fp32") and meta["plan"]["grad_accum"] == 2
    assert meta["config"]["model"]["pad_vocab_multiple"] is None  # resolved in the plan: 1 on CPU (64 on CUDA)
    assert meta["config"]["model"]["vocab_size"] is None  # the preset follows the tokenizer: GPT-2's in the plan
    assert meta["plan"]["model"] == {**meta["config"]["model"], "pad_vocab_multiple": 1, "vocab_size": 50257}


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path: Path, base_overrides: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "run_train.py"), *base_overrides, *TINY_RUN,
                           "micro_batch_size=8", "dry_run=true"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# composed config" in out and "# run plan (derived)" in out and "grad_accum: 2" in out
    assert ("model tiny: 3.33M parameters; 1 rank(s) on cpu; fp32; micro_batch_size 8, grad accumulation 2; 512 "
            "tokens/step x 6 steps") in out, out
    assert "# checks passed" in out
    assert not (tmp_path / "outputs").exists()  # a dry run leaves no run directory behind
    bad = run_train_cli([*base_overrides, *TINY_RUN, "micro_batch_size=7", "dry_run=true"], cwd=tmp_path,
                        check=False)
    assert bad.proc.returncode == 2 and bad.proc.stderr.startswith("error: total_batch_tokens=512 is not divisible")
