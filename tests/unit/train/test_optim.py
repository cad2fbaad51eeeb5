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


def _schedule_before_wsd(step: int, name: str, warmup: int, max_steps: int, min_lr_ratio: float) -> float:
    """The schedule as it was before wsd existed (the oracle that keeps cosine/linear/constant unchanged)."""
    import math

    if step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    shape = 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_cosine_linear_and_constant_are_bit_identical_to_before(name: str) -> None:
    from gpt2.train.optim import lr_multiplier

    for warmup, max_steps, ratio in [(0, 1, 0.1), (10, 110, 0.1), (700, 19073, 0.1), (25, 250, 0.0), (3, 7, 1.0)]:
        sched = SchedulerConfig(name=name, warmup_steps=warmup, min_lr_ratio=ratio)
        for step in range(max_steps + 1):
            assert lr_multiplier(step, sched, warmup, max_steps) == _schedule_before_wsd(
                step, name, warmup, max_steps, ratio), (warmup, max_steps, step)


def test_wsd_warms_up_holds_the_peak_then_cools_down_linearly_to_the_minimum() -> None:
    from gpt2.train.optim import lr_multiplier

    sched = SchedulerConfig(name="wsd", warmup_steps=10, min_lr_ratio=0.1, cooldown_fraction=0.4)
    lrs = [lr_multiplier(s, sched, 10, 100) for s in range(101)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # warmup
    assert lrs[10:60] == [1.0] * 50  # stable until the last 40% of 100 steps
    # cooldown over steps 60..100: linear from the peak to min_lr_ratio, reached at max_steps
    assert lrs[60:] == pytest.approx([0.1 + 0.9 * (1 - (s - 60) / 40) for s in range(60, 101)])
    assert lrs[100] == pytest.approx(0.1) and lrs[99] == pytest.approx(0.1 + 0.9 / 40)
    # a cooldown longer than the run after warmup starts when the warmup ends
    long = SchedulerConfig(name="wsd", warmup_steps=10, min_lr_ratio=0.0, cooldown_fraction=1.0)
    assert [lr_multiplier(s, long, 10, 20) for s in (9, 10, 15, 20)] == pytest.approx([1.0, 1.0, 0.5, 0.0])
    with pytest.raises(ConfigError, match="scheduler.cooldown_fraction=0 must be in \\(0, 1\\]"):
        SchedulerConfig(name="wsd", cooldown_fraction=0).check()


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


def _lrs_by_name(model, opt) -> dict[str, tuple[str, float, float]]:
    """parameter name -> (optimizer part, peak lr, weight decay) as the optimizer holds them."""
    from gpt2.train.optim import CombinedOptimizer

    parts = opt.parts if isinstance(opt, CombinedOptimizer) else {"adamw": opt}
    where = {id(p): (part, g["peak_lr"], g["weight_decay"]) for part, o in parts.items() for g in o.param_groups
             for p in g["params"]}
    return {n: where[id(p)] for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_each_part_trains_at_its_own_lr(name: str) -> None:
    from gpt2.config import ModelConfig, OptimizerConfig
    from gpt2.model.gpt import GPT
    from gpt2.train.optim import build_optimizer, set_lr

    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=64, tie_embeddings=False))
    cfg = OptimizerConfig(name=name, lr=1e-3, embed_lr=0.1, head_lr=0.01, scalar_lr=0.05, muon_lr=0.03,
                          weight_decay=0.1)
    got = _lrs_by_name(model, build_optimizer(model, cfg, "cpu"))
    hidden = ("muon", 0.03, 0.1) if name == "muon" else ("adamw", 1e-3, 0.1)
    expected = {}
    for n, p in model.named_parameters():
        if n in ("transformer.wte.weight", "transformer.wpe.weight"):
            expected[n] = ("adamw", 0.1, 0.1)
        elif n == "lm_head.weight":
            expected[n] = ("adamw", 0.01, 0.1)
        elif n.startswith("transformer.h.") and p.dim() == 2:
            expected[n] = hidden
        else:  # biases and LayerNorm weights, ln_f included
            expected[n] = ("adamw", 0.05, 0.0)
    assert got == expected
    assert {v[1] for v in got.values()} == {0.1, 0.01, 0.05, hidden[1]}  # every part is present
    opt = build_optimizer(model, cfg, "cpu")
    set_lr(opt, 0.5)  # the schedule scales every part from its own peak
    assert sorted({g["lr"] for g in opt.param_groups}) == sorted(x / 2 for x in {0.1, 0.01, 0.05, hidden[1]})


def test_default_lrs_keep_gpt2s_two_adamw_groups() -> None:
    """Null part lrs follow optimizer.lr, and parts that share an lr share a group: the defaults build the
    groups GPT-2 always had (>=2-D with decay, the rest without, in named_parameters order), so checkpoints of
    earlier runs load; a tied head is the token embedding and trains at embed_lr."""
    from gpt2.config import ModelConfig, OptimizerConfig
    from gpt2.model.gpt import GPT
    from gpt2.train.optim import build_optimizer

    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=64))
    named = list(model.named_parameters())
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.0), "cpu")
    assert [g["params"] for g in opt.param_groups] == [[p for _, p in named if p.dim() >= 2],
                                                        [p for _, p in named if p.dim() < 2]]
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(6e-4, 0.0), (6e-4, 0.0)]
    tied = _lrs_by_name(model, build_optimizer(model, OptimizerConfig(embed_lr=0.1, head_lr=0.5), "cpu"))
    assert tied["transformer.wte.weight"] == ("adamw", 0.1, 0.1) and 0.5 not in {v[1] for v in tied.values()}


RESUMED = {
    "muon": ["optimizer=muon", "optimizer.muon_lr=0.05", "optimizer.lr=3e-3", "scheduler.warmup_steps=0"],
    # the CPU recipe as it ships (its switches, Muon + per-part lrs, wsd) on the tiny model, warmup 1 of 6 steps
    "speedrun_cpu": ["experiment=speedrun_cpu", "compile=false", "scheduler.warmup_steps=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RESUMED))
def test_muon_and_the_recipe_train_checkpoint_and_resume_bit_exactly(tmp_path: Path, base_overrides: list[str],
                                                                     recipe: str) -> None:
    from gpt2.train.launch import train
    from gpt2.train.metrics import read_metrics

    args = [*RESUMED[recipe], *base_overrides, "total_batch_tokens=512", "micro_batch_size=4", "block_size=64",
            "eval.interval=0", "eval.iters=1", "eval.sample_tokens=0", "log_interval=1", "checkpoint.interval=3"]
    cfg = compose_train([*args, "max_steps=6"])
    if recipe == "speedrun_cpu":
        assert cfg.model.non_gpt2_switches() and cfg.scheduler.name == "wsd" and cfg.optimizer.embed_lr is not None
    train(cfg, tmp_path / "full")
    train(compose_train([*args, "max_steps=6", f"resume={tmp_path / 'full' / 'checkpoints' / 'step_00000003'}"]),
          tmp_path / "resumed")

    def records(run: Path, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}

    full, resumed = records(tmp_path / "full", "train/loss"), records(tmp_path / "resumed", "train/loss")
    assert full[6] < full[1] - 0.3, full  # it learns
    assert {s: full[s] for s in (4, 5, 6)} == resumed  # the combined optimizer's state resumes bit for bit
    lrs = records(tmp_path / "resumed", "train/lr")
    assert {s: records(tmp_path / "full", "train/lr")[s] for s in (4, 5, 6)} == lrs  # and so does the schedule
