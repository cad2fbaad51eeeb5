"""Resuming: which checkpoint `resume=` names (`checkpoint_to_resume`), and what a resumed run keeps from it:
the architecture, with every other setting of the new config winning (a log line lists what changed), and a
refusal for changes that cannot carry over."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from gpt2.checkpoint.format import RESUME_FIX
from gpt2.checkpoint.handle import Checkpoint, find_checkpoint
from gpt2.config import ModelConfig, OptimizerConfig, TrainConfig
from gpt2.errors import UserError
from gpt2.utils.serialize import flatten, to_dict

log = logging.getLogger("gpt2")

SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size", "pad_vocab_multiple", "bias")
"""Model fields that define the weights' shapes: a resumed run cannot change them."""
FIXED_ON_RESUME = {
    "optimizer.name": "the optimizer state is per optimizer type",
    "tokenizer": "the model's token ids belong to its tokenizer",
}
"""Settings whose change on resume cannot carry over (beyond the model shape), and why."""


def checkpoint_to_resume(resume: str | None, run_dir: Path) -> Checkpoint | None:
    """The checkpoint a run continues: none without `resume`; with resume=auto the newest in this run dir (a
    fresh start when there is none); a path must hold one (UserError otherwise)."""
    if not resume:
        return None
    if resume == "auto":
        found = find_checkpoint(run_dir, required=False)
        log.info("resume=auto: %s", f"resuming from {found.path}" if found else
                 f"no checkpoint in {run_dir}, starting fresh")
        return found
    return find_checkpoint(resume, RESUME_FIX)


def config_changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, new value)} for every setting that differs (`resume` itself aside)."""
    old, new = flatten(saved), flatten(to_dict(cfg))
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k) and k != "resume"}


def _same_path(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a == b
    return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()


def resume_model(cfg: TrainConfig, ckpt: Checkpoint) -> ModelConfig:
    """The model config a run resumed from `ckpt` uses: the checkpoint's architecture with the new config's
    dropout. Logs the settings that changed since the checkpoint (the new values win) and raises UserError
    for a change that cannot carry over (model shape, tokenizer, optimizer type, which parts share an lr)."""
    changes = config_changes(ckpt.meta.get("config") or {}, cfg)
    refused = []
    for key, (old, new) in changes.items():
        group, _, name = key.partition(".")
        if key == "model.vocab_size" and new is None:  # null follows the tokenizer, checked against it later
            continue
        if group == "model" and name in SHAPE_FIELDS:
            refused.append(f"{key}={new} (checkpoint: {old}): it changes the weights' shapes")
        for fixed, why in FIXED_ON_RESUME.items():
            if (key == fixed or key.startswith(fixed + ".")) and not (key.endswith("path") and _same_path(old, new)):
                refused.append(f"{key}={new} (checkpoint: {old}): {why}")
    saved = (ckpt.meta.get("config") or {}).get("optimizer") or {}
    saved_opt = OptimizerConfig(**{k: v for k, v in saved.items() if k in OptimizerConfig.__dataclass_fields__})
    if saved_opt.name == cfg.optimizer.name and saved_opt.lr_sharing() != cfg.optimizer.lr_sharing():
        lr_keys = [k for k in changes if k.startswith("optimizer.") and k.endswith("lr") and k != "optimizer.muon_lr"]
        refused.append(f"{', '.join(f'{k}={changes[k][1]}' for k in lr_keys)} (checkpoint: "
                       f"{', '.join(f'{changes[k][0]}' for k in lr_keys)}): it changes which parameter parts share "
                       f"an lr, and so the optimizer state's parameter groups")
    if refused:
        raise UserError(f"cannot resume {ckpt.path} with {refused[0]}; keep the checkpoint's value or start a new "
                        f"run without resume.")
    shown = {k: v for k, v in changes.items() if not (k.endswith("path") and _same_path(*v))
             and not (k == "model.vocab_size" and v[1] is None)}
    if shown:
        log.info("resuming %s with changed settings (the new values win): %s", ckpt.path,
                 ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in shown.items()))
    return replace(ckpt.model_config, dropout=cfg.model.dropout)
