"""Sweeps on a real (one-node, local) SLURM cluster through Hydra's submitit launcher:
two jobs that each train and checkpoint in their own job dir, and a job that is signalled
(as SLURM does before a time limit), checkpoints, requeues itself and resumes to the end.

The cluster is started by tests/slurm/start_cluster.sh (needs root: it apt-installs slurm-wlm
and munge when missing); when that is not possible the tests are skipped with the reason."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gpt2.train.metrics import read_metrics
from tests.helpers import REPO, subprocess_env

cluster_test = pytest.mark.usefixtures("slurm_cluster")
SCRIPTS = REPO / "tests" / "slurm"


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    """A running one-node cluster; stopped at the end only if this fixture started it."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="the `sweep` extra (pip install -e '.[sweep]') is not installed")
    if os.geteuid() != 0:
        pytest.skip("tests/slurm/start_cluster.sh needs root (it installs and starts slurmctld/slurmd)")
    proc = subprocess.run(["bash", str(SCRIPTS / "start_cluster.sh")], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.skip(f"cannot start a local SLURM cluster: {(proc.stdout + proc.stderr).strip()[-800:]}")
    started = "starting slurmctld" in proc.stdout
    yield
    if started:
        subprocess.run(["bash", str(SCRIPTS / "stop_cluster.sh")], capture_output=True, timeout=60)




TINY = ["model=tiny", "block_size=32", "micro_batch_size=4", "total_batch_tokens=128", "eval.interval=0",
        "eval.iters=2", "eval.sample_tokens=8", "scheduler.warmup_steps=2", "log_interval=10", "progress_bar=false",
        "data.num_proc=1"]


LAUNCHER = ["hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            "hydra.launcher.timeout_min=5"]


@pytest.fixture(scope="module")
def data_overrides(tiktoken_file: str, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("slurm_data")
    words = "the king queen lord lady speak now good my heart love night day sword crown blood time".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(4 + i % 9)) + "."
                                for i in range(3000)))
    return ["data=text", f"data.path={corpus}", f"data.cache_dir={root / 'cache'}",
            f"tokenizer.path={tiktoken_file}"]


def sweep_cmd(args: list[str]) -> list[str]:
    # submitit starts the jobs with sys.executable (the venv python); PYTHONPATH reaches them via sbatch's env.
    return [sys.executable, str(REPO / "run_train.py"), "-m", *LAUNCHER, *args]


