"""`train(cfg, output_dir)`: build the run plan, data, model, optimizer and logger from a validated
`TrainConfig` and run a `Trainer`."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from gpt2.checkpoint.format import find_latest, read_meta
from gpt2.checkpoint.io import CheckpointManager
from gpt2.config import ModelConfig, TrainConfig, UserError
from gpt2.data.loader import TokenLoader, prepare_on_main_rank
from gpt2.data.prepare import PreparationInterrupted, PreparedData
from gpt2.evals import hellaswag
from gpt2.model.gpt import GPT
from gpt2.runtime.device import resolve_precision, set_tf32
from gpt2.runtime.distributed import DistInfo, barrier, cleanup, init_distributed, unwrap_model, wrap_model
from gpt2.tokenizers.bpe import AnyTokenizer, check_same
from gpt2.train.autobatch import resolve_micro_batch_size
from gpt2.train.metrics import RunLogger, run_summary
from gpt2.train.optim import build_optimizer
from gpt2.train.plan import make_plan, resume_model, with_vocab
from gpt2.train.preemption import PreemptionHandler
from gpt2.train.rng import seed_everything
from gpt2.train.trainer import Trainer, TrainingInterrupted

log = logging.getLogger("gpt2")


def prepare(cfg: TrainConfig, ranks: DistInfo, should_stop: Callable[[], bool] | None = None) -> PreparedData:
    """Train the tokenizer if needed and prepare the corpus on rank 0 (the others wait, then hit the caches).
    `should_stop` (a preemption flag) interrupts a long preparation: TrainingInterrupted."""
    try:
        return prepare_on_main_rank(cfg.data, ranks.is_main, should_stop, cfg.tokenizer)
    except PreparationInterrupted as e:
        log.warning("%s", e)
        raise TrainingInterrupted(str(e)) from None


def build_data(cfg: TrainConfig, ranks: DistInfo, should_stop: Callable[[], bool] | None = None,
               prepared: PreparedData | None = None) -> tuple[TokenLoader, TokenLoader]:
    """Train and val loaders over the prepared corpus (prepared now unless given)."""
    if prepared is None:
        prepared = prepare(cfg, ranks, should_stop)
    common = dict(rank=ranks.rank, world_size=ranks.world_size)
    train_loader = TokenLoader(prepared.stream("train"), cfg.micro_batch_size, cfg.block_size, seed=cfg.seed,
                               **common)
    val_loader = TokenLoader(prepared.stream("val"), cfg.micro_batch_size, cfg.block_size, seed=cfg.seed,
                             shuffle=False, **common)
    return train_loader, val_loader


def build_hellaswag(cfg: TrainConfig, ranks: DistInfo, tokenizer: AnyTokenizer,
                    model_positions: int) -> list[hellaswag.Rendered] | None:
    """HellaSwag items rendered once for evaluation during training (None when eval.hellaswag_interval
    is 0); rank 0 downloads the file first when it is not cached."""
    if cfg.eval.hellaswag_interval == 0:
        return None
    path = None
    if ranks.is_main:
        path = hellaswag.resolve_path(cfg.eval.hellaswag.path, cfg.data.cache_dir)
    barrier()
    if path is None:
        path = hellaswag.resolve_path(cfg.eval.hellaswag.path, cfg.data.cache_dir)
    items = hellaswag.load_items(path, cfg.eval.hellaswag_limit)
    return hellaswag.render(items, tokenizer.encode_batch, model_positions)


def build_model(cfg: TrainConfig, model_cfg: ModelConfig, resuming: bool) -> nn.Module:
    """Random GPT-2 init of `model_cfg`, or Hugging Face weights when `init.pretrained` is set and no
    checkpoint is being resumed (a checkpoint always wins)."""
    if cfg.init.pretrained and not resuming:
        from gpt2.model.hf import load_pretrained

        model = load_pretrained(cfg.init.pretrained, dropout=model_cfg.dropout,
                                pad_vocab_multiple=model_cfg.pad_vocab_multiple)
        if model.cfg.vocab_size != model_cfg.vocab_size:
            raise UserError(f"init.pretrained={cfg.init.pretrained} has vocab_size={model.cfg.vocab_size} but the "
                            f"tokenizer has n_vocab={model_cfg.vocab_size}; use tokenizer=gpt2 with GPT-2 weights, "
                            f"or drop init.pretrained.")
        if model.cfg.n_embd != cfg.model.n_embd or model.cfg.n_layer != cfg.model.n_layer:
            log.warning("init.pretrained=%s defines the architecture (n_layer=%d, n_embd=%d); model=%s ignored",
                        cfg.init.pretrained, model.cfg.n_layer, model.cfg.n_embd, cfg.model.name)
        return model
    if cfg.init.pretrained:
        log.info("resuming from a checkpoint: init.pretrained=%s is not loaded", cfg.init.pretrained)
    return GPT(model_cfg)


def train(cfg: TrainConfig, output_dir: str | Path) -> float:
    """Build everything from `cfg`, train, and return the final validation loss."""
    from gpt2.runtime.slurm import init_slurm_env

    started = time.monotonic()
    output_dir = Path(output_dir)
    init_slurm_env()
    ranks = init_distributed(cfg.distributed, cfg.device)
    preemption = PreemptionHandler()
    preemption.install()
    logger: RunLogger | None = None
    try:
        set_tf32(ranks.device, cfg.precision.tf32)
        precision = resolve_precision(cfg.precision.name, ranks.device)  # refuses bf16 on a GPU without it
        resume_from = CheckpointManager.find_resume(cfg.resume, output_dir)
        meta = read_meta(resume_from) if resume_from else None
        model_cfg = resume_model(cfg, meta, resume_from) if resume_from else cfg.model
        prepared = prepare(cfg, ranks, lambda: preemption.requested)
        tokenizer = prepared.tokenizer
        if resume_from is not None:
            check_same(tokenizer, meta, resume_from)
        model_cfg = with_vocab(model_cfg, tokenizer.n_vocab, tokenizer.id)  # null follows the tokenizer
        model_cfg = model_cfg.for_device(ranks.device.type)  # pad_vocab_multiple=null: 64 on CUDA, else 1
        if cfg.micro_batch_size == "auto":  # a copy with the number: the user's config is not written to
            cfg = replace(cfg, micro_batch_size=resolve_micro_batch_size(
                cfg, lambda: build_model(cfg, model_cfg, resuming=resume_from is not None), ranks.device,
                ranks.world_size))
        train_loader, val_loader = build_data(cfg, ranks, prepared=prepared)
        seed_everything(cfg.seed)  # after data prep (which may import rich, drawing from `random`): same init and
        # RNG states on every rank and in every run, whether or not it had to tokenize the corpus
        model = build_model(cfg, model_cfg, resuming=resume_from is not None).to(ranks.device)
        plan = make_plan(cfg, str(ranks.device), precision, ranks.world_size, model.cfg, resume_from)
        model = wrap_model(model, cfg.distributed, ranks)
        if cfg.compile:
            model = torch.compile(model)
        optimizer = build_optimizer(model, cfg.optimizer, ranks.device.type)
        hellaswag_items = build_hellaswag(cfg, ranks, tokenizer, unwrap_model(model).cfg.n_positions)
        trainer = Trainer(cfg, model, optimizer, train_loader, val_loader, ranks, output_dir, tokenizer, preemption,
                          hellaswag_items=hellaswag_items, plan=plan)
        if resume_from is not None:
            trainer.load_checkpoint(resume_from)
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

