"""`train(cfg, output_dir)`: resolve the run plan, then build the data, model, optimizer and logger from a
validated `TrainConfig` and run a `Trainer`."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gpt2.checkpoint.handle import Checkpoint
from gpt2.checkpoint.manager import CheckpointManager
from gpt2.checkpoint.store import find_latest
from gpt2.config import MIX, ModelConfig, TrainConfig
from gpt2.data.loader import TokenLoader
from gpt2.data.mixture import MixtureLoader, PreparedMixture, prepare_mixture
from gpt2.data.prepare import PreparedData, prepare_on_ranks
from gpt2.errors import Interrupted, UserError
from gpt2.evals import hellaswag
from gpt2.model.gpt import GPT
from gpt2.runtime.determinism import set_deterministic
from gpt2.runtime.device import set_tf32
from gpt2.runtime.distributed import DistInfo, cleanup, init_distributed, main_rank_first, unwrap_model, wrap_model
from gpt2.runtime.slurm import init_slurm_env
from gpt2.tokenizers.factory import AnyTokenizer, check_same
from gpt2.train.autobatch import resolve_micro_batch_size
from gpt2.train.evaluation import ValSplit
from gpt2.train.metrics import RunLogger
from gpt2.train.optim import build_optimizer
from gpt2.train.plan import RunPlan, resolve_plan
from gpt2.train.preemption import PreemptionHandler
from gpt2.train.progress import run_summary
from gpt2.train.rng import seed_everything
from gpt2.train.trainer import Trainer, TrainingInterrupted

log = logging.getLogger("gpt2")


def prepare(cfg: TrainConfig, should_stop: Callable[[], bool] | None = None) -> PreparedData | PreparedMixture:
    """Train the tokenizer if needed and prepare the corpus (each source of a mixture) on rank 0; the others
    wait, then hit the caches. `should_stop` (a preemption flag) interrupts a long preparation:
    TrainingInterrupted."""
    try:
        if cfg.data.name == MIX:
            return prepare_mixture(cfg.data, cfg.tokenizer, should_stop)
        return prepare_on_ranks(cfg.data, cfg.tokenizer, should_stop)
    except Interrupted as e:
        log.warning("%s", e)
        raise TrainingInterrupted(str(e)) from None


def build_data(cfg: TrainConfig, plan: RunPlan, ranks: DistInfo, prepared: PreparedData | PreparedMixture
               ) -> tuple[TokenLoader | MixtureLoader, list[ValSplit]]:
    """The train loader over the prepared corpus (or the mixture's sources) with the plan's micro-batch, and the
    val splits each evaluation scores (a mixture's: one per source)."""
    common = dict(rank=ranks.rank, world_size=ranks.world_size, seed=cfg.seed)
    batch = int(plan.micro_batch_size or 1)
    if isinstance(prepared, PreparedMixture):
        parts = prepared.parts
        loader: TokenLoader | MixtureLoader = MixtureLoader(
            [p.prepared.stream("train") for p in parts], [p.weight for p in parts], [p.name for p in parts], batch,
            cfg.block_size, **common)
        return loader, [ValSplit(p.name, p.weight, p.prepared.stream("val")) for p in parts]
    loader = TokenLoader(prepared.stream("train"), batch, cfg.block_size, **common)
    return loader, [ValSplit("", 1.0, prepared.stream("val"))]


def build_hellaswag(cfg: TrainConfig, tokenizer: AnyTokenizer, model_positions: int) -> list[hellaswag.Rendered] | None:
    """HellaSwag items rendered once for evaluation during training (None when eval.hellaswag_interval is 0);
    rank 0 downloads the file first when it is not cached."""
    if cfg.eval.hellaswag_interval == 0:
        return None
    path = main_rank_first(lambda: hellaswag.resolve_path(cfg.eval.hellaswag.path, cfg.data.cache_dir),
                           "download HellaSwag")
    items = hellaswag.load_items(path, cfg.eval.hellaswag_limit)
    return hellaswag.render(items, tokenizer.encode_batch, model_positions)


def build_model(cfg: TrainConfig, model_cfg: ModelConfig, resuming: bool) -> nn.Module:
    """Random GPT-2 init of `model_cfg` (the plan's), or Hugging Face weights when `init.pretrained` is set and
    no checkpoint is being resumed (a checkpoint always wins)."""
    if cfg.init.pretrained and not resuming:
        from gpt2.model.hf import load_pretrained

        model = load_pretrained(cfg.init.pretrained, dropout=model_cfg.dropout,
                                pad_vocab_multiple=model_cfg.pad_vocab_multiple)
        if model.cfg != model_cfg:
            raise UserError(f"init.pretrained={cfg.init.pretrained} holds a {model.cfg.name} model, not the planned "
                            f"{model_cfg.name}; its config.json changed while the run started. Rerun.")
        if (model.cfg.n_embd, model.cfg.n_layer) != (cfg.model.n_embd, cfg.model.n_layer):
            log.warning("init.pretrained=%s defines the architecture (n_layer=%d, n_embd=%d); model=%s ignored",
                        cfg.init.pretrained, model.cfg.n_layer, model.cfg.n_embd, cfg.model.name)
        return model
    if cfg.init.pretrained:
        log.info("resuming from a checkpoint: init.pretrained=%s is not loaded", cfg.init.pretrained)
    return GPT(model_cfg)


def choose_micro_batch(cfg: TrainConfig, ranks: DistInfo) -> Callable[[ModelConfig], int]:
    """micro_batch_size=auto for `resolve_plan`: the largest size that trains in this GPU's memory, probed on a
    throwaway randomly initialised copy of the planned model."""
    return lambda model_cfg: resolve_micro_batch_size(cfg, lambda: GPT(model_cfg), ranks.device, ranks.world_size)


def train(cfg: TrainConfig, output_dir: str | Path) -> float:
    """Build everything from `cfg`, train, and return the final validation loss."""
    started = time.monotonic()
    output_dir = Path(output_dir)
    init_slurm_env()
    ranks = init_distributed(cfg.distributed, cfg.device)
    preemption = PreemptionHandler()
    preemption.install()
    logger: RunLogger | None = None
    trainer = model = optimizer = None
    try:
        set_tf32(ranks.device, cfg.precision.tf32)
        set_deterministic(cfg.deterministic)
        resume: Checkpoint | None = CheckpointManager.find_resume(cfg.resume, output_dir)
        prepared: list[PreparedData] = []

        def vocab() -> tuple[int, str]:  # after the resume checks: preparing the corpus can take hours
            prepared.append(prepare(cfg, lambda: preemption.requested))
            tok = prepared[0].tokenizer
            if resume is not None:
                check_same(tok, resume.tokenizer_record, resume.path)
            return tok.n_vocab, tok.id

        plan = resolve_plan(cfg, ranks, vocab, resume, choose_micro_batch(cfg, ranks))
        tokenizer = prepared[0].tokenizer
        train_loader, val_splits = build_data(cfg, plan, ranks, prepared[0])
        seed_everything(cfg.seed)  # after data prep (which may import rich, drawing from `random`): same init and
        # RNG states on every rank and in every run, whether or not it had to tokenize the corpus
        model = build_model(cfg, plan.model, resuming=resume is not None).to(ranks.device)
        model = wrap_model(model, cfg.distributed, ranks)
        if cfg.compile:
            model = torch.compile(model)
        optimizer = build_optimizer(model, cfg.optimizer, ranks.device.type)
        hellaswag_items = build_hellaswag(cfg, tokenizer, unwrap_model(model).cfg.n_positions)
        trainer = Trainer(cfg, plan, model, optimizer, train_loader, val_splits, ranks, output_dir, tokenizer,
                          preemption, hellaswag_items=hellaswag_items)
        if resume is not None:
            trainer.load_checkpoint(resume)
        if ranks.is_main:
            logger = RunLogger(output_dir, cfg, wandb_run_id=trainer.wandb_run_id)
            trainer.logger = logger
            trainer.wandb_run_id = logger.wandb_run_id
            log.info("%s; run dir %s", plan.describe(trainer.raw_model.num_params()), output_dir)
        val_loss = trainer.fit()
        if logger is not None:
            logger.finish()  # writes loss.png
            plot = output_dir / "loss.png"
            log.info(run_summary(trainer.step, trainer.tokens_seen, time.monotonic() - started, val_loss,
                                 find_latest(output_dir), plot if plot.exists() else None))
        return val_loss
    finally:
        if logger is not None:
            logger.finish()
        preemption.uninstall()
        # Free the DDP/FSDP model (and its pending gloo/nccl work) while the interpreter is fully
        # alive: collected during interpreter shutdown instead, it can abort the process (SIGABRT).
        trainer = model = optimizer = None
        gc.collect()
        cleanup()
