"""Train a GPT-2 model: `python run_train.py [overrides]` (see docs/training.md and gpt2/conf/train.yaml).

A thin Hydra entry point: it converts the composed config to a typed `TrainConfig`, validates it, and calls
`gpt2.train.launch.train` (or prints the dry run). The Hydra glue it uses lives in gpt2.cli.
"""

from __future__ import annotations

import logging
import math
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gpt2 import config as C
from gpt2.cli import (
    check_command_line,
    compose_experiments,
    fail,
    log_failure,
    quiet_non_zero_ranks,
    register_configs,
    remove_unused_run_dir,
    reported_errors,
    run_main,
)
from gpt2.errors import UserError
from gpt2.runtime.world import is_main, rank_and_world

register_configs()


@hydra.main(version_base="1.3", config_path="gpt2/conf", config_name="train")
def main(dcfg: DictConfig) -> float:
    try:
        return _main(dcfg)
    except BaseException as err:
        log_failure(err)  # train.log says why the run stopped
        remove_unused_run_dir(HydraConfig.get().runtime.output_dir)  # failed before training: no empty run dir
        raise


def _main(dcfg: DictConfig) -> float:
    with reported_errors():
        cfg: C.TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        C.validate(cfg, world_size=rank_and_world()[1])
    output_dir = HydraConfig.get().runtime.output_dir
    if cfg.dry_run:
        from gpt2.train.dry_run import BUDGET_REFERENCES, dry_run

        try:
            print(dry_run(cfg, output_dir, references=compose_experiments(BUDGET_REFERENCES)))
        except UserError as err:
            fail(str(err))
        remove_unused_run_dir(output_dir)  # a dry run leaves no run directory behind
        return math.nan
    from gpt2.train.launch import train
    from gpt2.train.preemption import TrainingInterrupted

    try:
        val_loss = train(cfg, output_dir)
    except TrainingInterrupted as stop:
        from gpt2.runtime.slurm import requeue_submitit_job

        try:  # in a submitit SLURM job rank 0 requeues it (same job dir; resume=auto continues)
            requeue_submitit_job()
        except UserError as err:  # out of retries
            fail(f"{stop}; {err}")
        sys.exit(stop.exit_code)  # no result for submitit: the requeued job (or SLURM's own requeue) reports
    except UserError as err:
        fail(str(err))
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and is_main():  # what each sweep job returned
        logging.getLogger("gpt2").info("job #%s returned final val loss %.6f (%s)", hc.job.num, val_loss,
                                       " ".join(hc.overrides.task))
    return val_loss


if __name__ == "__main__":
    check_command_line(C.TrainConfig)
    quiet_non_zero_ranks()
    run_main(main)
