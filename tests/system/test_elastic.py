"""Elastic torchrun with real agents on this machine (gloo, c10d rendezvous on localhost; docs/elastic.md): a node
dies and the job finishes on the survivor, a node joins and the job grows; either way the train losses equal an
uninterrupted 1-rank run's. Each test prints its timings (failure or join -> restart) and loss deltas."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, bpe_overrides, losses, run_train_cli, subprocess_env

STEPS = 40
ELASTIC = [f"max_steps={STEPS}", "total_batch_tokens=512", "micro_batch_size=2", "block_size=64", "log_interval=1",
           "scheduler.warmup_steps=2", "checkpoint.interval=2", "checkpoint.keep_last=3", "distributed=ddp",
           "distributed.timeout_s=60", "resume=auto"]
"""8 windows of 64 tokens per step: accumulation 4 on one rank, 2 on each of two; a checkpoint every 2 steps."""
STEP_SLEEP_S = 0.2
"""Each step lasts this much longer (tests/workers/paced_steps.py), so a node can die or join mid-run."""
TORCHRUN = Path(sys.executable).with_name("torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


class Agent:
    """One `torchrun --nnodes=1:2 --nproc-per-node=1` agent (one "node"), output to `<name>.out`."""

    def __init__(self, name: str, port: int, root: Path, overrides: list[str]) -> None:
        self.log = root / f"{name}.out"
        self._out = open(self.log, "w")
        env = subprocess_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", GPT2_TEST_STEP_SLEEP=str(STEP_SLEEP_S))
        self.proc = subprocess.Popen(
            [str(TORCHRUN), "--nnodes=1:2", "--nproc-per-node=1", "--max-restarts=3", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic-test", "--rdzv-conf=last_call_timeout=2",
             "--monitor-interval=0.5", str(REPO / "tests" / "workers" / "paced_steps.py"), *overrides],
            cwd=root, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def kill_node(self) -> None:
        """SIGKILL the agent and its workers at once, as if the machine died."""
        for pid in descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self._out.close()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill_node()


def wait_until(what: str, done, timeout: float, agents: list[Agent]) -> float:  # type: ignore[no-untyped-def]
    """Poll `done()` until true; returns the time it became true. Fails with every agent's output."""
    deadline = time.time() + timeout
    while not done():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(a.output() for a in agents))
        time.sleep(0.05)
    return time.time()


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def records(run_dir: Path) -> int:
    return len(losses(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0


def resumes(output: str) -> list[tuple[int, int]]:
    """(step resumed at, world size) of each start of a worker that resumed, in order."""
    steps = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", output)]
    worlds = [int(w) for w in re.findall(r"(\d+) rank\(s\) on cpu", output)]
    return list(zip(steps, worlds[len(worlds) - len(steps):], strict=True))


@pytest.fixture(scope="module")
def common(bpe_cache: Path) -> list[str]:
    return bpe_overrides(bpe_cache, *ELASTIC)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, common: list[str]) -> dict[int, float]:
    """Train losses of an uninterrupted 1-rank run with the same settings (this also trains the BPE once)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run_train_cli([*common, f"hydra.run.dir={root / 'run'}"], cwd=root)
    reference = losses(root / "run")
    assert sorted(reference) == list(range(1, STEPS + 1))
    return reference


def compare(run_dir: Path, reference: dict[int, float], resumed_at: int, what: str) -> None:
    got = losses(run_dir)  # the last record of each step: the resumed attempt's after `resumed_at`
    assert sorted(got) == list(range(1, STEPS + 1)), got
    after = max(abs(got[s] - reference[s]) for s in range(resumed_at + 1, STEPS + 1))
    before = max(abs(got[s] - reference[s]) for s in range(1, resumed_at + 1))
    print(f"{what}: resumed at step {resumed_at}; max |delta train loss| vs the uninterrupted 1-rank run: "
          f"steps {resumed_at + 1}-{STEPS} {after:.2e}, steps 1-{resumed_at} {before:.2e}")
    assert after < 1e-4, (after, got, reference)
    assert before < 1e-4, (before, got, reference)


@pytest.mark.slow
def test_a_node_dies_and_the_job_finishes_on_the_survivor(tmp_path: Path, common: list[str],
                                                          uninterrupted: dict[int, float]) -> None:
    port, run_dir = free_port(), tmp_path / "run"
    overrides = [*common, f"hydra.run.dir={run_dir}"]
    survivor = Agent("survivor", port, tmp_path, overrides)
    agents = [survivor]
    try:
        wait_until("the first agent to host the rendezvous", lambda: listening(port), 60, agents)
        doomed = Agent("doomed", port, tmp_path, overrides)  # not the rendezvous host: the job can outlive it
        agents.append(doomed)
        wait_until("5 steps at world size 2", lambda: records(run_dir) >= 5, 90, agents)
        assert "2 rank(s) on cpu" in survivor.output()
        killed = time.time()
        doomed.kill_node()
        failed = wait_until("the survivor's worker to fail", lambda: "failed (exitcode" in survivor.output(), 120,
                            agents)
        restarted = wait_until("the restart", lambda: len(resumes(survivor.output())) >= 1, 120, agents)
        assert survivor.wait(180) == 0, survivor.output()
        finished = time.time()
    finally:
        for agent in agents:
            agent.close()
    (resumed_at, world), = resumes(survivor.output())
    assert world == 1 and resumed_at >= 4, survivor.output()
    print(f"node killed -> survivor's worker failed {failed - killed:.1f} s -> resumed at world size 1 "
          f"{restarted - killed:.1f} s -> finished {finished - killed:.1f} s after the kill")
    compare(run_dir, uninterrupted, resumed_at, "a node died (2 -> 1)")


@pytest.mark.slow
def test_a_node_joins_and_the_job_grows(tmp_path: Path, common: list[str], uninterrupted: dict[int, float]) -> None:
    port, run_dir = free_port(), tmp_path / "run"
    overrides = [*common, f"hydra.run.dir={run_dir}"]
    first = Agent("first", port, tmp_path, overrides)
    agents = [first]
    try:
        wait_until("3 steps at world size 1", lambda: records(run_dir) >= 3, 90, agents)
        assert "1 rank(s) on cpu" in first.output()
        joined = time.time()
        agents.append(Agent("joiner", port, tmp_path, overrides))
        stopped = wait_until("the first agent to stop its worker", lambda: "SIGTERM received" in first.output(),
                             60, agents)
        grown = wait_until("the restart at world size 2", lambda: len(resumes(first.output())) >= 1, 60, agents)
        assert [agent.wait(180) for agent in agents] == [0, 0], [agent.output() for agent in agents]
        finished = time.time()
    finally:
        for agent in agents:
            agent.close()
    (resumed_at, world), = resumes(first.output())
    assert world == 2, first.output()
    assert f"preemption signal received: saving a checkpoint at step {resumed_at}" in first.output()  # nothing lost
    print(f"node joined -> running worker stopped (checkpoint at step {resumed_at}) {stopped - joined:.1f} s -> "
          f"resumed at world size 2 {grown - joined:.1f} s -> finished {finished - joined:.1f} s after the join")
    compare(run_dir, uninterrupted, resumed_at, "a node joined (1 -> 2)")


def test_an_elastic_launch_without_a_fixed_run_dir_is_refused(tmp_path: Path, base_overrides: list[str]) -> None:
    env = subprocess_env(TORCHELASTIC_RUN_ID="job", TORCHELASTIC_MAX_RESTARTS="3")
    args = [sys.executable, str(REPO / "run_train.py"), *base_overrides, "dry_run=true"]
    refused = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: torchrun --max-restarts=3 restarts the workers"), refused.stderr
    assert "hydra.run.dir=" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "outputs").exists()
    fixed = subprocess.run([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
    assert fixed.returncode == 0, fixed.stderr
