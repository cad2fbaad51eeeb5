"""budget.gpu through the real run_train.py dry run: a GPU name the peak-FLOPs table lacks is one error line
(exit 2, no traceback) naming the known GPUs and peak_flops= as the way out; a known name in any case, or
peak_flops=, gives a time estimate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gpt2.runtime.device import PEAK_FLOPS_BF16
from tests.helpers import REPO, subprocess_env


def dry_run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "run_train.py"), "experiment=gpt2_124m_fineweb", "dry_run=true",
                           f"data.cache_dir={tmp_path / 'cache'}", *overrides], cwd=tmp_path,
                          env=subprocess_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)


def test_an_unknown_gpu_name_is_one_error_naming_the_known_ones_and_peak_flops(tmp_path: Path) -> None:
    proc = dry_run(tmp_path, "budget.gpu=NoSuchGPU")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: budget.gpu='NoSuchGPU' is not a GPU of the peak-FLOPs "
                                                   "table"), proc.stderr
    assert all(name in lines[0] for name in PEAK_FLOPS_BF16) and "peak_flops=" in lines[0]
    assert "no time estimate" not in proc.stdout and not list(tmp_path.glob("outputs/*/*"))


def test_a_known_name_in_any_case_or_peak_flops_gives_the_time(tmp_path: Path) -> None:
    known = dry_run(tmp_path, "budget.gpu=h100")
    assert known.returncode == 0, known.stderr
    assert "≈ 0.67 h on 8×h100 at 45% MFU" in known.stdout  # the recipe's 8 GPUs at H100's 989 TFLOP/s
    given = dry_run(tmp_path, "budget.gpu=NoSuchGPU", "peak_flops=494.5e12")
    assert given.returncode == 0, given.stderr
    assert "≈ 1.33 h on 8 GPU(s) at peak_flops at 45% MFU" in given.stdout
