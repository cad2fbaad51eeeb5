"""The speedrun recipes: init.pretrained refuses non-GPT-2 switches, a resume refuses a change of which
parameter parts share an lr, and the dry run prints the flagship's and the speedrun's budgets next to a run's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt2.errors import UserError
from tests.helpers import CONF, compose_train, cpu_dist, save_model_checkpoint


def test_pretrained_gpt2_refuses_the_switches_it_cannot_load() -> None:
    from gpt2.train.plan import Vocabulary, planned_architecture, resolve_plan

    cfg = compose_train(["model=tiny", "init.pretrained=gpt2", "model.position_embedding=rope", "model.qk_norm=true",
                         "model.zero_init_proj=true"])
    with pytest.raises(UserError) as err:
        planned_architecture(cfg, cpu_dist(), None)  # before the tokenizer is known
    assert str(err.value) == (
        "init.pretrained=gpt2 loads GPT-2's architecture, but the model sets model.position_embedding=rope, "
        "model.qk_norm=true; drop these overrides to fine-tune GPT-2, or drop init.pretrained to train this model "
        "from scratch.")
    recipe = compose_train(["experiment=speedrun_cpu", "init.pretrained=gpt2"])
    with pytest.raises(UserError, match="model.position_embedding=rope, model.qk_norm=true, model.mlp_activation="
                                        "relu2, model.norm=rmsnorm, model.tie_embeddings=false, "
                                        "model.logit_softcap=30.0;"):
        planned_architecture(recipe, cpu_dist(), None)
    # zero_init_proj only initialises: the pretrained weights replace the init, and GPT-2 loads
    plain = compose_train(["model=tiny", "init.pretrained=gpt2", "model.zero_init_proj=true"])
    plan = resolve_plan(plain, cpu_dist(), planned_architecture(plain, cpu_dist(), None), Vocabulary(50257, "gpt2"),
                        None, None)
    assert plan.model.non_gpt2_switches() == [] and plan.model.n_layer == 12


def test_resume_refuses_a_change_of_which_parts_share_an_lr(tmp_path: Path) -> None:
    from gpt2.checkpoint.handle import find_checkpoint
    from gpt2.config import ModelConfig
    from gpt2.model.gpt import GPT
    from gpt2.train.resume import resume_model

    torch.manual_seed(0)
    save_model_checkpoint(tmp_path, 1, GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=256,
                                                       vocab_size=64)))  # saved with the default optimizer
    ckpt = find_checkpoint(tmp_path)
    tiny = ["model=tiny", "model.name=gpt2"]
    for same_layout in ([], ["optimizer.lr=1e-3"], ["optimizer.embed_lr=6e-4", "optimizer.scalar_lr=6e-4"]):
        assert resume_model(compose_train([*tiny, *same_layout]), ckpt) == ckpt.model_config
    with pytest.raises(UserError, match="optimizer.embed_lr=0.1 \\(checkpoint: None\\): it changes which parameter "
                                        "parts share an lr, and so the optimizer state's parameter groups"):
        resume_model(compose_train([*tiny, "optimizer.embed_lr=0.1"]), ckpt)


def test_the_dry_run_prints_the_flagship_and_speedrun_budgets_side_by_side(tmp_path: Path) -> None:
    from hydra import initialize_config_dir

    from gpt2.cli import compose_experiments
    from gpt2.train.dry_run import BUDGET_REFERENCES, dry_run

    cfg = compose_train(["experiment=speedrun_cpu", f"data.cache_dir={tmp_path / 'empty-cache'}"])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):  # as inside run_train.py's Hydra app
        refs = compose_experiments(BUDGET_REFERENCES)
    assert (refs["gpt2_124m_fineweb"].max_steps, refs["gpt2_124m_speedrun"].max_steps) == (19073, 5000)
    lines = dry_run(cfg, tmp_path, references=refs).splitlines()
    block = lines[lines.index("# budgets side by side:") + 1:][:3]
    assert [line.split()[1] for line in block] == ["this", "experiment=gpt2_124m_fineweb",
                                                   "experiment=gpt2_124m_speedrun"]
    assert "1,024,000 tokens" in block[0] and "[0.0001x the flagship's tokens]" in block[0]
    assert "10.0B tokens" in block[1] and "≈ 0.67 h on 8×H100 at 45% MFU [1x the flagship's tokens]" in block[1]
    assert "2.6B tokens" in block[2] and "[0.26x the flagship's tokens]" in block[2]
    assert "# budgets side by side:" not in dry_run(cfg, tmp_path)  # without references: the run's budget alone


@pytest.mark.parametrize("experiment", ["speedrun_cpu", "gpt2_124m_speedrun"])
def test_the_speedrun_recipes_set_every_switch_and_keep_the_flagships_data(experiment: str) -> None:
    cfg = compose_train([f"experiment={experiment}"])
    assert cfg.model.non_gpt2_switches() == [  # every switch (rope_base keeps its default)
        "position_embedding=rope", "qk_norm=true", "mlp_activation=relu2", "norm=rmsnorm", "tie_embeddings=false",
        "logit_softcap=30.0", "zero_init_proj=true"]
    assert (cfg.optimizer.name, cfg.scheduler.name) == ("muon", "wsd")
    assert cfg.optimizer.lr_sharing() == [["embed"], ["head"], ["scalar"]]  # each AdamW part at its own lr
    twin = compose_train(["experiment=shakespeare_cpu" if experiment == "speedrun_cpu" else "experiment="
                          "gpt2_124m_fineweb"])
    for key in ("data", "tokenizer", "total_batch_tokens", "block_size", "micro_batch_size", "budget"):
        assert getattr(cfg, key) == getattr(twin, key), key
    assert cfg.model.n_layer == twin.model.n_layer and cfg.model.n_embd == twin.model.n_embd


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "ablate").glob("*.yaml")))
def test_each_ablation_switches_exactly_one_technique_of_the_recipe_off(name: str) -> None:
    from gpt2.utils.serialize import flatten, to_dict

    recipe = flatten(to_dict(compose_train(["experiment=speedrun_cpu"])))
    ablated = flatten(to_dict(compose_train(["experiment=speedrun_cpu", f"ablate={name}"])))
    changed = {k for k in recipe if recipe[k] != ablated[k]}
    expected = {"none": set(), "rope": {"model.position_embedding"}, "qk_norm": {"model.qk_norm"},
                "relu2": {"model.mlp_activation"}, "rmsnorm": {"model.norm"}, "untied_head": {"model.tie_embeddings"},
                "zero_init_proj": {"model.zero_init_proj"}, "logit_softcap": {"model.logit_softcap"},
                "muon": {"optimizer.name"}, "part_lrs": {"optimizer.embed_lr", "optimizer.head_lr"},
                "wsd": {"scheduler.name"}}[name]
    assert changed == expected