def the_sweep_dir(cwd: Path) -> Path:
    sweeps = sorted((cwd / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def submitit_logs(sweep_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_log.out")))


@cluster_test
@pytest.mark.slurm
@pytest.mark.slow
def test_two_jobs_train_on_slurm_each_in_its_own_dir(data_overrides: list[str], tmp_path: Path) -> None:
    proc = subprocess.run(sweep_cmd([*TINY, *data_overrides, "max_steps=10", "optimizer.lr=1e-3,3e-3"]),
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep_dir = the_sweep_dir(tmp_path)
    for num, lr in ((0, "0.001"), (1, "0.003")):
        job_dir = sweep_dir / str(num)
        assert f"optimizer.lr={lr}" in (job_dir / ".hydra" / "overrides.yaml").read_text()
        assert (job_dir / "checkpoints" / "step_00000010" / "COMPLETE").exists(), sorted(job_dir.rglob("*"))
    logs = submitit_logs(sweep_dir)
    # two SLURM jobs ran them (submitit's own log lines; Hydra's handler repeats some of them)
    assert len(re.findall(r"^submitit INFO .* Starting with JobEnvironment\(job_id=", logs, re.M)) == 2, logs
    assert len(re.findall(r"^submitit INFO .* Job completed successfully$", logs, re.M)) == 2, logs
    script = next((sweep_dir / ".submitit").glob(".submission_file_*.sh")).read_text()
    assert "#SBATCH --signal=USR1@120" in script and "#SBATCH --array=0-1" in script, script


def _squeue_state(job_name: str) -> tuple[str, str] | None:
    """(job id, state code) of the job named `job_name`, or None when it is not queued."""
    out = subprocess.run(["squeue", "-h", "-n", job_name, "-o", "%i %t"], capture_output=True, text=True).stdout.split()
    return (out[0], out[1]) if out else None


def _wait_for(what: str, check: Callable[[], object], timeout: float, proc: subprocess.Popen) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:  # the sweep ended early (its log says why)
            raise AssertionError(f"the sweep exited ({proc.returncode}) while waiting for {what}")
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@cluster_test
@pytest.mark.slurm
@pytest.mark.slow
def test_two_tasks_of_one_slurm_job_train_as_one_ddp_group(data_overrides: list[str], tmp_path: Path) -> None:
    """tasks_per_node=2: submitit runs the Hydra job twice, init_slurm_env turns SLURM's task ids
    into RANK/WORLD_SIZE/MASTER_*, and the two tasks train one model (gloo DDP) in one job dir."""
    proc = subprocess.run(sweep_cmd([*TINY, *data_overrides, "max_steps=10", "total_batch_tokens=256",
                                     "distributed=ddp", "hydra.launcher.tasks_per_node=2", "optimizer.lr=1e-3"]),
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_dir = the_sweep_dir(tmp_path) / "0"
    logs = submitit_logs(job_dir.parent)
    assert re.search(r"submitit job \d+: rank 0/2 \(local rank 0\)", logs), logs
    assert re.search(r"submitit job \d+: rank 1/2 \(local rank 1\)", logs), logs
    assert "2 rank(s) on cpu" in logs, logs
    checkpoint = job_dir / "checkpoints" / "step_00000010"
    assert (checkpoint / "COMPLETE").exists() and (checkpoint / "rank_00001.pt").exists(), sorted(job_dir.rglob("*"))


@contextlib.contextmanager
def signalled_sweep(tmp_path: Path, overrides: list[str]) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """Start a one-job sweep, wait until it trained 20 steps, send it SIGUSR1 (what `--signal=USR1@120`
    sends before the time limit); yields (sweep process, job name, job id). Cleans up on the way out."""
    name = f"gpt2-preempt-{os.getpid()}-{tmp_path.name}"
    with open(tmp_path / "sweep.log", "w") as log:
        proc = subprocess.Popen(sweep_cmd([*overrides, f"hydra.launcher.name={name}"]), cwd=tmp_path,
                                env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            def trained_a_bit() -> bool:
                metrics = list((tmp_path / "multirun").glob("*/*/0/metrics.jsonl"))
                return bool(metrics) and sum("train/loss" in r for r in read_metrics(metrics[0])) >= 2

            _wait_for("20 training steps", trained_a_bit, 90, proc)
            job_id, _ = _squeue_state(name) or ("", "")
            subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
            yield proc, name, job_id
        finally:
            if proc.poll() is None:
                proc.kill()
                subprocess.run(["scancel", "-n", name], check=False)


@cluster_test
@pytest.mark.slurm
@pytest.mark.slow
def test_signalled_job_checkpoints_requeues_and_resumes(data_overrides: list[str], tmp_path: Path) -> None:
    """SIGUSR1 -> checkpoint -> scontrol requeue -> the same job dir -> resume=auto continues from
    that step to max_steps; the sweep succeeds."""
    overrides = [*TINY, *data_overrides, "max_steps=120", "resume=auto", "optimizer.lr=1e-3"]
    with signalled_sweep(tmp_path, overrides) as (proc, name, job_id):
        # SLURM holds a requeued job back for a while (BeginTime); make it eligible now to keep the test
        # short, again while it stays pending (an update during the requeue itself may not stick).
        _wait_for("the requeued job", lambda: (_squeue_state(name) or ("", ""))[1] == "PD", 60, proc)

        pending_since: list[float] = []

        def restarted() -> bool:
            if proc.poll() is not None:  # it already ran to the end
                return True
            state = _squeue_state(name)
            if state is None or state[1] == "PD":  # None: between requeue states, or squeue was busy
                pending_since.append(time.monotonic())
                # Nudge only once the cancelled run's step has had time to end (srun waits up to 12 s):
                # a restart in the same second raced with it and the relaunched job failed at once.
                if pending_since[-1] - pending_since[0] >= 15:
                    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
                return False
            return True

        try:
            _wait_for("the requeued job to start again", restarted, 150, proc)
        except AssertionError as err:  # say why SLURM kept it back
            show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
            nodes = subprocess.run(["sinfo", "-N", "-o", "%N %T %C %E"], capture_output=True, text=True).stdout
            raise AssertionError(f"{err}\n{show}\n{nodes}") from None
        assert proc.wait(timeout=180) == 0, (tmp_path / "sweep.log").read_text()
    job_dir = the_sweep_dir(tmp_path) / "0"
    logs = submitit_logs(job_dir.parent)
    assert "SIGUSR1 received" in logs and "requeued SLURM job" in logs, logs
    steps = sorted(int(p.name.split("_")[1]) for p in (job_dir / "checkpoints").glob("step_*"))
    assert len(steps) == 2 and 0 < steps[0] < 120 and steps[1] == 120, steps  # preemption + final checkpoints
    assert f"resumed from {job_dir / 'checkpoints' / f'step_{steps[0]:08d}'} at step {steps[0]}" in logs, logs
    assert (job_dir / "checkpoints" / "step_00000120" / "COMPLETE").exists()
    # the same SLURM job ran twice
    assert len(re.findall(r"^submitit INFO .* Starting with JobEnvironment\(", logs, re.M)) == 2, logs


@cluster_test
@pytest.mark.slurm
@pytest.mark.slow
def test_signalled_job_without_retries_left_fails_the_sweep_clearly(data_overrides: list[str],
                                                                   tmp_path: Path) -> None:
    overrides = [*TINY, *data_overrides, "max_steps=120", "resume=auto", "optimizer.lr=1e-3",
                 "hydra.launcher.max_num_timeout=0"]
    with signalled_sweep(tmp_path, overrides) as (proc, _, job_id):
        assert proc.wait(timeout=60) != 0
    output = (tmp_path / "sweep.log").read_text()
    assert re.search(rf"job #0 \(.*optimizer\.lr=0\.001.*\) failed: preempted at step \d+; checkpoint "
                     rf"saved.*SLURM job {job_id} was not requeued: .*raise it to allow more", output), output
    assert list((the_sweep_dir(tmp_path) / "0" / "checkpoints").glob("step_*/COMPLETE"))  # resumable by hand
