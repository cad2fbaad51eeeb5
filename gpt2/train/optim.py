"""Optimizers (AdamW, Muon + AdamW) and the learning-rate schedule.

The schedule is a pure function of the step, so resuming needs only the step number:
the trainer sets each group's lr to ``group["peak_lr"] * lr_multiplier(...)`` before
every optimizer step, with the warmup and length of the run plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gpt2.config import OptimizerConfig, SchedulerConfig
from gpt2.errors import ConfigError


def lr_multiplier(step: int, cfg: SchedulerConfig, warmup_steps: int, max_steps: int) -> float:
    """Fraction of the peak lr at optimizer step `step` (0-based): a linear warmup over `warmup_steps`, then
    cfg.name's shape until `max_steps` (the run plan holds both), where cosine, linear and wsd reach
    min_lr_ratio. wsd holds the peak, then falls linearly over its cooldown: the last
    round(cooldown_fraction * max_steps) steps, starting no earlier than the end of the warmup."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "wsd":
        start = max(warmup_steps, max_steps - round(cfg.cooldown_fraction * max_steps))
        shape = 1.0 - min(1.0, max(0, step - start) / max(1, max_steps - start))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if cfg.name == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def param_part(name: str, param: nn.Parameter) -> str:
    """The part (OptimizerConfig.part_lrs) of parameter `name` of a GPT (a wrapper's prefix is allowed): embed
    (wte, wpe), head (an untied lm_head), hidden (the other >=2-D weights: the blocks' matmuls) or scalar."""
    parts = name.split(".")
    if "wte" in parts or "wpe" in parts:
        return "embed"
    if "lm_head" in parts:
        return "head"
    return "hidden" if param.dim() >= 2 else "scalar"


def _param_groups(named: Iterable[tuple[str, nn.Parameter]], cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """AdamW groups by lr and decay: each part at its lr (OptimizerConfig.part_lrs), weight decay only on >=2-D
    weights (matmuls, embeddings), none on biases and norms. Parts that share an lr share groups, so the
    defaults give GPT-2's two groups (decay, no decay) in named_parameters order."""
    lrs = cfg.part_lrs()
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        lr, decays = lrs[param_part(name, p)], p.dim() >= 2
        group = groups.setdefault((lr, decays), {"params": [], "weight_decay": cfg.weight_decay if decays else 0.0,
                                                 "lr": lr, "peak_lr": lr})
        group["params"].append(p)
    return list(groups.values())


def _adamw(groups: list[dict[str, Any]], cfg: OptimizerConfig, device_type: str) -> torch.optim.AdamW:
    # Fused AdamW runs on CUDA and (since torch 2.4) on CPU; it is the fastest kernel on both.
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped together (Muon for hidden matrices, AdamW for the rest).

    Exposes the union of their param groups so the trainer's lr schedule and grad
    clipping treat it like one optimizer; the state dict holds one entry per part.
    """

    def __init__(self, parts: dict[str, torch.optim.Optimizer]) -> None:
        self.parts = parts
        self.defaults = {}
        self.state = {}  # each part keeps its own state

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The parts' groups as they are now: loading a state dict replaces a part's group dicts, so a list
        taken once would keep the old ones (and the lr schedule would stop reaching the parts)."""
        return [g for opt in self.parts.values() for g in opt.param_groups]

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for opt in self.parts.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for name, opt in self.parts.items():
            opt.load_state_dict(state_dict[name])


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW over all params, or Muon for 2-D block matrices with AdamW for the rest."""
    named = list(model.named_parameters())
    if cfg.name == "adamw":
        return _adamw(_param_groups(named, cfg), cfg, device_type)
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"optimizer=muon needs torch.optim.Muon (torch>=2.9); this is torch {torch.__version__}. "
                          "Upgrade torch or use optimizer=adamw.")
    # Muon orthogonalizes 2-D updates: right for the hidden matmuls inside blocks, wrong for
    # embeddings/head (lookups, not linear maps of the residual stream) and for vectors.
    hidden = [p for n, p in named if param_part(n, p) == "hidden" and p.requires_grad]
    hidden_ids = {id(p) for p in hidden}
    rest = [(n, p) for n, p in named if id(p) not in hidden_ids]
    muon = torch.optim.Muon(
        [{"params": hidden, "lr": cfg.muon_lr, "peak_lr": cfg.muon_lr}],
        lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
    )
    return CombinedOptimizer({"muon": muon, "adamw": _adamw(_param_groups(rest, cfg), cfg, device_type)})


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Scale every group's peak lr by `multiplier`; returns the first group's lr (for logs)."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]
