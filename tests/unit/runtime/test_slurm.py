"""gpt2.runtime.slurm: device indices and the torch.distributed variables exported from submitit's job."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gpt2.runtime.slurm import device_index, init_slurm_env


def test_device_index_wraps_local_rank_over_visible_gpus() -> None:
    assert [device_index(r, 4) for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert device_index(3, 1) == 0  # SLURM gave this task a single GPU
    with pytest.raises(ValueError, match="no GPU is visible"):
        device_index(0, 0)


SLURM_TASK_ENV = {"SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": "/tmp/submitit/%j", "SLURM_JOB_ID": "4242",
                  "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "3",
                  "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}


@pytest.fixture
def restored_environ() -> Iterator[None]:
    """Put os.environ back as it was (init_slurm_env exports variables that monkeypatch never saw)."""
    saved = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SUBMITIT_EXECUTOR", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        os.environ.pop(key, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.usefixtures("restored_environ")
def test_init_slurm_env_exports_torch_distributed_vars() -> None:
    pytest.importorskip("submitit", reason="the `sweep` extra (pip install -e '.[sweep]') is not installed")
    os.environ.update(SLURM_TASK_ENV, CUDA_VISIBLE_DEVICES="0,1")
    assert init_slurm_env() is True
    exported = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    assert exported == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "gpu07"}
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000  # derived from the job id: the same on every task
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # left to SLURM; device_index picks the GPU
    assert init_slurm_env() is False  # already exported (or set by torchrun): nothing to do


@pytest.mark.usefixtures("restored_environ")
def test_init_slurm_env_is_a_no_op_outside_multi_task_jobs() -> None:
    assert init_slurm_env() is False  # plain python / not submitit
    pytest.importorskip("submitit", reason="the `sweep` extra (pip install -e '.[sweep]') is not installed")
    os.environ.update(SLURM_TASK_ENV, SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0")
    assert init_slurm_env() is False  # a single-task job
    assert "RANK" not in os.environ
