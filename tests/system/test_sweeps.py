"""Sweeps end to end, as real subprocesses: Hydra multirun (one dir, checkpoint and W&B run per
job), an Optuna search persisted in sqlite, a failing job that names its overrides, and a
two-node torchrun launch (two agents on this machine) that agrees on one run dir."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gpt2.train.metrics import read_metrics
from tests.helpers import REPO, subprocess_env

TINY = ["model=tiny", "max_steps=10", "block_size=32", "micro_batch_size=4", "total_batch_tokens=128",
        "eval.interval=0", "eval.iters=2", "eval.sample_tokens=8", "scheduler.warmup_steps=2", "log_interval=5",
        "progress_bar=false", "data.num_proc=1"]


@pytest.fixture(scope="module")
def sweep_overrides(tiktoken_file: str, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """TINY training on a small generated text corpus, tokenized once into a shared cache."""
    root = tmp_path_factory.mktemp("sweep_data")
    rng = random.Random(0)
    words = ("the king queen lord lady speak now good my heart love night day sword crown blood time "
             "death life sweet fair world man woman honour grace").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(3000)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines))
    return [*TINY, "data=text", f"data.path={corpus}", f"data.cache_dir={root / 'cache'}",
            f"tokenizer.path={tiktoken_file}"]


def sweep_env(tmp_path: Path) -> dict[str, str]:
    """The test env with W&B's own dirs inside tmp_path (never ~/.cache or ~/.config)."""
    wandb_home = tmp_path / "wandb_home"
    return subprocess_env(WANDB_MODE="offline", WANDB_CACHE_DIR=str(wandb_home / "cache"),
                          WANDB_CONFIG_DIR=str(wandb_home / "config"), WANDB_DATA_DIR=str(wandb_home / "data"),
                          WANDB_SILENT="true")


def run_multirun(args: list[str], cwd: Path, timeout: float = 150) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    env = sweep_env(cwd)
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, str(REPO / "run_train.py"), "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def job_dirs(cwd: Path) -> dict[int, Path]:
    """The job dirs of the single sweep under cwd/multirun/<date>/<time>/<job num>."""
    sweeps = sorted((cwd / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    return {int(p.name): p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit()}


def final_val_loss(run_dir: Path) -> float:
    return [r["val/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r][-1]


def assert_complete_checkpoint(run_dir: Path, step: int = 10) -> None:
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "COMPLETE").exists(), sorted(run_dir.rglob("*"))


def test_multirun_two_jobs_each_with_own_dir_checkpoint_and_wandb_run(tmp_path: Path,
                                                                      sweep_overrides: list[str]) -> None:
    proc = run_multirun([*sweep_overrides, "logger=wandb", "logger.mode=offline", "optimizer.lr=1e-4,3e-3"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    jobs = job_dirs(tmp_path)
    assert sorted(jobs) == [0, 1]
    returned = {int(n): float(v) for n, v in re.findall(r"job #(\d+) returned final val loss (\S+)", output)}
    assert sorted(returned) == [0, 1], output
    wandb_runs = set()
    for num, lr in ((0, "0.0001"), (1, "0.003")):
        run_dir = jobs[num]
        assert f"optimizer.lr={lr}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert_complete_checkpoint(run_dir)
        assert returned[num] == pytest.approx(final_val_loss(run_dir), abs=1e-6)  # the task returns the val loss
        runs = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        wandb_runs.add(runs[0].name.rsplit("-", 1)[-1])
    assert len(wandb_runs) == 2  # one W&B run per job
    assert returned[1] < returned[0]  # 30x the lr learns faster in 10 steps: the jobs really differ


def test_optuna_search_persists_trials_in_sqlite(tmp_path: Path, sweep_overrides: list[str]) -> None:
    optuna = pytest.importorskip("optuna", reason="the `sweep` extra (pip install -e '.[sweep]') is not installed")
    db = tmp_path / "optuna.db"
    args = [*sweep_overrides, "hparams_search=lr_optuna", "hydra.sweeper.n_trials=3",
            f"hydra.sweeper.storage=sqlite:///{db}", "hydra.sweeper.study_name=test",
            # the shipped space targets real runs; command-line sweeps replace its warmup and batch choices
            "scheduler.warmup_steps=choice(0,2)", "total_batch_tokens=choice(128,256)"]
    proc = run_multirun(args, tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    jobs = job_dirs(tmp_path)
    assert sorted(jobs) == [0, 1, 2]
    losses = {num: final_val_loss(d) for num, d in jobs.items()}
    for d in jobs.values():
        assert_complete_checkpoint(d)
    study = optuna.load_study(study_name="test", storage=f"sqlite:///{db}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for trial in trials:  # trial N is job N; Optuna got the job's final val loss
        assert trial.value == pytest.approx(losses[trial.number], abs=1e-6)
        assert 1e-4 <= trial.params["optimizer.lr"] <= 3e-3
    results = OmegaConf.load(jobs[0].parent / "optimization_results.yaml")
    assert results.best_value == pytest.approx(min(losses.values()), abs=1e-6)


def test_failing_job_names_its_overrides_and_the_sweep_goes_on(tmp_path: Path, sweep_overrides: list[str]) -> None:
    proc = run_multirun([*sweep_overrides, "optimizer.lr=-1,3e-3"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    # job #0 fails with the job number, its overrides and the reason in one message, without a traceback...
    assert re.search(r"^error: job #0 \(.*optimizer\.lr=-1\) failed: optimizer\.lr=-1\.0 must be greater than 0",
                     output, re.MULTILINE), output
    assert "Traceback" not in output, output
    # ...and the other job of the batch still ran to the end.
    jobs = job_dirs(tmp_path)
    assert not (jobs[0] / "checkpoints").exists()
    assert_complete_checkpoint(jobs[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_on_one_machine_agrees_on_one_run_dir(tmp_path: Path, sweep_overrides: list[str]) -> None:
    """Two torchrun agents (--nnodes=2, c10d rendezvous), the second started 3 s later: like two
    SLURM nodes. Both ranks must write into one run dir and finish with a checkpoint."""
    torchrun = Path(sys.executable).with_name("torchrun")
    port = free_port()
    env = sweep_env(tmp_path)
    args = [*sweep_overrides, "distributed=ddp", "total_batch_tokens=256"]
    procs = []
    for node_rank in (0, 1):
        cmd = [str(torchrun), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=sweeps-{port}",
               str(REPO / "run_train.py"), *args]
        log = open(tmp_path / f"node{node_rank}.log", "w")  # closed below
        procs.append((subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        if node_rank == 0:
            time.sleep(3)
    try:
        codes = [p.wait(timeout=150) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = "\n".join((tmp_path / f"node{i}.log").read_text() for i in (0, 1))
    assert codes == [0, 0], logs
    run_dirs = sorted((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    assert "2 rank(s)" in logs, logs
    assert_complete_checkpoint(run_dirs[0])
    assert (run_dirs[0] / "train.log").exists()
