"""What a training run measures besides its loss: the val loss on fixed windows of each val split, HellaSwag,
the lm-eval tasks, and a text sample, together with their cadences. The run (gpt2.train.assembly) builds one
`Evaluator`; the Trainer calls `run` after the steps it is due (Trainer.evaluate); the scoring itself lives in
gpt2.evals. Batch size, precision and run length come from the run plan."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from gpt2.config import TrainConfig
from gpt2.data.shards import TokenStream
from gpt2.errors import UserError
from gpt2.evals import hellaswag
from gpt2.evals.runner import training_windows
from gpt2.evals.val_loss import val_loss
from gpt2.generate.sampling import generate
from gpt2.runtime.device import autocast
from gpt2.runtime.distributed import unwrap_model
from gpt2.tokenizers.factory import AnyTokenizer
from gpt2.train.plan import RunPlan

if TYPE_CHECKING:
    from gpt2.evals.lm_eval_tasks import LoadedTasks


class ValSplit(NamedTuple):
    """One val split scored at each evaluation: the corpus's (name "") or a mixture source's."""

    name: str
    weight: float
    """The source's weight in a mixture (1 for a single corpus)."""
    tokens: TokenStream


class Evaluator:
    """The periodic evaluations of a run; the model is scored as it is at each call."""

    def __init__(
        self,
        cfg: TrainConfig,
        plan: RunPlan,
        model: nn.Module,
        val_splits: list[ValSplit],
        *,
        device: torch.device,
        tokenizer: AnyTokenizer | None = None,
        hellaswag_items: list[hellaswag.Rendered] | None = None,
    ) -> None:
        if plan.micro_batch_size is None:
            raise UserError("evaluations need a run plan with the micro-batch chosen (resolve_plan with "
                            "choose_micro_batch); a dry-run plan cannot evaluate.")
        self.cfg = cfg  # read only
        self.plan = plan
        self.model = model  # possibly DDP/FSDP/compile-wrapped: the val loss runs through the wrapper
        self.raw_model = unwrap_model(model)
        self.val_splits = val_splits
        self.batch_size = plan.micro_batch_size
        self.device = device
        self.tokenizer = tokenizer
        self.hellaswag_items = hellaswag_items  # needed when cfg.eval.hellaswag_interval > 0
        # The val loss is scored on the same windows at every evaluation: the whole split, or a seeded sample.
        self.val_windows = [training_windows(len(split.tokens), cfg.block_size, cfg, self.batch_size)
                            for split in val_splits]
        self.lm_eval_tasks: LoadedTasks | None = None  # cfg.eval.lm_eval_tasks, loaded once (rank 0 downloads first)
        if cfg.eval.lm_eval_tasks:
            from gpt2.evals import lm_eval_tasks

            if tokenizer is None:
                raise UserError("eval.lm_eval_tasks needs the run's tokenizer; pass it to the Trainer.")
            self.lm_eval_tasks = lm_eval_tasks.load_tasks(cfg.eval.lm_eval_tasks, cfg.eval.lm_eval, key="eval.lm_eval")

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.plan.precision)

    # -------------------------------------------------------------- cadence

    def intervals(self) -> tuple[int, ...]:
        """The cadences of the periodic evaluations (val loss, HellaSwag, lm-eval tasks); 0 = none."""
        lm_every = self.cfg.eval.lm_eval_interval if self.lm_eval_tasks is not None else 0
        return self.cfg.eval.interval, self.cfg.eval.hellaswag_interval, lm_every

    def periodic(self) -> bool:
        """Some evaluation runs on a cadence (then the run also starts with a baseline evaluation)."""
        return any(n > 0 for n in self.intervals())

    def due(self, step: int) -> bool:
        """A periodic evaluation is due after `step` (the final one runs anyway, so it is never due here)."""
        if step >= self.plan.max_steps:
            return False
        return any(n > 0 and step % n == 0 for n in self.intervals())

    def extras(self, step: int) -> tuple[bool, bool]:
        """(HellaSwag, lm-eval tasks): which join the val loss at the evaluation after `step`. HellaSwag runs on
        its cadence and at the end when it has one; the lm-eval tasks on theirs and always at the end."""
        every, lm_every = self.cfg.eval.hellaswag_interval, self.cfg.eval.lm_eval_interval
        final = step >= self.plan.max_steps
        return (every > 0 and (step % every == 0 or final),
                self.lm_eval_tasks is not None and (final or (lm_every > 0 and step % lm_every == 0)))

    # -------------------------------------------------------------- scoring

    @torch.no_grad()
    def run(self, step: int, stop: Callable[[], bool]) -> dict[str, float]:
        """The evaluation after `step`: the val loss over the fixed windows (split across ranks), and HellaSwag
        accuracy and the lm-eval tasks' metrics (`lm_eval/<task>/<metric>`) when `extras` says so. Stops early
        (incomplete numbers) once `stop()` is true; `stop` must give the same answer on every rank."""
        with_hellaswag, with_lm_eval = self.extras(step)
        metrics = self._val_metrics(stop)
        if with_hellaswag and self.hellaswag_items and not stop():
            hs = hellaswag.score(self.raw_model, self.hellaswag_items, batch_size=self.batch_size,
                                 device=self.device, autocast=self.autocast)
            metrics.update({"hellaswag/acc": hs.acc, "hellaswag/acc_norm": hs.acc_norm,
                            "hellaswag/items": float(hs.n_items)})
        if with_lm_eval and self.lm_eval_tasks is not None and not stop():
            from gpt2.evals import lm_eval_model, lm_eval_tasks

            lm = lm_eval_model.GPTLM(self.raw_model, self.tokenizer, batch_size=self.batch_size, device=self.device,
                               autocast=self.autocast)
            results = lm_eval_tasks.evaluate(lm, self.lm_eval_tasks, self.cfg.eval.lm_eval, self.cfg.eval.lm_eval_limit)
            metrics.update(lm_eval_tasks.metrics(results))
        return metrics

    def _val_metrics(self, stop: Callable[[], bool]) -> dict[str, float]:
        """val/loss, val/perplexity, val/tokens; for a mixture also val/NAME/loss and val/NAME/tokens of each
        source, and val/loss the weighted mean of the sources' losses (the loss under the mixture's weights)."""
        scores = [(split, val_loss(self.model, split.tokens, windows, batch_size=self.batch_size,
                                   device=self.device, autocast=self.autocast, should_stop=stop))
                  for split, windows in zip(self.val_splits, self.val_windows)]
        loss = sum(split.weight * val.loss for split, val in scores)
        metrics = {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0)),
                   "val/tokens": float(sum(val.n_tokens for _, val in scores))}
        for split, val in scores:
            if split.name:
                metrics.update({f"val/{split.name}/loss": val.loss, f"val/{split.name}/tokens": float(val.n_tokens)})
        return metrics

    @torch.no_grad()
    def sample(self) -> str | None:
        """Text from the fixed prompt (same seed every time, global RNG untouched); None when not asked for."""
        cfg = self.cfg
        if not cfg.eval.sample_prompt or cfg.eval.sample_tokens == 0 or self.tokenizer is None:
            return None
        ids = self.tokenizer.encode(cfg.eval.sample_prompt)
        room = self.raw_model.cfg.n_positions - cfg.eval.sample_tokens
        idx = torch.tensor([ids[-room:]], dtype=torch.long, device=self.device)  # (1, T)
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.raw_model.eval()
        with self.autocast():
            out = generate(self.raw_model, idx, cfg.eval.sample_tokens, temperature=cfg.eval.sample_temperature,
                           top_k=cfg.eval.sample_top_k, generator=generator)
        self.raw_model.train()
        return self.tokenizer.decode(out[0].tolist())
