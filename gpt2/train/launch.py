"""`train(cfg, output_dir)`: the start-up of this process (SLURM environment, process group and device,
preemption signals, process-wide settings, the clean-up of interrupted saves), then the run that
gpt2.train.assembly.build_run assembles from a validated `TrainConfig`, trained by a `Trainer`."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

from gpt2.checkpoint.handle import find_checkpoint
from gpt2.checkpoint.store import remove_interrupted
from gpt2.config import TrainConfig
from gpt2.runtime.determinism import set_deterministic
from gpt2.runtime.device import set_tf32
from gpt2.runtime.distributed import cleanup, init_distributed
from gpt2.runtime.slurm import init_slurm_env
from gpt2.train.assembly import Run, build_run
from gpt2.train.preemption import PreemptionHandler
from gpt2.train.progress import run_summary
from gpt2.train.trainer import Trainer

log = logging.getLogger("gpt2")


def train(cfg: TrainConfig, output_dir: str | Path) -> float:
    """Start this process, build the run, train, and return the final validation loss."""
    started = time.monotonic()
    output_dir = Path(output_dir)
    init_slurm_env()
    dist = init_distributed(cfg.distributed, cfg.device)
    preemption = PreemptionHandler()
    preemption.install()
    run: Run | None = None
    trainer: Trainer | None = None
    try:
        set_tf32(dist.device, cfg.precision.tf32)
        set_deterministic(cfg.deterministic)
        if dist.is_main:  # before this process saves anything: what interrupted saves left behind can go
            remove_interrupted(output_dir)
        run = build_run(cfg, dist, output_dir, should_stop=lambda: preemption.requested)
        trainer = Trainer(run)
        if run.logger is not None:
            log.info("%s; run dir %s", run.plan.describe(trainer.raw_model.num_params()), output_dir)
        val_loss = trainer.fit()
        if run.logger is not None:
            run.logger.finish()  # writes loss.png
            plot = output_dir / "loss.png"
            latest = find_checkpoint(output_dir, required=False)
            log.info(run_summary(run.state.step, run.state.tokens_seen, time.monotonic() - started, val_loss,
                                 latest.path if latest else None, plot if plot.exists() else None))
        return val_loss
    finally:
        if run is not None and run.logger is not None:
            run.logger.finish()
        preemption.uninstall()
        # Free the DDP/FSDP model (and its pending gloo/nccl work) while the interpreter is fully
        # alive: collected during interpreter shutdown instead, it can abort the process (SIGABRT).
        run = trainer = None
        gc.collect()
        cleanup()
