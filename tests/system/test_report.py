"""run_report.py on a real two-job multirun (logger=tensorboard) whose job 0 fails: reported while job 1 runs,
after job 1 is preempted, and after it is resumed to the end; every figure checked against the run's own files,
without torch or the training stack imported; a folder without runs is one error line."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2.report import sweep_report
from gpt2.report.table import label
from gpt2.train.metrics import read_metrics
from gpt2.train.preemption import PREEMPTED_EXIT_CODE
from tests.helpers import REPO, run_train_cli, subprocess_env

# Long enough (40 steps) to be caught running; log_interval 2 and an eval every 10 steps.
SWEEP = ["block_size=32", "micro_batch_size=4", "total_batch_tokens=128", "max_steps=40", "log_interval=2",
         "eval.interval=10", "eval.iters=2", "eval.sample_tokens=4", "scheduler.warmup_steps=2", "resume=auto",
         "logger=tensorboard"]

FORBIDDEN = ("torch", "hydra", "omegaconf", "gpt2.train", "gpt2.model", "gpt2.checkpoint", "gpt2.data", "gpt2.cli")

REPORT_AND_IMPORTS = """
import json, sys
sys.argv = ["run_report.py", *sys.argv[1:]]
sys.path.insert(0, {repo!r})
from run_report import main
code = main()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "hydra", "omegaconf")
                        or m.startswith(("gpt2.train", "gpt2.model", "gpt2.checkpoint", "gpt2.data", "gpt2.cli")))))
sys.exit(code)
"""


def report(folder: Path, out: Path) -> tuple[subprocess.CompletedProcess, list[dict[str, str]]]:
    """`python run_report.py FOLDER --out OUT` (through its main, then listing the heavy modules it imported) and
    the rows of its CSV."""
    proc = subprocess.run([sys.executable, "-c", REPORT_AND_IMPORTS.format(repo=str(REPO)), str(folder), "--out",
                           str(out)], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    *_, imported = proc.stdout.strip().splitlines()
    assert json.loads(imported) == [], imported  # the report read files; it loaded none of the training stack
    with open(out / "report.csv", newline="") as f:
        return proc, list(csv.DictReader(f))


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the sweep exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in read_metrics(path) if "train/loss" in r] if path.exists() else []


@pytest.mark.slow
def test_report_of_a_sweep_while_running_preempted_and_resumed(tmp_path: Path, base_overrides: list[str]) -> None:
    overrides = [*base_overrides, *SWEEP]
    log = open(tmp_path / "sweep.out", "w")  # closed below
    sweep = subprocess.Popen([sys.executable, str(REPO / "run_train.py"), "-m", *overrides, "optimizer.lr=-1,3e-3"],
                             cwd=tmp_path, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(list(tmp_path.glob("multirun/*/*/1"))) == 1, sweep, "job 1 started")
        (job1,) = tmp_path.glob("multirun/*/*/1")
        folder = job1.parent
        wait_for(lambda: len(train_records(job1)) >= 2, sweep, "job 1 logged two train records")
        os.kill(sweep.pid, signal.SIGSTOP)  # job 1 is running: the report sees it mid-run
        try:
            proc, rows = report(folder, tmp_path / "while_running")
        finally:
            os.kill(sweep.pid, signal.SIGCONT)
        assert [r["run"] for r in rows] == ["1", "0"]  # sorted by val loss: job 0 has none
        running, failed = rows
        assert running["status"] == "running" and 2 * 2 <= int(running["steps"]) < 40
        assert failed["status"] == "failed" and failed["detail"] == "optimizer.lr=-1.0 must be greater than 0."
        wait_for(lambda: len(train_records(job1)) >= 6, sweep, "job 1 logged six train records")
        sweep.send_signal(signal.SIGTERM)  # a preemption: job 1 saves a checkpoint and exits 75, ending the sweep
        assert sweep.wait(timeout=120) == PREEMPTED_EXIT_CODE, (tmp_path / "sweep.out").read_text()
    finally:
        if sweep.poll() is None:
            sweep.kill()
        log.close()
    _, rows = report(folder, tmp_path / "preempted")
    preempted_at = int(json.loads((next(job1.glob("checkpoints/step_*")) / "meta.json").read_text())["step"])
    assert rows[0]["status"] == "preempted" and rows[0]["detail"].startswith(f"at step {preempted_at};")

    # The same job resumed in its own dir (as a requeued SLURM job does) runs to the end.
    run_train_cli([*overrides, "optimizer.lr=0.003", f"hydra.run.dir={job1}"], cwd=tmp_path)  # as the sweep wrote it
    proc, rows = report(folder, folder)
    assert proc.stdout.startswith((folder / "report.md").read_text())  # the table printed is the one written
    assert [r["run"] for r in rows] == ["1", "0"]
    assert list(rows[0])[:2] == ["run", "optimizer.lr"]  # the only override that differs between the jobs
    assert [r["optimizer.lr"] for r in rows] == ["0.003", "-1"]
    done = rows[0]
    assert (done["status"], done["detail"]) == ("finished", f"preempted at step {preempted_at} and resumed")
    records = read_metrics(job1 / "metrics.jsonl")
    val = {r["step"]: r["val/loss"] for r in records if "val/loss" in r}  # the last record of each step
    assert sorted(val) == [0, 10, 20, 30, 40]
    assert float(done["final val loss"]) == val[40] and float(done["best val loss"]) == min(val.values())
    assert (int(done["steps"]), int(done["max steps"]), int(done["tokens"])) == (40, 40, 40 * 128)
    speeds = {r["step"]: r["perf/tokens_per_s"] for r in records if "perf/tokens_per_s" in r}
    assert float(done["tok/s"]) == pytest.approx(statistics.median(speeds.values()))
    assert float(done["wall time (s)"]) > 0
    assert (rows[1]["status"], rows[1]["final val loss"], rows[1]["steps"]) == ("failed", "", "")
    png = (folder / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    in_process = sweep_report(folder, tmp_path / "again")
    assert [label(run, in_process.keys) for run in in_process.runs] == ["optimizer.lr=0.003", "optimizer.lr=-1"]
    assert in_process.runs[0].val_curve == sorted(val.items())  # the curve drawn for job 1

    # `tensorboard --logdir <sweep>` finds job 1's run (two sessions' event files); job 0 never started training.
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(folder))
    multiplexer.Reload()
    assert list(multiplexer.Runs()) == ["1"] and len(list(job1.glob("events.out.tfevents.*"))) == 2
    assert [e.step for e in multiplexer.Tensors("1", "val/loss")] == [0, 10, 20, 30, 40]


def test_a_folder_without_runs_is_one_error_line(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(REPO / "run_report.py"), str(tmp_path / "empty")], env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (f"error: {tmp_path / 'empty'} holds no runs (no folder with .hydra/ or metrics.jsonl below "
                           f"it); give a sweep folder (multirun/<date>/<time>), outputs/ or a run folder.\n")
