"""One way to start a run: `build_run(cfg, dist, output_dir)` assembles everything a training run needs from a
validated `TrainConfig` and this process's place in the job (`dist`), in a fixed order: the checkpoint to
resume and the checks that need no tokenizer, the tokenizer and the prepared corpus, the run plan, the data
loaders, the model (seeded; wrapped for DDP/FSDP, compiled), the optimizer, the evaluations, the training
state, the checkpoint manager (the resumed checkpoint loaded into it) and the metrics logger. Training
(gpt2.train.launch.train), the benchmarks and the tests build their runs with it and hand the `Run` to a
`Trainer`; the dry run (gpt2.train.dry_run) takes the same plan path without preparing anything."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from gpt2.checkpoint.manager import CheckpointManager
from gpt2.config import MIX, ModelConfig, TrainConfig
from gpt2.data.loader import TokenLoader
from gpt2.data.mixture import MixtureLoader, PreparedMixture, prepare_mixture
from gpt2.data.preprocess import PreparedData, prepare_on_ranks
from gpt2.errors import Interrupted, UserError
from gpt2.evals import hellaswag
from gpt2.model.gpt import GPT
from gpt2.runtime.device import grad_scaler
from gpt2.runtime.distributed import DistInfo, main_rank_first, unwrap_model, wrap_model
from gpt2.tokenizers.factory import GPT2_RECORD, AnyTokenizer, check_same, describe
from gpt2.tokenizers.factory import files as tokenizer_files
from gpt2.train.autobatch import resolve_micro_batch_size
from gpt2.train.evaluation import Evaluator, ValSplit
from gpt2.train.metrics import RunLogger
from gpt2.train.optim import build_optimizer
from gpt2.train.plan import RunPlan, Vocabulary, planned_architecture, resolve_plan
from gpt2.train.preemption import TrainingInterrupted
from gpt2.train.resume import checkpoint_to_resume
from gpt2.train.rng import RNGState, seed_everything
from gpt2.train.state import TrainState
from gpt2.utils.serialize import to_dict

log = logging.getLogger("gpt2")


@dataclass(frozen=True)
class RunData:
    """What a run trains and evaluates on."""

    train: TokenLoader | MixtureLoader
    """The training batches (the plan's micro-batch per rank)."""
    val: list[ValSplit]
    """The val splits every evaluation scores (a mixture's: one per source)."""
    vocab: Vocabulary
    """The vocabulary of the token ids."""
    tokenizer: AnyTokenizer | None = None
    """The tokenizer the ids belong to; None for batches without text (benchmarks): then no sample is drawn."""


@dataclass(frozen=True)
class Run:
    """A run ready to train: read-only parts, except the model, optimizer and `state` the Trainer advances."""

    cfg: TrainConfig
    """The validated config (read only: derived values are the plan's)."""
    plan: RunPlan
    """Everything derived at start-up; after it, derived values are read from here only."""
    dist: DistInfo
    """Where this process sits in the job."""
    output_dir: Path
    """The run dir: checkpoints/, metrics.jsonl, loss.png."""
    data: RunData
    """The batches and val splits, and the tokenizer."""
    model: nn.Module
    """The model as trained (possibly DDP/FSDP-wrapped and compiled)."""
    optimizer: torch.optim.Optimizer
    """Built over the model as trained (its state restored when resuming)."""
    state: TrainState
    """What training has done (restored from the checkpoint when resuming)."""
    evaluator: Evaluator
    """The evaluations and their cadences."""
    checkpoints: CheckpointManager
    """Saves and retention; it saves the model, optimizer, `state` and this rank's RNG streams."""
    logger: RunLogger | None
    """Rank 0's metrics logger (None on the other ranks, or when not asked for)."""
    should_stop: Callable[[], bool]
    """This process's preemption flag (the Trainer combines it over the ranks)."""


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


def build_data(cfg: TrainConfig, plan: RunPlan, dist: DistInfo, prepared: PreparedData | PreparedMixture) -> RunData:
    """The train loader over the prepared corpus (or the mixture's sources) with the plan's micro-batch, and the
    val splits each evaluation scores (a mixture's: one per source)."""
    common = dict(rank=dist.rank, world_size=dist.world_size, seed=cfg.seed)
    batch = int(plan.micro_batch_size or 1)
    tokenizer = prepared.tokenizer
    vocab = Vocabulary(tokenizer.n_vocab, tokenizer.id)
    if isinstance(prepared, PreparedMixture):
        parts = prepared.parts
        loader: TokenLoader | MixtureLoader = MixtureLoader(
            [p.prepared.stream("train") for p in parts], [p.weight for p in parts], [p.name for p in parts], batch,
            cfg.block_size, **common)
        return RunData(loader, [ValSplit(p.name, p.weight, p.prepared.stream("val")) for p in parts], vocab,
                       tokenizer)
    loader = TokenLoader(prepared.stream("train"), batch, cfg.block_size, **common)
    return RunData(loader, [ValSplit("", 1.0, prepared.stream("val"))], vocab, tokenizer)


def build_hellaswag(cfg: TrainConfig, tokenizer: AnyTokenizer | None,
                    model_positions: int) -> list[hellaswag.Rendered] | None:
    """HellaSwag items rendered once for evaluation during training (None when eval.hellaswag_interval is 0);
    rank 0 downloads the file first when it is not cached."""
    if cfg.eval.hellaswag_interval == 0:
        return None
    if tokenizer is None:
        raise UserError("eval.hellaswag_interval > 0 needs the run's tokenizer (a run built from token batches "
                        "alone has none); set eval.hellaswag_interval=0.")
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


def probe_micro_batch(cfg: TrainConfig, dist: DistInfo) -> Callable[[ModelConfig], int]:
    """micro_batch_size=auto for `resolve_plan`: the largest size that trains in this GPU's memory, probed on a
    throwaway randomly initialised copy of the planned model."""
    return lambda model_cfg: resolve_micro_batch_size(cfg, lambda: GPT(model_cfg), dist.device, dist.world_size)


def build_run(cfg: TrainConfig, dist: DistInfo, output_dir: str | Path, *,
              should_stop: Callable[[], bool] | None = None,
              choose_micro_batch: Callable[[ModelConfig], int] | None = None,
              data: RunData | None = None, model: nn.Module | None = None, log_metrics: bool = True) -> Run:
    """The run `cfg` describes, on this process (`dist`), writing to `output_dir`: resume= found and checked,
    the corpus prepared (interrupted by `should_stop`, a preemption flag), the plan resolved (micro_batch_size=
    auto by `choose_micro_batch`, default: probing this GPU), the model built after seeding, and a resumed
    checkpoint loaded into the model, optimizer, training state and RNG streams.

    `data` (ready batches: nothing is prepared) and `model` (a bare GPT with given weights; the plan trains its
    architecture) replace what the config would build, for benchmarks and tests. `log_metrics` gives rank 0 a
    RunLogger (metrics.jsonl, W&B) whose `finish` is the caller's."""
    output_dir = Path(output_dir)
    stop = should_stop or (lambda: False)
    resume = checkpoint_to_resume(cfg.resume, output_dir)
    architecture = planned_architecture(cfg, dist, resume)  # its checks fail before hours of preparation
    prepared: PreparedData | PreparedMixture | None = None
    if data is None:
        prepared = prepare(cfg, stop)
        tokenizer: AnyTokenizer | None = prepared.tokenizer
        vocab = Vocabulary(prepared.tokenizer.n_vocab, prepared.tokenizer.id)
    else:
        tokenizer, vocab = data.tokenizer, data.vocab
    if resume is not None and tokenizer is not None:
        check_same(tokenizer, resume.tokenizer_record, resume.path)
    plan = resolve_plan(cfg, dist, architecture, vocab, resume, choose_micro_batch or probe_micro_batch(cfg, dist))
    if model is not None:
        plan = replace(plan, model=unwrap_model(model).cfg)
    if prepared is not None:
        data = build_data(cfg, plan, dist, prepared)
    seed_everything(cfg.seed)  # after data prep (which may import rich, drawing from `random`): same init and
    # RNG states on every rank and in every run, whether or not it had to tokenize the corpus
    bare = model if model is not None else build_model(cfg, plan.model, resuming=resume is not None)
    trained = wrap_model(bare.to(dist.device), cfg.distributed, dist)
    if cfg.compile:
        trained = torch.compile(trained)
    optimizer = build_optimizer(trained, cfg.optimizer, dist.device.type)
    hellaswag_items = build_hellaswag(cfg, tokenizer, plan.model.n_positions)
    state = TrainState(grad_scaler(dist.device, plan.precision), data.train)
    evaluator = Evaluator(cfg, plan, trained, data.val, device=dist.device, tokenizer=tokenizer,
                          hellaswag_items=hellaswag_items)
    record = {"config": to_dict(cfg), "plan": to_dict(plan),
              "tokenizer": describe(tokenizer) if tokenizer is not None else dict(GPT2_RECORD)}
    checkpoints = CheckpointManager(
        output_dir, cfg.checkpoint, max_steps=plan.max_steps, model=trained, optimizer=optimizer, trainer=state,
        rng=RNGState(), record=record, files=tokenizer_files(tokenizer) if tokenizer is not None else {},
        val_loss=lambda: state.last_val_loss, sharded=cfg.distributed.name == "fsdp" and dist.enabled)
    if resume is not None:
        checkpoints.load(resume)
        log.info("resumed from %s at step %d", resume.path, state.step)
    logger = None
    if log_metrics and dist.is_main:
        logger = RunLogger(output_dir, cfg, wandb_run_id=state.wandb_run_id,
                           resumed_at=state.step if resume is not None else None)
        state.wandb_run_id = logger.wandb_run_id
    return Run(cfg=cfg, plan=plan, dist=dist, output_dir=output_dir, data=data, model=trained, optimizer=optimizer,
               state=state, evaluator=evaluator, checkpoints=checkpoints, logger=logger, should_stop=stop)
