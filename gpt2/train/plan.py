"""The run plan: what a training run actually does, resolved once at start-up from the validated config,
which is never written to afterwards (device, precision, world size, micro-batch and accumulation, steps,
warmup, the model config actually trained). `planned_architecture` and then `resolve_plan` derive it, for
training (gpt2.train.assembly) and for `python run_train.py dry_run=true` alike; the plan is logged, saved in
every checkpoint's meta.json and printed by the dry run. After start-up every derived value is read from the
plan (the trainer, the schedule, the evaluations, the checkpoint cadence), never recomputed from the config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

from gpt2.checkpoint.handle import Checkpoint
from gpt2.config import ModelConfig, TrainConfig, check_batch
from gpt2.errors import UserError
from gpt2.model.presets import model_preset
from gpt2.runtime.device import resolve_precision
from gpt2.runtime.distributed import DistInfo
from gpt2.train.resume import resume_model

AUTO_BATCH = "auto (chosen on the GPU at start)"
"""How a plan made without the GPU (the dry run) shows micro_batch_size=auto."""


@dataclass(frozen=True)
class RunPlan:
    """Derived, read-only facts about this run."""

    device: str
    """Where this process computes, e.g. cpu or cuda:0."""
    precision: str
    """The concrete precision (auto resolved): fp32, bf16 or fp16."""
    world_size: int
    """Ranks in the job."""
    micro_batch_size: int | None
    """Sequences per forward on one rank (micro_batch_size=auto resolved); None only in a dry run of auto."""
    grad_accum: int | None
    """Micro-batches per optimizer step on each rank; None when the micro-batch is not chosen yet."""
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
        micro = self.micro_batch_size if self.micro_batch_size is not None else AUTO_BATCH
        accum = self.grad_accum if self.grad_accum is not None else "follows micro_batch_size"
        return (f"model {self.model.name}: {params}{self.world_size} rank(s) on {self.device}; {self.precision}; "
                f"micro_batch_size {micro}, grad accumulation {accum}; {self.tokens_per_step:,} tokens/step x "
                f"{self.max_steps:,} steps = {self.tokens_per_step * self.max_steps:,} tokens")


class Vocabulary(NamedTuple):
    """What the plan needs of the tokenizer."""

    n_vocab: int
    """Token ids the model must embed."""
    id: str
    """The tokenizer's identity, for error messages (e.g. tiktoken's gpt2, or our BPE's hash)."""


def with_vocab(model: ModelConfig, vocab: Vocabulary) -> ModelConfig:
    """`model` with vocab_size following the tokenizer (null), or UserError when a set one differs."""
    if model.vocab_size is None:
        return replace(model, vocab_size=vocab.n_vocab)
    if model.vocab_size != vocab.n_vocab:
        raise UserError(f"model.vocab_size={model.vocab_size} does not match the tokenizer's n_vocab={vocab.n_vocab} "
                        f"({vocab.id}); set model.vocab_size=null to follow the tokenizer, or "
                        f"model.vocab_size={vocab.n_vocab}.")
    return model


def pretrained_architecture(name_or_dir: str) -> ModelConfig:
    """The architecture of init.pretrained without loading weights or a network: a local HF directory's
    config.json, or the preset of a hub name (gpt2, gpt2-medium, ... are our presets)."""
    import json

    from gpt2.model.hf import local_pretrained_dir, model_config_from_hf

    directory = local_pretrained_dir(name_or_dir)
    if directory is None:
        return model_preset(name_or_dir)
    try:
        return model_config_from_hf(json.loads((directory / "config.json").read_text()))
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"init.pretrained={name_or_dir}: cannot read {directory / 'config.json'} ({err}); pass a "
                        f"directory written by save_pretrained.") from None


def planned_architecture(cfg: TrainConfig, dist: DistInfo, resume: Checkpoint | None) -> ModelConfig:
    """The architecture this run trains, before the tokenizer is known: the checkpoint's when resuming (with the
    new dropout), Hugging Face's with init.pretrained, else `cfg.model`. It runs the checks that need no
    tokenizer first, so that they fail before hours of corpus preparation: the precision on this device, and a
    resume that cannot carry over."""
    resolve_precision(cfg.precision.name, dist.device)  # refuses bf16 on a GPU without it
    if resume is not None:
        return resume_model(cfg, resume)  # refuses changes that cannot carry over; logs the others
    if cfg.init.pretrained:
        blocking = [f"model.{switch}" for switch in cfg.model.non_gpt2_switches(init=False)]
        if blocking:
            raise UserError(f"init.pretrained={cfg.init.pretrained} loads GPT-2's architecture, but the model sets "
                            f"{', '.join(blocking)}; drop these overrides to fine-tune GPT-2, or drop "
                            f"init.pretrained to train this model from scratch.")
        arch = pretrained_architecture(cfg.init.pretrained)
        return replace(arch, dropout=cfg.model.dropout, pad_vocab_multiple=cfg.model.pad_vocab_multiple)
    return cfg.model


def resolve_plan(cfg: TrainConfig, dist: DistInfo, architecture: ModelConfig, vocab: Vocabulary,
                 resume: Checkpoint | None, choose_micro_batch: Callable[[ModelConfig], int] | None) -> RunPlan:
    """Derive the run plan from the validated config, where this process runs (`dist`), the architecture
    (`planned_architecture`), the tokenizer's vocabulary and the checkpoint being resumed.
    `choose_micro_batch(model)` picks micro_batch_size=auto (on the GPU); without it (the dry run) an auto
    micro-batch stays unresolved in the plan. The batch rules run on the micro-batch actually used."""
    precision = resolve_precision(cfg.precision.name, dist.device)
    if cfg.init.pretrained and resume is None and architecture.vocab_size != vocab.n_vocab:
        raise UserError(f"init.pretrained={cfg.init.pretrained} has vocab_size={architecture.vocab_size} but the "
                        f"tokenizer has n_vocab={vocab.n_vocab}; use tokenizer=gpt2 with GPT-2 weights, or drop "
                        f"init.pretrained.")
    model = with_vocab(architecture, vocab).for_device(dist.device.type)  # pad: 64 on CUDA, else 1
    micro: int | None
    if cfg.micro_batch_size != "auto":
        micro = int(cfg.micro_batch_size)
    elif choose_micro_batch is not None:
        micro = choose_micro_batch(model)
    else:
        micro = None
    accum = check_batch(cfg, dist.world_size, micro) if micro is not None else None
    return RunPlan(device=str(dist.device), precision=precision, world_size=dist.world_size, micro_batch_size=micro,
                   grad_accum=accum, tokens_per_step=cfg.total_batch_tokens, max_steps=cfg.max_steps,
                   warmup_steps=cfg.scheduler.warmup_for(cfg.max_steps), model=model,
                   resume_from=str(resume.path) if resume else None)
