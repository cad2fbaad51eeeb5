"""`python run_train.py dry_run=true`: what `train(cfg, output_dir)` would do, without preparing data,
downloading, or training: the composed config, the run plan (resolved on the same path as
gpt2.train.assembly.build_run: the checkpoint to resume, `planned_architecture`, `resolve_plan`), the
parameter count, and the checks that ran. It works offline for every shipped experiment; the vocabulary is
the planned one, and micro_batch_size=auto is left to the GPU at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from gpt2.config import TrainConfig
from gpt2.errors import ConfigError
from gpt2.model.gpt import GPT
from gpt2.runtime.device import PEAK_FLOPS_BF16, detect_peak_flops
from gpt2.runtime.distributed import local_dist
from gpt2.tokenizers.factory import load_named, planned_vocab
from gpt2.train.plan import Vocabulary, planned_architecture, resolve_plan, with_vocab
from gpt2.train.resume import checkpoint_to_resume
from gpt2.utils.serialize import to_dict

FLAGSHIP = "gpt2_124m_fineweb"
"""The experiment whose budget the dry run prints next to the run's own, with the speedrun's."""
BUDGET_REFERENCES = (FLAGSHIP, "gpt2_124m_speedrun")
"""The shipped experiments whose budgets the dry run prints side by side with the run's (as they ship)."""


def planned_vocabulary(cfg: TrainConfig) -> Vocabulary:
    """The tokenizer's vocabulary without preparing anything: GPT-2's and our BPE's size are known, a
    tokenizer=file is read (cheap)."""
    n_vocab = planned_vocab(cfg.tokenizer)
    if n_vocab is None:
        n_vocab = load_named(cfg.tokenizer, cfg.data.cache_dir).n_vocab
    return Vocabulary(n_vocab, f"tokenizer={cfg.tokenizer.name}")


def dry_run(cfg: TrainConfig, output_dir: str | Path, references: dict[str, TrainConfig] | None = None) -> str:
    """The dry run's report: config, plan, parameter count, checks; with `references` (BUDGET_REFERENCES
    composed as they ship, by name), their budgets side by side with this run's."""
    dist = local_dist(cfg.device)
    resume = checkpoint_to_resume(cfg.resume, Path(output_dir))
    architecture = planned_architecture(cfg, dist, resume)
    plan = resolve_plan(cfg, dist, architecture, planned_vocabulary(cfg), resume, choose_micro_batch=None)
    with torch.device("meta"):
        model = GPT(plan.model)
    n_params = model.num_params()
    budget = compute_budget(cfg, plan.tokens_per_step, plan.max_steps, model.flops_per_token(cfg.block_size),
                            model.num_params(exclude_embeddings=True), plan.world_size, dist.device)
    lines = ["# composed config", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(),
             "# run plan (derived)", yaml.safe_dump(to_dict(plan), sort_keys=False).rstrip(),
             "# compute budget", yaml.safe_dump(budget, sort_keys=False).rstrip(),
             f"# {plan.describe(n_params)}", f"# {budget_line(budget)}"]
    if references:
        lines += side_by_side(budget, references)
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


def compute_budget(cfg: TrainConfig, tokens_per_step: int, max_steps: int, flops_per_token: float, n_6n: int,
                   world_size: int, device: torch.device) -> dict[str, Any]:
    """The run's total tokens and training FLOPs (6N per token for the matmuls, N without the position
    embedding, plus 12 L H Q T for attention: GPT.flops_per_token), the tokens per GPU, and the time at
    budget.mfu of the GPU's dense bf16 peak (peak_flops=, else budget.gpu's, else the detected GPU's)."""
    gpus = cfg.budget.gpus or world_size
    tokens = tokens_per_step * max_steps
    name = cfg.budget.gpu or (torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    peak = cfg.peak_flops or detect_peak_flops(name)
    if cfg.budget.gpu and peak is None:
        raise ConfigError(f"budget.gpu={cfg.budget.gpu!r} is not a GPU of the peak-FLOPs table; name one of "
                          f"{', '.join(PEAK_FLOPS_BF16)}, or give its dense bf16 peak FLOP/s per GPU with "
                          f"peak_flops= (e.g. peak_flops=989e12).")
    flops = flops_per_token * tokens
    seconds = flops / (gpus * peak * cfg.budget.mfu) if peak else None
    return {"tokens": tokens, "steps": max_steps, "tokens_per_step": tokens_per_step,
            "tokens_per_gpu": tokens // gpus, "tokens_per_gpu_per_step": tokens_per_step // gpus,
            "flops_per_token": flops_per_token, "flops_6n_per_token": 6 * n_6n, "flops": flops, "gpus": gpus,
            "gpu": "peak_flops" if cfg.peak_flops else name,
            "peak_flops_per_gpu": peak, "mfu": cfg.budget.mfu, "hours": seconds / 3600 if seconds else None}


def side_by_side(budget: dict[str, Any], references: dict[str, TrainConfig]) -> list[str]:
    """This run's budget and each reference experiment's (its model with GPT-2's padded vocabulary on its own
    budget.gpu x budget.gpus), each with its tokens as a multiple of the flagship's."""
    budgets = {"this run": budget}
    for name, ref in references.items():
        with torch.device("meta"):
            model = GPT(with_vocab(ref.model, planned_vocabulary(ref)).for_device("cuda"))
        flops = model.flops_per_token(ref.block_size)
        budgets[f"experiment={name}"] = compute_budget(ref, ref.total_batch_tokens, ref.max_steps, flops,
                                                       model.num_params(exclude_embeddings=True),
                                                       ref.budget.gpus or 1, torch.device("cpu"))
    flagship = budgets.get(f"experiment={FLAGSHIP}")
    width = max(len(label) for label in budgets)
    lines = ["# budgets side by side:"]
    for label, b in budgets.items():
        share = f" [{b['tokens'] / flagship['tokens']:.2g}x the flagship's tokens]" if flagship else ""
        lines.append(f"#   {label:<{width}}  {budget_head(b)}{share}")
    return lines


def budget_head(b: dict[str, Any]) -> str:
    """e.g. "10.0B tokens, 8.55e18 FLOPs (6N + attention): ≈ 0.67 h on 8×H100 at 45% MFU"."""
    head = f"{b['tokens'] / 1e9:.1f}B tokens" if b["tokens"] >= 1e8 else f"{b['tokens']:,} tokens"
    head += f", {b['flops']:.3g}".replace("e+", "e") + " FLOPs (6N + attention)"
    if b["hours"] is not None:
        where = f"{b['gpus']}×{b['gpu']}" if b["gpu"] != "peak_flops" else f"{b['gpus']} GPU(s) at peak_flops"
        head += f": ≈ {b['hours']:.2f} h on {where} at {b['mfu']:.0%} MFU"
    elif b["gpu"] is None:
        head += ": no time estimate (no GPU detected; name one with budget.gpu=H100, or give peak_flops=)"
    else:
        head += f": no time estimate ({b['gpu']} is not in the peak-FLOPs table; give its peak with peak_flops=)"
    return head


def budget_line(b: dict[str, Any]) -> str:
    """e.g. "10.0B tokens, 8.55e18 FLOPs (6N + attention): ≈ 0.67 h on 8×H100 at 45% MFU; ..."."""
    return (f"{budget_head(b)}; {b['steps']:,} steps, {b['tokens_per_gpu_per_step']:,} tokens per GPU per step, "
            f"{b['tokens_per_gpu']:,} per GPU in all")
