"""`python run_train.py dry_run=true`: what `train(cfg, output_dir)` would do, without preparing data,
downloading, or training: the composed config, the run plan (resolved by the same `resolve_plan` as
training), the parameter count, and the checks that ran. It works offline for every shipped experiment;
micro_batch_size=auto is left to the GPU at start."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from gpt2.checkpoint.manager import CheckpointManager
from gpt2.config import TrainConfig
from gpt2.model.gpt import GPT
from gpt2.runtime.distributed import local_ranks
from gpt2.tokenizers.factory import load_named, planned_vocab
from gpt2.train.plan import resolve_plan
from gpt2.utils.serialize import to_dict


def dry_run(cfg: TrainConfig, output_dir: str | Path) -> str:
    """The dry run's report: config, plan, parameter count, checks."""
    ranks = local_ranks(cfg.device)
    resume = CheckpointManager.find_resume(cfg.resume, Path(output_dir))

    def vocab() -> tuple[int, str]:
        n_vocab = planned_vocab(cfg.tokenizer)
        if n_vocab is None:  # tokenizer=file: read it (cheap)
            n_vocab = load_named(cfg.tokenizer, cfg.data.tokenizer_path, cfg.data.cache_dir).n_vocab
        return n_vocab, f"tokenizer={cfg.tokenizer.name}"

    plan = resolve_plan(cfg, ranks, vocab, resume, choose_micro_batch=None)
    with torch.device("meta"):
        n_params = GPT(plan.model).num_params()
    lines = ["# composed config", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(),
             "# run plan (derived)", yaml.safe_dump(to_dict(plan), sort_keys=False).rstrip(),
             f"# {plan.describe(n_params)}"]
    if plan.micro_batch_size is None:
        lines.append("# micro_batch_size: auto (chosen on the GPU at start: the largest that fits and divides "
                     "the batch)")
    checks = ["every group's settings", "block_size <= model.n_positions", "warmup_steps <= max_steps",
              "device and precision available"]
    checks.insert(2, "total_batch_tokens divisible by micro_batch_size * block_size * world_size"
                  if plan.micro_batch_size is not None else "total_batch_tokens divisible by block_size * world_size")
    if resume is not None:
        checks.append("resume compatible")
    lines.append(f"# checks passed: {'; '.join(checks)}")
    lines.append("# dry run: nothing was prepared or trained")
    return "\n".join(lines)
