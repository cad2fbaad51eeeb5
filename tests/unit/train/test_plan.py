"""gpt2.train.plan and the dry run: the run plan resolved once, saved in checkpoints, printed by dry_run=true."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.checkpoint.format import read_meta
from gpt2.checkpoint.handle import Checkpoint
from gpt2.errors import ConfigError, UserError
from gpt2.train.launch import train
from gpt2.train.plan import RunPlan
from tests.helpers import CONF, REPO, TINY_RUN, bpe_overrides, compose_train, run_train_cli, subprocess_env


def test_dry_run_plans_the_tokenizer_vocabulary(tmp_path: Path, bpe_cache: Path) -> None:
    from gpt2.train.dry_run import dry_run

    text = dry_run(compose_train(bpe_overrides(bpe_cache)), tmp_path)
    plan = text.split("# run plan (derived)")[1]
    assert "vocab_size: 4096" in plan and "vocab_size: null" in text.split("# run plan (derived)")[0]
    assert not list(tmp_path.iterdir())


def test_config_is_not_mutated_and_the_plan_is_saved(tmp_path: Path, base_overrides: list[str]) -> None:
    import copy


    cfg = compose_train([*base_overrides, *TINY_RUN, "micro_batch_size=8", "precision=auto", "max_steps=2",
                         "eval.interval=0"])
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
    proc = subprocess.run([sys.executable, str(REPO / "run_train.py"), *base_overrides, *TINY_RUN,
                           "micro_batch_size=8", "dry_run=true"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# composed config" in out and "# run plan (derived)" in out and "grad_accum: 2" in out
    assert ("model tiny: 3.33M parameters; 1 rank(s) on cpu; fp32; micro_batch_size 8, grad accumulation 2; 512 "
            "tokens/step x 6 steps") in out, out
    assert "# checks passed" in out
    assert not (tmp_path / "outputs").exists()  # a dry run leaves no run directory behind
    bad = run_train_cli([*base_overrides, *TINY_RUN, "micro_batch_size=7", "dry_run=true"], cwd=tmp_path,
                        check=False)
    assert bad.proc.returncode == 2 and bad.proc.stderr.startswith("error: total_batch_tokens=512 is not divisible")


def test_resolve_plan_follows_the_tokenizer_the_device_and_the_chosen_micro_batch() -> None:
    from gpt2.train.plan import Vocabulary, resolve_plan
    from tests.helpers import cpu_dist

    cfg = compose_train(["debug=cpu", "total_batch_tokens=1024", "block_size=32", "micro_batch_size=auto"])
    bpe = Vocabulary(4096, "hf-test")
    plan = resolve_plan(cfg, cpu_dist(), cfg.model, bpe, None, choose_micro_batch=None)
    assert plan.micro_batch_size is None and plan.grad_accum is None  # the dry run: left to the GPU
    assert plan.model.vocab_size == 4096 and plan.model.pad_vocab_multiple == 1 and cfg.model.vocab_size is None
    chosen = resolve_plan(cfg, cpu_dist(), cfg.model, bpe, None, choose_micro_batch=lambda model: 8)
    assert (chosen.micro_batch_size, chosen.grad_accum) == (8, 4)  # the batch rules run on the chosen size
    with pytest.raises(ConfigError, match="micro_batch_size \\* block_size \\* world_size = 5 \\* 32 \\* 1 = 160"):
        resolve_plan(cfg, cpu_dist(), cfg.model, bpe, None, choose_micro_batch=lambda model: 5)
    fixed = compose_train(["debug=cpu", "model.vocab_size=50257"])
    with pytest.raises(UserError, match="model.vocab_size=50257 does not match the tokenizer's n_vocab=4096"):
        resolve_plan(fixed, cpu_dist(), fixed.model, bpe, None, choose_micro_batch=None)


def test_resume_and_pretrained_define_the_architecture_before_the_tokenizer_is_known(
        tmp_path: Path, base_overrides: list[str]) -> None:
    from gpt2.checkpoint.handle import find_checkpoint
    from gpt2.train.plan import Vocabulary, planned_architecture, resolve_plan
    from tests.helpers import cpu_dist

    def plan(overrides: list[str], vocab: Vocabulary, resume: Checkpoint | None) -> RunPlan:
        cfg = compose_train([*args, *overrides])
        return resolve_plan(cfg, cpu_dist(), planned_architecture(cfg, cpu_dist(), resume), vocab, resume, None)

    args = [*base_overrides, "max_steps=1", "eval.interval=0", "eval.iters=1", "eval.sample_tokens=0",
            "total_batch_tokens=256", "micro_batch_size=2", "block_size=128"]
    train(compose_train(args), tmp_path / "run")
    ckpt = find_checkpoint(tmp_path / "run")
    gpt2 = Vocabulary(50257, "gpt2")
    resumed = plan(["model.dropout=0.1"], gpt2, ckpt)
    assert resumed.model == dataclasses.replace(ckpt.model_config, dropout=0.1)
    assert resumed.resume_from == str(ckpt.path)
    with pytest.raises(UserError, match="model.n_layer=3 .*changes the weights' shapes"):  # needs no tokenizer
        planned_architecture(compose_train([*args, "model.n_layer=3"]), cpu_dist(), ckpt)
    medium = plan(["init.pretrained=gpt2-medium"], gpt2, None)  # the hub preset: no download to plan it
    assert (medium.model.n_layer, medium.model.n_embd, medium.model.name) == (24, 1024, "gpt2-medium")
    with pytest.raises(UserError, match="init.pretrained=gpt2 has vocab_size=50257 but the tokenizer has n_vocab=512"):
        plan(["init.pretrained=gpt2"], Vocabulary(512, "hf"), None)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_the_dry_run_of_every_shipped_experiment_works_offline(experiment: str, tmp_path: Path) -> None:
    from gpt2.train.dry_run import dry_run

    cfg = compose_train([f"experiment={experiment}", f"data.cache_dir={tmp_path / 'empty-cache'}"])
    text = dry_run(cfg, tmp_path)
    assert "# run plan (derived)" in text and "# dry run: nothing was prepared or trained" in text
    if cfg.micro_batch_size == "auto":
        assert "micro_batch_size auto (chosen on the GPU at start)" in text
    assert not (tmp_path / "empty-cache").exists()  # nothing downloaded or prepared


def test_the_flagship_dry_run_exits_0_from_the_command_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "run_train.py"), "experiment=gpt2_124m_fineweb", "dry_run=true",
                           f"data.cache_dir={tmp_path / 'cache'}"], cwd=tmp_path,
                          env=subprocess_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "micro_batch_size: null" in proc.stdout and "auto (chosen on the GPU at start)" in proc.stdout


def test_the_dry_run_prints_the_compute_budget_of_the_flagship_recipe(tmp_path: Path) -> None:
    """Total tokens, FLOPs as 6N per token (N: parameters without the position embedding) plus attention's
    12 L H Q T, tokens per GPU, and the time on the recipe's 8 H100s at 45% MFU."""
    import torch
    import yaml

    from gpt2.model.gpt import GPT
    from gpt2.model.presets import model_preset
    from gpt2.train.dry_run import dry_run

    text = dry_run(compose_train(["experiment=gpt2_124m_fineweb"]), tmp_path)
    budget = yaml.safe_load(text.split("# compute budget\n")[1].split("\n# ")[0])
    with torch.device("meta"):
        model = GPT(model_preset("gpt2"))
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    tokens = 524_288 * 19_073
    assert budget["tokens"] == tokens and budget["tokens_per_gpu"] == tokens // 8
    assert budget["flops_6n_per_token"] == 6 * n
    attention = 12 * 12 * 12 * 64 * 1024  # 12 L H Q T at T = 1024
    assert budget["flops"] == pytest.approx((6 * n + attention) * tokens, rel=1e-12)
    assert budget["flops"] / (6 * n * tokens) == pytest.approx(1.1526, abs=1e-4)  # attention adds 15% at T=1024
    assert budget["hours"] == pytest.approx(budget["flops"] / (8 * 989e12 * 0.45) / 3600)
    assert "# 10.0B tokens, 8.55e18 FLOPs (6N + attention): ≈ 0.67 h on 8×H100 at 45% MFU" in text
