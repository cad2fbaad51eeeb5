"""Shared test helpers: compose the real Hydra config, run the real entry points."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gpt2.cli import register_configs
from gpt2.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

register_configs()


def compose_train(overrides: list[str]) -> TrainConfig:
    """conf/train.yaml with `overrides`, converted to the typed TrainConfig (as run_train does)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        dcfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_object(dcfg)  # type: ignore[return-value]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    env.pop("GPT2_RUN_STAMP", None)
    return env


@dataclass
class RunResult:
    proc: subprocess.CompletedProcess
    run_dir: Path


def _run_dir_from(output: str, cwd: Path) -> Path:
    match = re.search(r"run dir (\S+)", output)
    if match:
        return (cwd / match.group(1)).resolve()
    dirs = sorted((cwd / "outputs").glob("*/*"))
    if len(dirs) != 1:
        raise AssertionError(f"cannot find the run dir in {cwd}:\n{output}")
    return dirs[0].resolve()


def run_train_cli(overrides: list[str], cwd: Path, timeout: float = 300, check: bool = True) -> RunResult:
    """`python run_train.py overrides...` in `cwd` (so outputs/ lands there)."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(REPO / "run_train.py"), *overrides], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"run_train.py failed ({proc.returncode}):\n{output}")
    return RunResult(proc, _run_dir_from(output, cwd) if proc.returncode == 0 else cwd)


def run_torchrun(overrides: list[str], cwd: Path, nproc: int = 2, delay_rank1_s: float = 0.0,
                 timeout: float = 300, script: str = "delayed_start.py",
                 env: dict[str, str] | None = None) -> RunResult:
    """`torchrun --standalone --nproc_per_node=N run_train.py ...`; optionally rank 1 starts late."""
    cwd.mkdir(parents=True, exist_ok=True)
    torchrun = Path(sys.executable).with_name("torchrun")
    path = REPO / "tests" / "workers" / script
    env = subprocess_env(GPT2_TEST_DELAY_RANK1=str(delay_rank1_s), **(env or {}))
    t0 = time.time()
    proc = subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={nproc}", str(path), *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}) after {time.time() - t0:.0f}s:\n{output}")
    return RunResult(proc, _run_dir_from(output, cwd))


# ------------------------------------------------------------------ checkpoints of toy models


class DictState:
    """A Stateful holding a plain dict (the trainer or rank state of a toy checkpoint)."""

    def __init__(self, state: dict | None = None) -> None:
        self.state = dict(state or {})

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


def save_toy_checkpoint(root: Path, step: int, model, optimizer, *, trainer_state: dict | None = None,
                        rank_state: dict | None = None, record: dict | None = None, val_loss: float | None = None,
                        keep_last: int = 10, keep_best: bool = True, sharded: bool = False,
                        files: dict | None = None) -> Path:
    """Checkpoint `step` of a toy model written by a real CheckpointManager (every step due), with retention."""
    from gpt2.checkpoint.manager import CheckpointManager
    from gpt2.config import CheckpointConfig

    mgr = CheckpointManager(root, CheckpointConfig(interval=1, keep_last=keep_last, keep_best=keep_best),
                            max_steps=10**9, model=model, optimizer=optimizer,
                            trainer=DictState(trainer_state if trainer_state is not None else {"step": step}),
                            rank=DictState(rank_state or {}), record=record or {"config": {}},
                            files=files, val_loss=lambda: val_loss, sharded=sharded)
    path = mgr.save(step)
    assert path is not None
    return path


def load_toy_checkpoint(where: Path, model, optimizer=None, *, sharded: bool = False):
    """`load_checkpoint` of the newest checkpoint at `where` (run dir, checkpoints/ or step dir)."""
    from gpt2.checkpoint.handle import Checkpoint
    from gpt2.checkpoint.io import load_checkpoint

    ckpt = Checkpoint.open(where)
    return load_checkpoint(ckpt.path, ckpt.meta, model=model, optimizer=optimizer, sharded=sharded)


# ------------------------------------------------------------------ trainers built as train() builds them


def cpu_ranks():
    import torch

    from gpt2.runtime.distributed import DistInfo

    return DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_trainer(cfg: TrainConfig, output_dir: Path, model=None, loaders=None):
    """A Trainer on one CPU rank built as gpt2.train.train.train builds it: the corpus prepared, the run plan
    resolved, the optimizer built; `model` (else a fresh GPT of the plan, seeded) and `loaders` may be given."""
    import dataclasses

    import torch

    from gpt2.model.gpt import GPT
    from gpt2.train.optim import build_optimizer
    from gpt2.train.plan import resolve_plan
    from gpt2.train.train import build_data, prepare
    from gpt2.train.trainer import Trainer

    ranks = cpu_ranks()
    prepared = prepare(cfg) if loaders is None else None
    vocab = (prepared.tokenizer.n_vocab, prepared.tokenizer.id) if prepared else (model.cfg.vocab_size, "test")
    plan = resolve_plan(cfg, ranks, lambda: vocab, None, None)
    if model is None:
        torch.manual_seed(cfg.seed)
        model = GPT(plan.model)
    plan = dataclasses.replace(plan, model=model.cfg)
    if loaders is None:
        loaders = build_data(cfg, plan, ranks, prepared)
    return Trainer(cfg, plan, model, build_optimizer(model, cfg.optimizer, "cpu"), *loaders, ranks, output_dir,
                   tokenizer=prepared.tokenizer if prepared else None)


def save_model_checkpoint(root: Path, step: int, model, keep_last: int = 2) -> Path:
    """A checkpoint of a GPT as training writes it (config, plan.model and the GPT-2 tokenizer recorded)."""
    import torch

    from gpt2.tokenizers.factory import GPT2_RECORD
    from gpt2.utils.serialize import to_dict

    record = {"config": to_dict(TrainConfig(model=model.cfg)), "plan": {"model": to_dict(model.cfg)},
              "tokenizer": dict(GPT2_RECORD)}
    return save_toy_checkpoint(root, step, model, torch.optim.SGD(model.parameters(), lr=0.1),
                               trainer_state={"step": step}, record=record, keep_last=keep_last, keep_best=False)
