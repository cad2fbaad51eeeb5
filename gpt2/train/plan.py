"""The run plan: what a training run actually does, resolved once at start-up from the validated
config, which is never written to afterwards (device, precision, world size, accumulation, the model
config actually used). It is logged, saved in every checkpoint's meta.json, and printed by
`python run_train.py dry_run=true`.

Resuming is resolved here too: the checkpoint's architecture is kept, every other setting of the new
config wins (a log line lists what changed), and changes that cannot carry over are refused.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gpt2.config import ModelConfig, TrainConfig, UserError, from_dict, grad_accum_steps, to_dict

log = logging.getLogger("gpt2")

# Model fields that define the weights' shapes: a resumed run cannot change them.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "pad_vocab_multiple", "bias")
# Settings whose change on resume cannot carry over (beyond the model shape).
FIXED_ON_RESUME = {
    "optimizer.name": "the optimizer state is per optimizer type",
    "data.tokenizer_path": "the model's token ids belong to its tokenizer",
    "tokenizer": "the model's token ids belong to its tokenizer",
}


@dataclass(frozen=True)
class RunPlan:
    """Derived, read-only facts about this run."""

    device: str
    """Where this process computes, e.g. cpu or cuda:0."""
    precision: str
    """The concrete precision (auto resolved): fp32, bf16 or fp16."""
    world_size: int
    """Ranks in the job."""
    grad_accum: int
    """Micro-batches per optimizer step on each rank."""
    tokens_per_step: int
    """Tokens per optimizer step over all ranks."""
    max_steps: int
    """Optimizer steps to train for."""
    warmup_steps: int
    """Steps of lr warmup (scheduler.warmup_steps, or derived from max_steps when null)."""
    model: ModelConfig
    """The architecture actually trained (the checkpoint's when resuming, Hugging Face's with init.pretrained)."""
    resume_from: str | None
    """The checkpoint this run continues, if any."""

    def describe(self, n_params: int | None = None) -> str:
        params = f"{n_params / 1e6:.2f}M parameters; " if n_params is not None else ""
        return (f"model {self.model.name}: {params}{self.world_size} rank(s) on {self.device}; {self.precision}; "
                f"grad accumulation {self.grad_accum}; {self.tokens_per_step:,} tokens/step x {self.max_steps:,} "
                f"steps = {self.tokens_per_step * self.max_steps:,} tokens")


def make_plan(cfg: TrainConfig, device: str, precision: str, world_size: int, model: ModelConfig,
              resume_from: Path | None) -> RunPlan:
    return RunPlan(device=device, precision=precision, world_size=world_size,
                   grad_accum=grad_accum_steps(cfg, world_size), tokens_per_step=cfg.total_batch_tokens,
                   max_steps=cfg.max_steps, warmup_steps=cfg.scheduler.warmup_for(cfg.max_steps), model=model,
                   resume_from=str(resume_from) if resume_from else None)


def with_vocab(model: ModelConfig, n_vocab: int, tokenizer_id: str) -> ModelConfig:
    """`model` with vocab_size following the tokenizer (null), or UserError when a set one differs."""
    if model.vocab_size is None:
        return replace(model, vocab_size=n_vocab)
    if model.vocab_size != n_vocab:
        raise UserError(f"model.vocab_size={model.vocab_size} does not match the tokenizer's n_vocab={n_vocab} "
                        f"({tokenizer_id}); set model.vocab_size=null to follow the tokenizer, or "
                        f"model.vocab_size={n_vocab}.")
    return model


# ------------------------------------------------------------------ resume


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every setting that differs (`resume` itself aside)."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k) and k != "resume"}


def _same_path(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a == b
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def resume_model(cfg: TrainConfig, meta: dict[str, Any], ckpt: Path) -> ModelConfig:
    """The model config a run resumed from `ckpt` uses: the checkpoint's architecture with the new
    config's dropout. Logs the settings that changed since the checkpoint (the new values win) and
    raises UserError for a change that cannot carry over (model shape, tokenizer, optimizer type)."""
    saved_cfg = meta.get("config") or {}
    saved_model = from_dict(ModelConfig, (meta.get("plan") or {}).get("model") or saved_cfg.get("model") or {})
    changes = config_changes(saved_cfg, cfg)
    refused = []
    for key, (old, new) in changes.items():
        group, _, name = key.partition(".")
        if key == "model.vocab_size" and new is None:  # null follows the tokenizer, checked against it later
            continue
        if group == "model" and name in SHAPE_FIELDS and "plan" in meta:
            refused.append(f"{key}={new} (checkpoint: {old}): it changes the weights' shapes")
        for fixed, why in FIXED_ON_RESUME.items():
            if (key == fixed or key.startswith(fixed + ".")) and not (key.endswith("path") and _same_path(old, new)):
                refused.append(f"{key}={new} (checkpoint: {old}): {why}")
    if refused:
        raise UserError(f"cannot resume {ckpt} with {refused[0]}; keep the checkpoint's value or start a new run "
                        f"without resume.")
    shown = {k: v for k, v in changes.items() if not (k.endswith("path") and _same_path(*v))
             and not (k == "model.vocab_size" and v[1] is None)}
    if shown:
        log.info("resuming %s with changed settings (the new values win): %s", ckpt,
                 ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in shown.items()))
    if "plan" not in meta and saved_model != cfg.model:  # checkpoints from before run plans: theirs wins
        log.warning("resuming %s: using its model config (%s) instead of model=%s", ckpt, saved_model.name,
                    cfg.model.name)
    return replace(saved_model, dropout=cfg.model.dropout)


# ------------------------------------------------------------------ dry run


def dry_run(cfg: TrainConfig, output_dir: str | Path) -> str:
    """What `train(cfg, output_dir)` would do, without preparing data or training: the composed config,
    the run plan (derived values), parameter count, tokens per step, steps, and the checks that ran."""
    import torch
    import yaml

    from gpt2.checkpoint.format import read_meta
    from gpt2.checkpoint.io import CheckpointManager
    from gpt2.model.gpt import GPT
    from gpt2.runtime.device import resolve_device, resolve_precision

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    precision = resolve_precision(cfg.precision.name, device)
    resume_from = CheckpointManager.find_resume(cfg.resume, Path(output_dir))
    from gpt2.tokenizers.bpe import load_tokenizer, planned_vocab

    model = resume_model(cfg, read_meta(resume_from), resume_from) if resume_from else cfg.model
    n_vocab = planned_vocab(cfg.tokenizer)
    if n_vocab is None:  # tokenizer=file: read it (cheap)
        n_vocab = load_tokenizer(cfg.tokenizer, cfg.data).n_vocab
    model = with_vocab(model, n_vocab, f"tokenizer={cfg.tokenizer.name}")
    model = model.for_device(device.type)
    with torch.device("meta"):
        n_params = GPT(model).num_params()
    plan = make_plan(cfg, str(device), precision, world, model, resume_from)
    lines = ["# composed config", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(),
             "# run plan (derived)", yaml.safe_dump(to_dict(plan), sort_keys=False).rstrip(),
             f"# {plan.describe(n_params)}"]
    if cfg.init.pretrained and not resume_from:
        lines.append(f"# note: init.pretrained={cfg.init.pretrained} defines the architecture when training "
                     f"starts; the counts above are for model={cfg.model.name}")
    lines.append("# checks passed: every group's settings; block_size <= model.n_positions; total_batch_tokens "
                 "divisible by micro_batch_size * block_size * world_size; warmup_steps <= max_steps; device and "
                 "precision available" + ("; resume compatible" if resume_from else ""))
    lines.append("# dry run: nothing was prepared or trained")
    return "\n".join(lines)
