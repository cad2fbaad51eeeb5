"""The trainer end to end: learning on the demo corpus, accumulation/DDP equivalence,
torchrun (DDP, FSDP2) in one run dir, precisions, W&B offline files."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.config import TrainConfig
from gpt2.runtime.device import DTYPES
from gpt2.train.metrics import read_metrics
from gpt2.train.train import train
from gpt2.train.trainer import Trainer

from .helpers import REPO, compose_train, run_torchrun, run_train_cli, subprocess_env, tiny_trainer


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r}


@pytest.mark.slow
def test_tiny_model_learns_shakespeare(tmp_path: Path, base_overrides: list[str]) -> None:
    cfg = compose_train([*base_overrides, "max_steps=50", "eval_interval=25", "eval_iters=4", "optimizer.lr=3e-3",
                         "scheduler.warmup_steps=5", "total_batch_tokens=1024", "micro_batch_size=8",
                         "block_size=64"])
    final = train(cfg, tmp_path)
    val = losses(tmp_path, "val/loss")
    assert sorted(val) == [0, 25, 50]
    assert val[0] > 10.0  # ln(50257) = 10.8 at random init
    assert final == val[50] and final < val[0] - 3.0, val
    samples = [r["sample"] for r in read_metrics(tmp_path / "metrics.jsonl") if "sample" in r]
    assert samples[-1].startswith("ROMEO:") and len(samples[-1]) > len("ROMEO:") + 20
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert any((tmp_path / "checkpoints").glob("step_00000050/COMPLETE"))


def make_trainer(cfg: TrainConfig, tmp_path: Path) -> Trainer:
    return tiny_trainer(cfg, tmp_path)


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path, base_overrides: list[str]) -> None:
    common = [*base_overrides, "total_batch_tokens=512", "block_size=64", "optimizer.grad_clip=0",
              "model.dropout=0.0", "scheduler.warmup_steps=0"]
    big = make_trainer(compose_train([*common, "micro_batch_size=8"]), tmp_path / "a")
    accum = make_trainer(compose_train([*common, "micro_batch_size=2"]), tmp_path / "b")
    assert (big.grad_accum, accum.grad_accum) == (1, 4)
    # The gradient of one step: one batch of 8 sequences vs 4 accumulated micro-batches of 2.
    big.forward_backward_step(*big.train_loader.next_batch(), sync=True)
    for micro in range(4):
        accum.forward_backward_step(*accum.train_loader.next_batch(), sync=micro == 3)
    for (name, p_big), (_, p_acc) in zip(big.model.named_parameters(), accum.model.named_parameters()):
        torch.testing.assert_close(p_big.grad, p_acc.grad, rtol=1e-4, atol=1e-7, msg=name)
    # And whole optimizer steps report the same loss.
    for trainer in (big, accum):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.train_loader.reset()
    for _ in range(2):
        m_big, m_acc = big.train_step(), accum.train_step()
        assert m_big["train/loss"] == pytest.approx(m_acc["train/loss"], rel=1e-5)
        assert m_big["train/grad_norm"] == pytest.approx(m_acc["train/grad_norm"], rel=1e-4)


TORCHRUN_ARGS = ["model=tiny", "max_steps=6", "total_batch_tokens=512", "block_size=32", "eval_interval=3",
                 "eval_iters=2", "sample_tokens=8", "optimizer.grad_clip=0", "scheduler.warmup_steps=1",
                 "log_interval=1"]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory: pytest.TempPathFactory, base_overrides: list[str]):
    """The one-process reference the DDP and FSDP runs are compared with (accumulation 2 on one rank)."""
    return run_train_cli([*base_overrides, *TORCHRUN_ARGS, "micro_batch_size=8"],
                         cwd=tmp_path_factory.mktemp("single"))


@pytest.mark.slow
def test_ddp_two_ranks_one_run_dir_matches_single_process(tmp_path: Path, base_overrides: list[str],
                                                           single_process_run) -> None:
    single = single_process_run
    ddp = run_torchrun([*base_overrides, *TORCHRUN_ARGS, "micro_batch_size=8", "distributed=ddp"],
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
    result = run_torchrun([*base_overrides, *TORCHRUN_ARGS, "micro_batch_size=8", "distributed=fsdp"],
                          cwd=tmp_path, nproc=2)
    single_losses, fsdp_losses = losses(single_process_run.run_dir), losses(result.run_dir)
    assert sorted(fsdp_losses) == list(range(1, 7))
    for step, loss in single_losses.items():  # sharded params and reduce-scatter: the same global batch
        assert fsdp_losses[step] == pytest.approx(loss, rel=1e-4), (step, single_losses, fsdp_losses)
    single_val, fsdp_val = losses(single_process_run.run_dir, "val/loss"), losses(result.run_dir, "val/loss")
    assert set(fsdp_val) == {0, 3, 6} and fsdp_val[6] == pytest.approx(single_val[6], rel=1e-4)
    ckpt = result.run_dir / "checkpoints" / "step_00000006"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "dcp").is_dir()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path: Path, base_overrides: list[str], precision: str) -> None:
    cfg = compose_train([*base_overrides, *TORCHRUN_ARGS, "micro_batch_size=4", "total_batch_tokens=256",
                         f"precision={precision}"])  # accumulation 2; CPU fp16 is slow, keep the batch small
    trainer = make_trainer(cfg, tmp_path)
    seen: list[torch.dtype] = []
    trainer.raw_model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    records = [trainer.train_step() for _ in range(3)]
    assert len(seen) == 3 * trainer.grad_accum and set(seen) == {DTYPES[precision]}  # autocast ran in that dtype
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # weights stay fp32
    assert all(math.isfinite(r["train/loss"]) for r in records)
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":  # every skipped step halved the scale (no growth within 2000 steps)
        assert trainer.scaler.get_scale() == 65536.0 * 0.5 ** trainer.skipped_steps
        assert records[-1]["train/skipped_steps"] == trainer.skipped_steps < 3


@pytest.mark.slow  # CPU fp16 is emulated: ~10 s
def test_fp16_stops_after_max_skipped_steps(tmp_path: Path, base_overrides: list[str]) -> None:
    from gpt2.train.trainer import TrainingDiverged

    cfg = compose_train([*base_overrides, *TORCHRUN_ARGS, "micro_batch_size=8", "total_batch_tokens=256",
                         "precision=fp16", "optimizer.lr=1e30", "scheduler.warmup_steps=0",
                         "precision.max_skipped_steps=3"])
    trainer = make_trainer(cfg, tmp_path)
    with pytest.raises(TrainingDiverged, match=r"fp16: 3 optimizer steps in a row were skipped for non-finite "
                                                r"gradients .* reaching precision\.max_skipped_steps=3"):
        for _ in range(6):
            trainer.train_step()
    assert trainer.consecutive_skipped == 3 and trainer.step <= 4


@pytest.mark.slow
def test_wandb_offline_files_in_run_dir(tmp_path: Path, base_overrides: list[str], monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_train([*base_overrides, *TORCHRUN_ARGS, "micro_batch_size=8", "logger=wandb", "max_steps=2",
                         "checkpoint.save_final=false"])
    train(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    (records,) = runs[0].glob("*.wandb")
    data = records.read_bytes()  # the run's protobuf log: config, history and samples
    assert b"total_batch_tokens" in data and b"train/loss" in data
    assert list((runs[0] / "files" / "media" / "html").glob("sample_*.html"))


@pytest.mark.slow
def test_cli_run_dir_layout(tmp_path: Path, base_overrides: list[str]) -> None:
    result = run_train_cli([*base_overrides, *TORCHRUN_ARGS, "micro_batch_size=8", "max_steps=2"], cwd=tmp_path)
    names = {p.name for p in result.run_dir.iterdir()}
    assert {".hydra", "checkpoints", "metrics.jsonl", "train.log", "loss.png"} <= names, names
    assert "step 2/2" in (result.run_dir / "train.log").read_text()
    # the end-of-run summary: steps, tokens, time, final val loss, where the checkpoint and plot are
    final_val = [r["val/loss"] for r in read_metrics(result.run_dir / "metrics.jsonl") if "val/loss" in r][-1]
    summary = re.search(r"done: 2 steps, 1,024 tokens in \d\d:\d\d; final val loss (\S+); checkpoint (\S+); "
                        r"loss plot (\S+)$", result.proc.stdout + result.proc.stderr, re.MULTILINE)
    assert summary, result.proc.stdout + result.proc.stderr
    assert float(summary[1]) == pytest.approx(final_val, abs=1e-4)
    assert Path(summary[2]) == result.run_dir / "checkpoints" / "step_00000002" and Path(summary[3]).is_file()
    overrides = json.dumps(sorted((result.run_dir / ".hydra" / "overrides.yaml").read_text().split()))
    assert "max_steps=2" in overrides


def test_config_is_not_mutated_and_the_plan_is_saved(tmp_path: Path, base_overrides: list[str]) -> None:
    import copy

    from gpt2.checkpoint.format import read_meta

    cfg = compose_train([*base_overrides, *TORCHRUN_ARGS, "micro_batch_size=8", "precision=auto", "max_steps=2",
                         "eval_interval=0"])
    before = copy.deepcopy(cfg)
    train(cfg, tmp_path)
    assert cfg == before  # precision stays "auto", the model stays the composed one
    meta = read_meta(tmp_path / "checkpoints" / "step_00000002")
    assert meta["config"]["precision"]["name"] == "auto"
    assert meta["plan"]["precision"] in ("bf16", "fp32") and meta["plan"]["grad_accum"] == 2
    assert meta["config"]["model"]["pad_vocab_multiple"] is None  # resolved in the plan: 1 on CPU (64 on CUDA)
    assert meta["config"]["model"]["vocab_size"] is None  # the preset follows the tokenizer: GPT-2's in the plan
    assert meta["plan"]["model"] == {**meta["config"]["model"], "pad_vocab_multiple": 1, "vocab_size": 50257}


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path: Path, base_overrides: list[str]) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "run_train.py"), *base_overrides, *TORCHRUN_ARGS,
                           "micro_batch_size=8", "dry_run=true"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# composed config" in out and "# run plan (derived)" in out and "grad_accum: 2" in out
    assert ("model tiny: 3.33M parameters; 1 rank(s) on cpu; fp32; micro_batch_size 8, grad accumulation 2; 512 "
            "tokens/step x 6 steps") in out, out
    assert "# checks passed" in out
    assert not (tmp_path / "outputs").exists()  # a dry run leaves no run directory behind
    bad = run_train_cli([*base_overrides, *TORCHRUN_ARGS, "micro_batch_size=7", "dry_run=true"], cwd=tmp_path,
                        check=False)
    assert bad.proc.returncode == 2 and bad.proc.stderr.startswith("error: total_batch_tokens=512 is not divisible")


def test_eval_sample_uses_the_configured_temperature_and_top_k(tmp_path: Path, base_overrides: list[str],
                                                               tiktoken_file: str) -> None:
    from gpt2.generate.sampling import generate
    from gpt2.tokenizers.gpt2 import get_tokenizer

    tok = get_tokenizer(tiktoken_file)
    texts = {}
    for name, args in {"greedy": ["sample_temperature=0"], "top1": ["sample_temperature=5.0", "sample_top_k=1"],
                       "default": []}.items():
        cfg = compose_train([*base_overrides, *TORCHRUN_ARGS, "micro_batch_size=8", "sample_tokens=12", *args])
        trainer = make_trainer(cfg, tmp_path / name)
        trainer.tokenizer = tok
        texts[name] = trainer.sample()
    idx = torch.tensor([tok.encode("ROMEO:")])
    greedy = tok.decode(generate(trainer.raw_model, idx, 12, temperature=0.0)[0].tolist())
    assert texts["greedy"] == texts["top1"] == greedy != texts["default"]
