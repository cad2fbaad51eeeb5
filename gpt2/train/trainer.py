"""The training loop: a Trainer made of named steps (train_step, forward_backward_step, evaluate, fit) over a
`Run` that gpt2.train.assembly.build_run assembled: model, data, optimizer, evaluations, checkpoints and logger
come in ready-made, a resumed checkpoint already loaded. The Trainer advances the run's `TrainState` (step,
data position, scaler, ...), which its `CheckpointManager` saves with each rank's RNG streams. Derived values
(steps, tokens per step, warmup, micro-batch and accumulation, precision) are read from the run plan."""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch

from gpt2.errors import UserError
from gpt2.runtime.device import autocast, detect_peak_flops
from gpt2.runtime.distributed import all_reduce_mean, any_rank, unwrap_model
from gpt2.train.assembly import Run
from gpt2.train.optim import lr_multiplier, set_lr
from gpt2.train.preemption import PREEMPTED_EXIT_CODE, TrainingInterrupted
from gpt2.train.progress import ProgressBar, Throughput

log = logging.getLogger("gpt2")

__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted"]


class TrainingDiverged(UserError):
    """The loss became NaN/inf."""


class Trainer:
    """Trains a `Run` to the plan's max_steps; its state is `run.state`."""

    def __init__(self, run: Run) -> None:
        plan = run.plan
        if plan.micro_batch_size is None or plan.grad_accum is None:
            raise UserError("the Trainer needs a run plan with the micro-batch chosen (resolve_plan with "
                            "choose_micro_batch); a dry-run plan cannot train.")
        self.run = run
        self.cfg = run.cfg  # read only
        self.plan = plan
        self.dist = run.dist
        self.device = run.dist.device
        self.model = run.model  # possibly DDP/FSDP/compile-wrapped
        self.raw_model = unwrap_model(run.model)
        self.optimizer = run.optimizer
        self.state = run.state
        self.train_loader = run.state.train_loader
        self.grad_accum = plan.grad_accum
        self.evaluator = run.evaluator
        self.checkpoints = run.checkpoints
        self.logger = run.logger

    # ----------------------------------------------------------------- steps

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.plan.precision)

    def _sync_context(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the last micro-step (FSDP2: reduce-scatter)."""
        if not self.dist.enabled:
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
        self.state.scaler.scale(scaled).backward()
        return scaled.detach()

    def train_step(self) -> dict[str, float]:
        """One optimizer step: accumulate micro-batches, clip, step, schedule."""
        state, scaler = self.state, self.state.scaler
        lr = set_lr(self.optimizer, lr_multiplier(state.step, self.cfg.scheduler, self.plan.warmup_steps,
                                                  self.plan.max_steps))
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.train_loader.next_batch()
            if self.device.type == "cuda":  # pinned host memory: the copy overlaps with the GPU's work
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss_sum += self.forward_backward_step(x, y, sync=micro == self.grad_accum - 1)
        loss = all_reduce_mean(loss_sum).item()  # checked before the optimizer step (as torchtitan does)
        if not math.isfinite(loss) and not scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss is {loss} at step {state.step + 1}; training stopped. Lower optimizer.lr, "
                f"keep optimizer.grad_clip > 0, or use precision=bf16/fp32. "
                f"The last checkpoint (if any) is in {self.checkpoints.dir}."
            )
        scaler.unscale_(self.optimizer)
        grad_norm = self._clip_grad_norm()
        scale_before = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.step(self.optimizer)  # fp16: skipped when the gradients are not finite
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._count_skipped(scaler.is_enabled() and scaler.get_scale() < scale_before, loss)
        state.step += 1
        state.tokens_seen += self.plan.tokens_per_step
        return {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                "train/skipped_steps": float(state.skipped_steps)}

    def _count_skipped(self, skipped: bool, loss: float) -> None:
        """fp16: the GradScaler skips steps with non-finite gradients; too many in a row means the run
        has diverged, not that the loss scale is still settling."""
        state = self.state
        state.skipped_steps += int(skipped)
        state.consecutive_skipped = state.consecutive_skipped + 1 if skipped else 0
        limit = self.cfg.precision.max_skipped_steps
        if limit > 0 and state.consecutive_skipped >= limit:
            raise TrainingDiverged(
                f"fp16: {state.consecutive_skipped} optimizer steps in a row were skipped for non-finite gradients "
                f"(step {state.step + 1}, loss {loss}, loss scale {state.scaler.get_scale():g}), reaching "
                f"precision.max_skipped_steps={limit}; training stopped. Lower optimizer.lr, keep "
                f"optimizer.grad_clip > 0, or use precision=bf16/fp32. The last checkpoint (if any) is in "
                f"{self.checkpoints.dir}."
            )

    def _clip_grad_norm(self) -> float:
        max_norm = self.cfg.optimizer.grad_clip if self.cfg.optimizer.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _stop(self) -> bool:
        """A preemption signal reached some rank (a collective: all ranks leave an evaluation together)."""
        return any_rank(self.run.should_stop(), self.device)

    def evaluate(self) -> dict[str, float]:
        """The evaluation after the current step, the one way evaluations run: the val loss, with HellaSwag and
        the lm-eval tasks when their cadence says so (gpt2.train.evaluation.Evaluator.run). Records the val loss
        (checkpoint retention keeps the best by it) and logs it with the sample text. A preemption signal during
        it saves a checkpoint and stops (TrainingInterrupted): a partial val loss is never logged or returned."""
        state = self.state
        metrics = self.evaluator.run(state.step, self._stop)
        if self._stop():  # possibly cut short
            self._stop_for_preemption()  # after the final step too: the resumed run then evaluates in full
        state.last_val_loss = metrics["val/loss"]
        state.best_val_loss = min(state.best_val_loss, state.last_val_loss)
        text = self.evaluator.sample()
        if self.logger is not None:
            self.logger.log_eval(state.step, metrics, text)
        return metrics

    # ------------------------------------------------------------------- loop

    def fit(self) -> float:
        """Train to the plan's max_steps, evaluating and checkpointing on schedule; returns the final val loss."""
        cfg, plan, state = self.cfg, self.plan, self.state
        peak = cfg.peak_flops or detect_peak_flops(
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None)
        meter = Throughput(plan.tokens_per_step, self.raw_model.flops_per_token(cfg.block_size),
                           peak * plan.world_size if peak else None)
        progress = ProgressBar(plan.max_steps, state.step, enabled=self.logger is not None and cfg.progress_bar)
        self.model.train()
        if state.step == 0 and self.evaluator.periodic():
            self.evaluate()  # the baseline every later evaluation is compared against
        with progress:
            while state.step < plan.max_steps:
                if self._stop():
                    self._stop_for_preemption()
                t0 = time.perf_counter()
                metrics = self.train_step()  # ends with .item(): the device is synchronized
                meter.add(time.perf_counter() - t0)  # training time only: evals and saves are not counted
                progress.update(state.step, metrics["train/loss"])
                if state.step % cfg.log_interval == 0 or state.step == plan.max_steps:
                    perf, seconds_per_step = meter.flush()
                    metrics.update(perf, **{"train/tokens_seen": float(state.tokens_seen)})
                    metrics.update({f"data/{name}/tokens": float(n)
                                    for name, n in self.train_loader.source_tokens().items()})
                    if self.logger is not None:
                        self.logger.log_train(state.step, plan.max_steps, metrics,
                                              eta_s=(plan.max_steps - state.step) * seconds_per_step)
                if self.evaluator.due(state.step):
                    self.evaluate()
                self.checkpoints.save(state.step)  # when checkpoint.interval says so
        final = self.evaluate()
        self.checkpoints.save(state.step, final=True)  # when checkpoint.save_final says so
        return final["val/loss"]

    def _stop_for_preemption(self) -> None:
        step = self.state.step
        log.warning("preemption signal received: saving a checkpoint at step %d and exiting", step)
        self.checkpoints.save(step, preempted=True)
        message = f"preempted at step {step}; checkpoint saved, resume with resume=auto"
        log.warning("%s (exit code %d)", message, PREEMPTED_EXIT_CODE)  # the entry point exits silently
        raise TrainingInterrupted(message)
