"""Kills at random moments: SIGKILL during checkpoint saves and retention never leaves a complete-looking but
partial checkpoint, and SIGKILL/SIGTERM during data preparation resume to byte-identical shards. The
processes these tests kill are in tests/workers/."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from gpt2.checkpoint.handle import find_checkpoint
from gpt2.config import DataConfig
from gpt2.data.corpus import load_prepared
from gpt2.data.preprocess import prepare_data
from tests.helpers import REPO, WORKERS, load_toy_checkpoint, run_train_cli, subprocess_env


@pytest.mark.slow
def test_sigkill_during_save_never_corrupts(tmp_path: Path) -> None:
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    steps, interrupted = [], 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(WORKERS), "save_loop", str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=REPO)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, "save loop produced no checkpoint in 60 s"
            assert proc.stdout.readline().startswith(b"saved"), proc.stderr.read().decode()
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.kill()
            proc.wait()
        ckpt_dir = tmp_path / "checkpoints"
        interrupted += any(p.name.endswith(".tmp") for p in ckpt_dir.iterdir())
        latest = find_checkpoint(tmp_path, required=False)
        assert latest is not None
        step = latest.step
        model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])
        opt = torch.optim.AdamW(model.parameters())
        loaded = load_toy_checkpoint(latest.path, model, opt, sharded=False)
        assert loaded.trainer_state == {"step": step} and loaded.rank_state == {"step": step}
        assert all(bool((p == step).all()) for p in model.parameters())  # every file from the same save
        assert all(bool((s["exp_avg"] == step).all()) for s in opt.state_dict()["state"].values())
        steps.append(step)
    assert steps == sorted(steps) and steps[-1] > steps[0]
    print(f"kill steps {steps}, {interrupted} kills left a partial .tmp")


CHECKPOINT_FILES = ("meta.json", "model.safetensors", "optimizer.pt", "trainer.pt", "rank_00000.pt")


@pytest.mark.slow
def test_sigkill_during_retention_never_leaves_a_complete_but_partial_checkpoint(tmp_path: Path) -> None:
    """Kill the save loop at random moments (mostly inside retention's slow deletion of the previous
    checkpoint): no ``step_*`` dir with COMPLETE may ever miss a file, and the start-up clean-up of a run
    on the dir afterwards removes the half-deleted leftovers."""
    from gpt2.checkpoint.format import STEP_DIR
    from gpt2.checkpoint.store import remove_interrupted

    worker = REPO / "tests" / "workers" / "retention_loop.py"
    rng = random.Random(0)
    step, leftovers_seen = 1, 0
    for attempt in range(16):  # at least 4 kills, and on until one has landed inside a deletion (timing varies)
        if attempt >= 4 and leftovers_seen:
            break
        proc = subprocess.Popen([sys.executable, str(worker), str(tmp_path), str(step), "3000"],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout is not None
        for _ in range(2):  # the second save deletes the first one's padded dir
            line = proc.stdout.readline()
            assert line.startswith("saved"), line
            step = int(line.split()[1]) + 1
        time.sleep(rng.uniform(0.0, 0.05))  # the next save + its deletion of 3000 files: ~40 ms when idle
        proc.kill()
        proc.wait()
        names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
        leftovers_seen += any(n.endswith(".deleting") for n in names)
        for p in (tmp_path / "checkpoints").iterdir():
            if STEP_DIR.match(p.name) and (p / "COMPLETE").exists():
                missing = [f for f in CHECKPOINT_FILES if not (p / f).exists()]
                assert not missing, f"{p.name} has COMPLETE but lacks {missing} (all: {sorted(names)})"
        assert find_checkpoint(tmp_path, required=False) is not None
    assert leftovers_seen, "no kill landed inside a deletion; the test proved nothing"
    remove_interrupted(tmp_path)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith((".deleting", ".tmp"))]


KILLER = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
from gpt2.config import DataConfig
from gpt2.data.preprocess import prepare_data
from gpt2.data.shard_writer import ShardWriter
add = ShardWriter.add
def slow(self, tokens):
    time.sleep(0.01)
    add(self, tokens)
ShardWriter.add = slow
import gpt2.data.preprocess as D
import gpt2.data.shard_writer as SW
D.CHECKPOINT_S = 0.0
SW.MOVE_CHUNK = int(sys.argv[4])  # a one-document corpus moves its val tail in many small copies
p = prepare_data(DataConfig(name="text", path=sys.argv[1], cache_dir=sys.argv[2],
                            num_proc=2, shard_tokens=700))
print("DONE", p.folder)
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["documents", "one_document"])
def test_sigkill_during_preparation_then_rerun_is_byte_identical(kind: str, corpora: dict[str, Path], tmp_path: Path,
                                                                 tiktoken_file: str) -> None:
    """Kills land in the tokenization (many documents) or in the move of a one-document corpus's val tail into
    val shards (its state is saved only once the document is in): the rerun's shards are byte-identical."""
    corpus = corpora["text"]
    if kind == "one_document":
        corpus = tmp_path / "one.txt"
        corpus.write_text("".join(p.read_text() for p in sorted(corpora["text"].iterdir())))
    args = [str(corpus), str(tmp_path / "killed"), tiktoken_file, "10" if kind == "one_document" else "16777216"]
    env = subprocess_env()
    kills = 0
    for attempt in range(10):
        proc = subprocess.Popen([sys.executable, "-c", KILLER, *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if attempt < 3:  # kill once the preparation has saved some progress
            deadline = time.time() + 60
            while not list((tmp_path / "killed" / "prepared").glob("*.partial/state.json")):
                assert proc.poll() is None and time.time() < deadline, proc.communicate()
                time.sleep(0.05)
            time.sleep(0.3 + 0.2 * attempt)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        out, err = proc.communicate(timeout=120)
        if "DONE" in out:
            break
    assert kills >= 2 and "DONE" in out, err
    assert "resuming the preparation" in err
    killed = load_prepared(out.split()[-1])
    clean = prepare_data(DataConfig(name="text", path=args[0], cache_dir=str(tmp_path / "clean"),
                                    num_proc=1, shard_tokens=700))
    for a, b in zip(killed.train.paths + killed.val.paths, clean.train.paths + clean.val.paths):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert killed.meta["splits"] == clean.meta["splits"]
    assert not list((tmp_path / "killed" / "prepared").glob("*.partial"))


@pytest.mark.slow
def test_sigterm_during_preparation_exits_cleanly_then_resumes(corpora: dict[str, Path], tmp_path: Path,
                                                               base_overrides: list[str]) -> None:
    cache = tmp_path / "cache"
    tok = [o for o in base_overrides if o.startswith("tokenizer.path")]
    overrides = [*(o for o in base_overrides if not o.startswith("data")), *tok, "data=text",
                 f"data.path={corpora['text']}", f"data.cache_dir={cache}", "data.num_proc=2",
                 "data.shard_tokens=500", "max_steps=2", "block_size=32", "micro_batch_size=4",
                 "total_batch_tokens=128", "scheduler.warmup_steps=0", "eval.sample_tokens=0"]
    env = subprocess_env(GPT2_TEST_PREPARE_SLEEP="0.05")
    cmd = [sys.executable, str(REPO / "tests" / "workers" / "slow_prepare.py"), *overrides,
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while not list((cache / "prepared").glob("*.partial/train_000001.bin")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75 and "Traceback" not in out, out
    assert "data preparation interrupted" in out
    assert list((cache / "prepared").glob("*.partial/state.json"))
    rerun = run_train_cli(overrides, cwd=tmp_path / "again")
    assert "resuming the preparation" in rerun.proc.stdout + rerun.proc.stderr
