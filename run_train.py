"""Train a GPT-2 model: `python run_train.py [overrides]` (see README and conf/train.yaml).

This file is the only place (with run_generate.py) that imports Hydra. It registers
the dataclass schemas, agrees on one run directory across torchrun ranks, converts the
composed config to a typed `TrainConfig`, validates it, and calls `gpt2.train.train.train`.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import secrets
import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from gpt2 import config as C
from gpt2.cli import check_command_line, fail, remove_unused_run_dir, run_main

STAMP_ENV = "GPT2_RUN_STAMP"


def register_configs() -> None:
    """Register the dataclass schemas as `base_<group>` (and the root as `base_train`)."""
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=C.TrainConfig)
    cs.store(name="base_generate", node=C.GenerateConfig)
    cs.store(name="base_eval", node=C.EvalRunConfig)
    for group, node in (
        ("model", C.ModelConfig),
        ("optimizer", C.OptimizerConfig),
        ("scheduler", C.SchedulerConfig),
        ("precision", C.PrecisionConfig),
        ("distributed", C.DistributedConfig),
        ("data", C.DataConfig),
        ("tokenizer", C.TokenizerConfig),
        ("logger", C.LoggerConfig),
    ):
        cs.store(group=group, name=f"base_{group}", node=node)
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)


def _new_stamp() -> str:
    """`YYYY-MM-DD/HH-MM-SS-xxxxxx`: date folder, time, and a random suffix so that
    two runs started in the same second never share a directory."""
    now = datetime.datetime.now()
    return f"{now:%Y-%m-%d}/{now:%H-%M-%S}-{secrets.token_hex(3)}"


def run_stamp() -> str:
    """The run-directory stamp, identical on every rank of one torchrun launch.

    Rank 0 draws it and publishes it through torchrun's rendezvous store (the TCPStore at
    MASTER_ADDR:MASTER_PORT that the agent shares with its workers); the other ranks wait
    for it there, so ranks that start seconds apart still agree. Outside torchrun (or when
    the stamp was already set, e.g. by a SLURM submission) it is drawn locally.
    """
    if STAMP_ENV in os.environ:
        return os.environ[STAMP_ENV]
    stamp = _new_stamp()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        from torch.distributed import TCPStore

        store = TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=datetime.timedelta(seconds=300),
        )
        attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        key = f"gpt2/run_stamp/{attempt}"
        if int(os.environ["RANK"]) == 0:
            store.set(key, stamp)
        stamp = store.get(key).decode()
    os.environ[STAMP_ENV] = stamp
    return stamp


def _quiet_non_zero_ranks() -> None:
    """Only rank 0 writes `.hydra/` and train.log into the shared run dir."""
    if int(os.environ.get("RANK", "0")) != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(dcfg: DictConfig) -> float:
    try:
        return _main(dcfg)
    except BaseException:
        remove_unused_run_dir(HydraConfig.get().runtime.output_dir)  # failed before training: no empty run dir
        raise


def _main(dcfg: DictConfig) -> float:
    from gpt2.train.train import train
    from gpt2.train.trainer import TrainingInterrupted

    try:
        cfg: C.TrainConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
        C.validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except MissingMandatoryValue as err:
        fail(f"{err.full_key} has no value; set it on the command line, e.g. {err.full_key}=...")
    except (C.UserError, ValueError, OmegaConfBaseException) as err:
        fail(str(err))
    output_dir = HydraConfig.get().runtime.output_dir
    if cfg.dry_run:
        from gpt2.train.plan import dry_run

        try:
            print(dry_run(cfg, output_dir))
        except C.UserError as err:
            fail(str(err))
        remove_unused_run_dir(output_dir)  # a dry run leaves no run directory behind
        return math.nan
    try:
        val_loss = train(cfg, output_dir)
    except TrainingInterrupted as stop:
        from gpt2.runtime.slurm import requeue_submitit_job

        try:  # in a submitit SLURM job rank 0 requeues it (same job dir; resume=auto continues)
            requeue_submitit_job()
        except C.UserError as err:  # out of retries
            fail(f"{stop}; {err}")
        sys.exit(stop.exit_code)  # no result for submitit: the requeued job (or SLURM's own requeue) reports
    except C.UserError as err:
        fail(str(err))
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN and os.environ.get("RANK", "0") == "0":  # what each sweep job returned
        logging.getLogger("gpt2").info("job #%s returned final val loss %.6f (%s)", hc.job.num, val_loss,
                                       " ".join(hc.overrides.task))
    return val_loss


if __name__ == "__main__":
    check_command_line(C.TrainConfig)
    _quiet_non_zero_ranks()
    run_main(main)
