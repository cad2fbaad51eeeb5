"""Real torchrun processes (gloo on CPU): DDP and FSDP2 train in one run dir and match one process, and ranks
wait for a data preparation that outlasts the collective timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gpt2.train.metrics import read_metrics
from tests.helpers import TINY_RUN, losses, run_torchrun, run_train_cli


@pytest.mark.slow
def test_ranks_wait_for_a_preparation_longer_than_the_collective_timeout(tmp_path: Path, corpora: dict[str, Path],
                                                                         base_overrides: list[str]) -> None:
    tok = [o for o in base_overrides if o.startswith("tokenizer.path")]
    overrides = [*(o for o in base_overrides if not o.startswith("data")), *tok, "data=text",
                 f"data.path={corpora['text']}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1",
                 "distributed=ddp", "distributed.timeout_s=5", "max_steps=2", "block_size=32", "micro_batch_size=2",
                 "total_batch_tokens=128", "scheduler.warmup_steps=0", "eval.sample_tokens=0", "eval.iters=1",
                 "log_interval=1",
                 f"hydra.run.dir={tmp_path / 'run'}"]
    t0 = time.time()
    res = run_torchrun(overrides, cwd=tmp_path, script="slow_prepare.py",
                       env={"GPT2_TEST_PREPARE_SLEEP": "0.03"})  # ~300 documents: about 10 s on rank 0
    out = res.proc.stdout + res.proc.stderr

    assert time.time() - t0 > 10, out  # the preparation outlasted distributed.timeout_s=5
    assert [r["step"] for r in read_metrics(res.run_dir / "metrics.jsonl") if "train/loss" in r] == [1, 2], out


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory: pytest.TempPathFactory, base_overrides: list[str]):
    """The one-process reference the DDP and FSDP runs are compared with (accumulation 2 on one rank)."""
    return run_train_cli([*base_overrides, *TINY_RUN, "micro_batch_size=8"],
                         cwd=tmp_path_factory.mktemp("single"))


@pytest.mark.slow
def test_ddp_two_ranks_one_run_dir_matches_single_process(tmp_path: Path, base_overrides: list[str],
                                                           single_process_run) -> None:
    single = single_process_run
    ddp = run_torchrun([*base_overrides, *TINY_RUN, "micro_batch_size=8", "distributed=ddp"],
                       cwd=tmp_path / "ddp", nproc=2, delay_rank1_s=4.0)
    assert single.run_dir.parent.parent.name == "outputs"
    ddp_dirs = list((tmp_path / "ddp" / "outputs").glob("*/*"))
    assert ddp_dirs == [ddp.run_dir], ddp_dirs  # both ranks agreed on one dir despite the delayed start
    assert (ddp.run_dir / ".hydra" / "config.yaml").exists()
    assert (ddp.run_dir / "train.log").exists()
    # Half the micro-batches per rank (accumulation 2 -> 1 over 2 ranks): the same global batch.
    single_losses, ddp_losses = losses(single.run_dir), losses(ddp.run_dir)
    assert sorted(ddp_losses) == list(range(1, 7))
    for step, loss in single_losses.items():
        assert ddp_losses[step] == pytest.approx(loss, rel=1e-4), (step, single_losses, ddp_losses)
    assert "2 rank(s)" in (ddp.run_dir / "train.log").read_text()


@pytest.mark.slow
def test_fsdp_two_ranks_matches_single_process_and_checkpoints(tmp_path: Path, base_overrides: list[str],
                                                               single_process_run) -> None:
    result = run_torchrun([*base_overrides, *TINY_RUN, "micro_batch_size=8", "distributed=fsdp"],
                          cwd=tmp_path, nproc=2)
    single_losses, fsdp_losses = losses(single_process_run.run_dir), losses(result.run_dir)
    assert sorted(fsdp_losses) == list(range(1, 7))
    for step, loss in single_losses.items():  # sharded params and reduce-scatter: the same global batch
        assert fsdp_losses[step] == pytest.approx(loss, rel=1e-4), (step, single_losses, fsdp_losses)
    single_val, fsdp_val = losses(single_process_run.run_dir, "val/loss"), losses(result.run_dir, "val/loss")
    assert set(fsdp_val) == {0, 3, 6} and fsdp_val[6] == pytest.approx(single_val[6], rel=1e-4)
    ckpt = result.run_dir / "checkpoints" / "step_00000006"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "dcp").is_dir()
