"""gpt2.train.optim: optimizers and the learning-rate schedule."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2.config import SchedulerConfig, validate
from gpt2.errors import ConfigError
from tests.helpers import compose_train


def test_default_warmup_follows_the_run_length() -> None:
    from gpt2.train.optim import lr_multiplier

    sched = SchedulerConfig()
    assert [sched.warmup_for(n) for n in (1, 5, 50, 300, 1000, 20000)] == [0, 0, 5, 30, 100, 100]
    warmup = sched.warmup_for(50)  # what the run plan holds
    assert lr_multiplier(0, sched, warmup, 50) == pytest.approx(1 / 5)
    assert lr_multiplier(5, sched, warmup, 50) == pytest.approx(1.0)
    validate(compose_train(["model=tiny", "max_steps=5"]))  # the derived warmup fits the run: 0 steps
    with pytest.raises(ConfigError, match="warmup_steps=10 exceeds max_steps=5"):  # an explicit value is kept
        validate(compose_train(["model=tiny", "max_steps=5", "scheduler.warmup_steps=10"]))


@pytest.mark.parametrize("name,middle,end", [("cosine", 0.55, 0.1), ("linear", 0.55, 0.1), ("constant", 1.0, 1.0)])
def test_schedule_shapes_at_warmup_middle_and_end(name: str, middle: float, end: float) -> None:
    from gpt2.train.optim import lr_multiplier

    sched = SchedulerConfig(name=name, warmup_steps=10, min_lr_ratio=0.1)
    warmup = [lr_multiplier(s, sched, 10, 110) for s in range(10)]
    assert warmup == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear from 1/10 to the peak
    assert lr_multiplier(10, sched, 10, 110) == pytest.approx(1.0)  # the peak right after warmup
    assert lr_multiplier(60, sched, 10, 110) == pytest.approx(middle)  # half way through the decay
    assert lr_multiplier(110, sched, 10, 110) == pytest.approx(end)
    if name == "cosine":  # slower than linear at the start of the decay, faster at its end
        linear = SchedulerConfig(name="linear", warmup_steps=10, min_lr_ratio=0.1)
        assert lr_multiplier(30, sched, 10, 110) > lr_multiplier(30, linear, 10, 110)
        assert lr_multiplier(90, sched, 10, 110) < lr_multiplier(90, linear, 10, 110)


def test_muon_takes_the_block_matrices_and_adamw_the_rest() -> None:
    import torch

    from gpt2.config import ModelConfig, OptimizerConfig
    from gpt2.model.gpt import GPT
    from gpt2.train.optim import CombinedOptimizer, build_optimizer

    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=64))
    opt = build_optimizer(model, OptimizerConfig(name="muon"), "cpu")
    assert isinstance(opt, CombinedOptimizer) and isinstance(opt.parts["muon"], torch.optim.Muon)
    muon = {id(p) for g in opt.parts["muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.parts["adamw"].param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert muon | adamw == {id(p) for p in named.values()} and not muon & adamw
    assert {n for n, p in named.items() if id(p) in muon} == {
        n for n, p in named.items() if p.dim() == 2 and n.startswith("transformer.h.")}
    assert {g["lr"] for g in opt.parts["muon"].param_groups} == {0.02}


@pytest.mark.slow
def test_muon_trains_checkpoints_and_resumes_bit_exactly(tmp_path: Path, base_overrides: list[str]) -> None:
    from gpt2.train.launch import train
    from gpt2.train.metrics import read_metrics

    args = [*base_overrides, "optimizer=muon", "optimizer.muon_lr=0.05", "optimizer.lr=3e-3", "total_batch_tokens=512",
            "micro_batch_size=4", "block_size=64", "eval.interval=0", "eval.iters=1", "eval.sample_tokens=0",
            "log_interval=1", "scheduler.warmup_steps=0", "checkpoint.interval=3"]
    train(compose_train([*args, "max_steps=6"]), tmp_path / "full")
    train(compose_train([*args, "max_steps=6", f"resume={tmp_path / 'full' / 'checkpoints' / 'step_00000003'}"]),
          tmp_path / "resumed")

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["train/loss"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r}

    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert full[6] < full[1] - 0.3, full  # it learns
    assert {s: full[s] for s in (4, 5, 6)} == resumed  # the combined optimizer's state resumes bit for bit
