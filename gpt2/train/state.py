"""`TrainState`: the global training state a checkpoint carries in trainer.pt (the same on every rank): the step
and token counters, the fp16 skip counters, the val losses retention and logs need, the W&B run id, the
GradScaler and the data position. The Trainer advances it; the CheckpointManager saves and restores it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from gpt2.data.loader import TokenLoader
from gpt2.data.mixture import MixtureLoader


@dataclass
class TrainState:
    """What training has done so far; `state_dict`/`load_state_dict` make it a checkpoint state."""

    scaler: torch.amp.GradScaler
    """fp16's loss scaler (disabled in other precisions)."""
    train_loader: TokenLoader | MixtureLoader
    """The training batches; its position is part of the state."""
    step: int = 0
    """Optimizer steps taken."""
    tokens_seen: int = 0
    """Training tokens consumed over all ranks."""
    skipped_steps: int = 0
    """fp16: optimizer steps the scaler skipped for non-finite gradients."""
    consecutive_skipped: int = 0
    """fp16: skipped steps in a row, up to now."""
    best_val_loss: float = math.inf
    """The lowest val loss of any evaluation so far."""
    last_val_loss: float | None = None
    """The val loss of the latest evaluation (checkpoint retention keeps the best by it)."""
    wandb_run_id: str | None = None
    """The W&B run a resumed run continues."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "consecutive_skipped": self.consecutive_skipped,
            "best_val_loss": self.best_val_loss,
            "last_val_loss": self.last_val_loss,
            "wandb_run_id": self.wandb_run_id,
            "scaler": self.scaler.state_dict(),
            "train_loader": self.train_loader.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self.consecutive_skipped = int(state["consecutive_skipped"])
        self.best_val_loss = float(state["best_val_loss"])
        self.last_val_loss = state["last_val_loss"]
        self.wandb_run_id = state["wandb_run_id"]
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.train_loader.load_state_dict(state["train_loader"])
