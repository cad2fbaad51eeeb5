"""Shared test helpers: compose the real Hydra config, run the real entry points."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gpt2.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
sys.path.insert(0, str(REPO))
from run_train import register_configs  # noqa: E402

register_configs()


def compose_train(overrides: list[str]) -> TrainConfig:
    """conf/train.yaml with `overrides`, converted to the typed TrainConfig (as run_train does)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        dcfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_object(dcfg)  # type: ignore[return-value]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    env.pop("GPT2_RUN_STAMP", None)
    return env


@dataclass
class RunResult:
    proc: subprocess.CompletedProcess
    run_dir: Path


def _run_dir_from(output: str, cwd: Path) -> Path:
    match = re.search(r"run dir (\S+)", output)
    if match:
        return (cwd / match.group(1)).resolve()
    dirs = sorted((cwd / "outputs").glob("*/*"))
    if len(dirs) != 1:
        raise AssertionError(f"cannot find the run dir in {cwd}:\n{output}")
    return dirs[0].resolve()


def run_train_cli(overrides: list[str], cwd: Path, timeout: float = 300, check: bool = True) -> RunResult:
    """`python run_train.py overrides...` in `cwd` (so outputs/ lands there)."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(REPO / "run_train.py"), *overrides], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"run_train.py failed ({proc.returncode}):\n{output}")
    return RunResult(proc, _run_dir_from(output, cwd) if proc.returncode == 0 else cwd)


def run_torchrun(overrides: list[str], cwd: Path, nproc: int = 2, delay_rank1_s: float = 0.0,
                 timeout: float = 300, script: str = "delayed_start.py",
                 env: dict[str, str] | None = None) -> RunResult:
    """`torchrun --standalone --nproc_per_node=N run_train.py ...`; optionally rank 1 starts late."""
    cwd.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    path = REPO / "tests" / "workers" / script
    env = subprocess_env(GPT2_TEST_DELAY_RANK1=str(delay_rank1_s), **(env or {}))
    t0 = time.time()
    proc = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={nproc}", str(path), *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}) after {time.time() - t0:.0f}s:\n{output}")
    return RunResult(proc, _run_dir_from(output, cwd))
