"""gpt2.cli: override keys checked against the schema before Hydra composes."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from gpt2.cli import RunDirCheck, check_override_keys
from gpt2.config import TrainConfig
from gpt2.errors import ConfigError


def test_known_keys_and_group_choices_pass() -> None:
    check_override_keys(TrainConfig, ["model=tiny", "+experiment=shakespeare_cpu", "optimizer.lr=1e-3",
                                      "data.data_files=[a.jsonl]", "hydra.run.dir=x", "-m", "logger.tags=[a]"],
                        {"model", "experiment"})
    with pytest.raises(ConfigError, match=r"did you mean eval\.val_tokens\?"):
        check_override_keys(TrainConfig, ["eval.val_token=5"], {"model"})


def _prepare_run_dir(rank: int, run_dir: str, start: Any) -> None:
    """One torchrun rank's RunDirCheck on the shared run dir, started together with the others."""
    os.environ["RANK"] = str(rank)
    start.wait()
    RunDirCheck().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": run_dir}}}))


def test_ranks_preparing_one_run_dir_at_once_all_pass(tmp_path: Path) -> None:
    """All ranks of a launch create and test-write the same new run dir at the same moment; none may
    find the folder pulled from under it by another rank's check."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(20):
        run_dir = tmp_path / f"outputs{attempt}" / "2026-12-02" / "02-44-30-722f2f"
        start = ctx.Barrier(8)
        procs = [ctx.Process(target=_prepare_run_dir, args=(rank, str(run_dir), start)) for rank in range(8)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(30)
        assert [proc.exitcode for proc in procs] == [0] * 8, f"attempt {attempt}"
        assert run_dir.is_dir()
