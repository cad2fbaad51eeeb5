"""deterministic=true through the real run_train.py: two torch.compile'd bf16 runs on the CPU, with two threads
(Inductor's parallel atomic adds race only with more than one), log the same losses to the last bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, bpe_overrides, losses, subprocess_env

SET_HERE = ("precision", "micro_batch_size", "block_size", "total_batch_tokens")


def compiled_bf16_run(cache: Path, cwd: Path, deterministic: bool) -> dict[int, float]:
    """Train losses of a compiled bf16 run of the tiny model, 2,048-token micro-batches (enough work for
    Inductor to split the embedding's backward over both threads; off, two such runs parted at step 4)."""
    cwd.mkdir()
    args = [a for a in bpe_overrides(cache) if a.split("=")[0] not in SET_HERE]
    args += ["precision=bf16", "micro_batch_size=16", "block_size=128", "total_batch_tokens=2048", "compile=true",
             f"deterministic={str(deterministic).lower()}", "max_steps=8",
             "log_interval=1", "eval.sample_tokens=0", "checkpoint.save_final=false", f"hydra.run.dir={cwd / 'run'}"]
    proc = subprocess.run([sys.executable, str(REPO / "run_train.py"), *args], cwd=cwd,
                          env=subprocess_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return losses(cwd / "run")


@pytest.mark.slow
def test_two_compiled_bf16_cpu_runs_repeat_bit_for_bit(bpe_cache: Path, tmp_path: Path) -> None:
    first = compiled_bf16_run(bpe_cache, tmp_path / "a", deterministic=True)
    second = compiled_bf16_run(bpe_cache, tmp_path / "b", deterministic=True)
    assert len(first) == 8
    assert first == second  # floats compared exactly
