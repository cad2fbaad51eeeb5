"""The training loop: a Trainer made of named steps (train_step, forward_backward_step, evaluate,
state_dict/load_state_dict, fit). Model, data, optimizer and the run plan come in ready-made; gpt2.train.launch
builds them from a validated `TrainConfig`. Its `CheckpointManager` saves and restores the trainer's state
(global: step, data position, scaler, ...) and each rank's RNG streams."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt2.checkpoint.handle import Checkpoint
from gpt2.checkpoint.manager import CheckpointManager
from gpt2.config import TrainConfig
from gpt2.data.loader import TokenLoader
from gpt2.data.mixture import MixtureLoader
from gpt2.errors import Interrupted, UserError
from gpt2.evals import hellaswag
from gpt2.runtime.device import autocast, detect_peak_flops, grad_scaler
from gpt2.runtime.distributed import DistInfo, all_reduce_mean, any_rank, unwrap_model
from gpt2.tokenizers.factory import GPT2_RECORD, AnyTokenizer, describe, files
from gpt2.train.evaluation import Evaluator, ValSplit
from gpt2.train.metrics import RunLogger
from gpt2.train.optim import lr_multiplier, set_lr
from gpt2.train.plan import RunPlan
from gpt2.train.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler
from gpt2.train.progress import ProgressBar, Throughput
from gpt2.train.rng import RNGState
from gpt2.utils.serialize import to_dict

log = logging.getLogger("gpt2")


class TrainingInterrupted(Interrupted):
    """Training stopped early on purpose (preemption signal); a checkpoint was written.
    The entry point exits with `exit_code` so that a scheduler can requeue the job."""

    def __init__(self, message: str, exit_code: int = PREEMPTED_EXIT_CODE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingDiverged(UserError):
    """The loss became NaN/inf."""


class Trainer:
    """Owns the training state; model, data, optimizer and logger come in ready-made."""

    def __init__(
        self,
        cfg: TrainConfig,
        plan: RunPlan,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: TokenLoader | MixtureLoader,
        val_splits: list[ValSplit],
        ranks: DistInfo,
        output_dir: str | Path,
        tokenizer: AnyTokenizer | None = None,
        preemption: PreemptionHandler | None = None,
        hellaswag_items: list[hellaswag.Rendered] | None = None,
    ) -> None:
        if plan.micro_batch_size is None or plan.grad_accum is None:
            raise UserError("the Trainer needs a run plan with the micro-batch chosen (resolve_plan with "
                            "choose_micro_batch); a dry-run plan cannot train.")
        self.cfg = cfg  # read only
        self.plan = plan
        self.model = model  # possibly DDP/FSDP/compile-wrapped
        self.raw_model = unwrap_model(model)
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.ranks = ranks
        self.output_dir = Path(output_dir)
        self.tokenizer = tokenizer
        self.preemption = preemption
        self.micro_batch_size = plan.micro_batch_size
        self.grad_accum = plan.grad_accum
        self.device = ranks.device
        self.scaler = grad_scaler(self.device, plan.precision)
        self.evaluator = Evaluator(cfg, model, val_splits, batch_size=self.micro_batch_size, device=self.device,
                                   autocast=self.autocast, tokenizer=tokenizer, hellaswag_items=hellaswag_items)
        record = {"config": to_dict(cfg), "plan": to_dict(plan),
                  "tokenizer": describe(tokenizer) if tokenizer is not None else dict(GPT2_RECORD)}
        self.checkpoints = CheckpointManager(
            self.output_dir, cfg.checkpoint, max_steps=cfg.max_steps, model=model, optimizer=optimizer, trainer=self,
            rank=RNGState(), record=record, files=files(tokenizer) if tokenizer is not None else {},
            val_loss=lambda: self.last_val_loss, sharded=cfg.distributed.name == "fsdp" and ranks.enabled)
        # State that checkpoints carry.
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.consecutive_skipped = 0
        self.best_val_loss = math.inf
        self.last_val_loss: float | None = None
        self.wandb_run_id: str | None = None
        self.logger: RunLogger | None = None

    # ----------------------------------------------------------------- steps

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.plan.precision)

    def _sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the last micro-step (FSDP2: reduce-scatter)."""
        if not self.ranks.enabled:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):  # DDP
            return contextlib.nullcontext() if sync else self.model.no_sync()
        if hasattr(self.raw_model, "set_requires_gradient_sync"):  # FSDP2
            self.raw_model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def forward_backward_step(self, x: torch.Tensor, y: torch.Tensor, sync: bool) -> torch.Tensor:
        """One micro-batch. Every micro-batch holds the same number of targets (TokenLoader never yields
        ignored ones), so the mean of the micro-batch losses is the step's mean loss: dividing each by the
        accumulation makes the accumulated gradient that of one big batch (DDP then averages over ranks)."""
        with self._sync_context(sync), self.autocast():
            scaled = self.model(x, y).loss / self.grad_accum
        self.scaler.scale(scaled).backward()
        return scaled.detach()

    def train_step(self) -> dict[str, float]:
        """One optimizer step: accumulate micro-batches, clip, step, schedule."""
        multiplier = lr_multiplier(self.step, self.cfg.scheduler, self.plan.warmup_steps, self.plan.max_steps)
        lr = set_lr(self.optimizer, multiplier)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.train_loader.next_batch()
            if self.device.type == "cuda":  # pinned host memory: the copy overlaps with the GPU's work
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss_sum += self.forward_backward_step(x, y, sync=micro == self.grad_accum - 1)
        loss = all_reduce_mean(loss_sum).item()  # checked before the optimizer step (as torchtitan does)
        if not math.isfinite(loss) and not self.scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss is {loss} at step {self.step + 1}; training stopped. Lower optimizer.lr, "
                f"keep optimizer.grad_clip > 0, or use precision=bf16/fp32. "
                f"The last checkpoint (if any) is in {self.output_dir / 'checkpoints'}."
            )
        self.scaler.unscale_(self.optimizer)
        grad_norm = self._clip_grad_norm()
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)  # fp16: skipped when the gradients are not finite
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._count_skipped(self.scaler.is_enabled() and self.scaler.get_scale() < scale_before, loss)
        self.step += 1
        self.tokens_seen += self.cfg.total_batch_tokens
        return {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                "train/skipped_steps": float(self.skipped_steps)}

    def _count_skipped(self, skipped: bool, loss: float) -> None:
        """fp16: the GradScaler skips steps with non-finite gradients; too many in a row means the run
        has diverged, not that the loss scale is still settling."""
        self.skipped_steps += int(skipped)
        self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0
        limit = self.cfg.precision.max_skipped_steps
        if limit > 0 and self.consecutive_skipped >= limit:
            raise TrainingDiverged(
                f"fp16: {self.consecutive_skipped} optimizer steps in a row were skipped for non-finite gradients "
                f"(step {self.step + 1}, loss {loss}, loss scale {self.scaler.get_scale():g}), reaching "
                f"precision.max_skipped_steps={limit}; training stopped. Lower optimizer.lr, keep "
                f"optimizer.grad_clip > 0, or use precision=bf16/fp32. The last checkpoint (if any) is in "
                f"{self.output_dir / 'checkpoints'}."
            )

    def _clip_grad_norm(self) -> float:
        max_norm = self.cfg.optimizer.grad_clip if self.cfg.optimizer.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _stop(self) -> bool:
        """A preemption signal reached some rank (all ranks leave an evaluation together)."""
        return any_rank(self._preempted(), self.device)

    def evaluate(self, with_hellaswag: bool = False, with_lm_eval: bool = False) -> dict[str, float]:
        """Val loss, and HellaSwag and the lm-eval tasks when asked (gpt2.train.evaluation); stops early
        (incomplete numbers) when a preemption signal arrives."""
        return self.evaluator.evaluate(self._stop, with_hellaswag=with_hellaswag, with_lm_eval=with_lm_eval)

    def sample(self) -> str | None:
        """Text from the fixed prompt (same seed every time, global RNG untouched)."""
        return self.evaluator.sample()

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """The global training state (the same on every rank), the data position included."""
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

    def load_checkpoint(self, ckpt: Checkpoint) -> None:
        self.checkpoints.load(ckpt)
        log.info("resumed from %s at step %d", ckpt.path, self.step)

    # ------------------------------------------------------------------- loop

    def _preempted(self) -> bool:
        return self.preemption is not None and self.preemption.requested

    def _run_eval(self) -> dict[str, float]:
        metrics = self.evaluator.run(self.step, self._stop)
        if self._stop():  # possibly cut short: never log/return a partial val loss
            self._stop_for_preemption()  # after the final step too: the resumed run then evaluates in full
        self.last_val_loss = metrics["val/loss"]
        self.best_val_loss = min(self.best_val_loss, self.last_val_loss)
        text = self.sample()
        if self.logger is not None:
            self.logger.log_eval(self.step, metrics, text)
        return metrics

    def fit(self) -> float:
        """Train to `max_steps`, evaluating and checkpointing on schedule; returns the final val loss."""
        cfg = self.cfg
        peak = cfg.peak_flops or detect_peak_flops(
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None)
        meter = Throughput(cfg.total_batch_tokens, self.raw_model.flops_per_token(cfg.block_size),
                           peak * self.ranks.world_size if peak else None)
        progress = ProgressBar(cfg.max_steps, self.step, enabled=self.logger is not None and cfg.progress_bar)
        self.model.train()
        if self.step == 0 and self.evaluator.periodic():
            self._run_eval()  # the baseline every later evaluation is compared against
        with progress:
            while self.step < cfg.max_steps:
                if self._stop():
                    self._stop_for_preemption()
                t0 = time.perf_counter()
                metrics = self.train_step()  # ends with .item(): the device is synchronized
                meter.add(time.perf_counter() - t0)  # training time only: evals and saves are not counted
                progress.update(self.step, metrics["train/loss"])
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    perf, seconds_per_step = meter.flush()
                    metrics.update(perf, **{"train/tokens_seen": float(self.tokens_seen)})
                    metrics.update({f"data/{name}/tokens": float(n)
                                    for name, n in self.train_loader.source_tokens().items()})
                    if self.logger is not None:
                        self.logger.log_train(self.step, cfg.max_steps, metrics,
                                              eta_s=(cfg.max_steps - self.step) * seconds_per_step)
                if self.evaluator.due(self.step):
                    self._run_eval()
                self.checkpoints.save(self.step)  # when checkpoint.interval says so
        final = self._run_eval()
        self.checkpoints.save(self.step, final=True)  # when checkpoint.save_final says so
        return final["val/loss"]

    def _stop_for_preemption(self) -> None:
        log.warning("preemption signal received: saving a checkpoint at step %d and exiting", self.step)
        self.checkpoints.save(self.step, preempted=True)
        message = f"preempted at step {self.step}; checkpoint saved, resume with resume=auto"
        log.warning("%s (exit code %d)", message, PREEMPTED_EXIT_CODE)  # the entry point exits silently
        raise TrainingInterrupted(message)
