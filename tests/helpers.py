"""Shared test helpers: compose the real Hydra config, run the real entry points."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from gpt2.cli import CONF_DIR, register_configs
from gpt2.config import (
    DataConfig,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
)
from gpt2.data.corpus import PreparedData
from gpt2.model.gpt import GPT
from gpt2.train.evaluation import ValSplit
from gpt2.train.metrics import read_metrics
from gpt2.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CONF = CONF_DIR

register_configs()


def compose_train(overrides: list[str]) -> TrainConfig:
    """gpt2/conf/train.yaml with `overrides`, converted to the typed TrainConfig (as run_train does)."""
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
                            rng=DictState(rank_state or {}), record=record or {"config": {}},
                            files=files, val_loss=lambda: val_loss, sharded=sharded)
    path = mgr.save(step)
    assert path is not None
    return path


def load_toy_checkpoint(where: Path, model, optimizer=None, *, sharded: bool = False):
    """`load_checkpoint` of the newest checkpoint at `where` (run dir, checkpoints/ or step dir)."""
    from gpt2.checkpoint.handle import find_checkpoint
    from gpt2.checkpoint.io import load_checkpoint

    ckpt = find_checkpoint(where)
    return load_checkpoint(ckpt.path, ckpt.meta, model=model, optimizer=optimizer, sharded=sharded)


# ------------------------------------------------------------------ trainers built as train() builds them


def cpu_dist():
    import torch

    from gpt2.runtime.distributed import DistInfo

    return DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_trainer(cfg: TrainConfig, output_dir: Path, model=None, loaders=None) -> Trainer:
    """A Trainer on one CPU rank over the run training assembles (gpt2.train.assembly.build_run: the corpus
    prepared, the plan resolved, the model seeded, the optimizer built), without a metrics logger. `model` (a
    bare GPT whose weights and architecture the run trains) and `loaders` ((train loader, val loader): nothing
    is prepared, the val loader's split is the one scored, the vocabulary is the model's) may be given."""
    from gpt2.train.assembly import RunData, build_run
    from gpt2.train.plan import Vocabulary

    data = None
    if loaders is not None:
        data = RunData(loaders[0], [ValSplit("", 1.0, loaders[1].tokens)], Vocabulary(model.cfg.vocab_size, "test"))
    return Trainer(build_run(cfg, cpu_dist(), output_dir, data=data, model=model, log_metrics=False))


def save_model_checkpoint(root: Path, step: int, model, keep_last: int = 2) -> Path:
    """A checkpoint of a GPT as training writes it (config, plan.model and the GPT-2 tokenizer recorded)."""
    import torch

    from gpt2.tokenizers.factory import GPT2_RECORD
    from gpt2.utils.serialize import to_dict

    record = {"config": to_dict(TrainConfig(model=model.cfg)), "plan": {"model": to_dict(model.cfg)},
              "tokenizer": dict(GPT2_RECORD)}
    return save_toy_checkpoint(root, step, model, torch.optim.SGD(model.parameters(), lr=0.1),
                               trainer_state={"step": step}, record=record, keep_last=keep_last, keep_best=False)


BPE = TokenizerConfig(name="bpe", vocab_size=4096, train_max_bytes=2_000_000)


def bpe_overrides(cache: Path, *extra: str) -> list[str]:
    return ["model=tiny", "data=shakespeare", f"data.cache_dir={cache}", "data.max_tokens=60000", "data.num_proc=1",
            "tokenizer=bpe", f"tokenizer.vocab_size={BPE.vocab_size}",
            f"tokenizer.train_max_bytes={BPE.train_max_bytes}",
            "logger=none", "progress_bar=false", "device=cpu", "precision=fp32", "total_batch_tokens=256",
            "micro_batch_size=4", "block_size=64", "eval.interval=0", "eval.iters=1", "eval.sample_tokens=8", *extra]


WORKERS = REPO / "tests" / "workers" / "checkpoint_workers.py"


def make_docs(n: int = 300) -> list[str]:
    return [f"Document {i}. " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(5 + i % 40)) + "\n"
            for i in range(n)]


def tiny_model(vocab_size: int = 101, n_positions: int = 64) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, n_positions=n_positions, vocab_size=vocab_size)
    return GPT(cfg).eval()


def run_entry(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run_dir / "metrics.jsonl") if key in r}


TINY_RUN = ["model=tiny", "max_steps=6", "total_batch_tokens=512", "block_size=32", "eval.interval=3",
            "eval.iters=2", "eval.sample_tokens=8", "optimizer.grad_clip=0", "scheduler.warmup_steps=1",
            "log_interval=1"]


def save_toy(root: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, config: dict | None = None,
             **kw) -> Path:
    """`save_toy_checkpoint` with a trainer step, a rank position and a config record filled in."""
    args = dict(trainer_state={"step": step}, rank_state={"pos": step}, record={"config": config or {"seed": 1}})
    args.update(kw)
    return save_toy_checkpoint(root, step, model, opt, **args)


def run_checkpoint_worker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python tests/workers/checkpoint_workers.py MODE ...`"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(WORKERS), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO)


def hf_logits(path: Path, idx: torch.Tensor) -> torch.Tensor:
    """transformers' logits for `idx` from the model saved at `path` (loaded with nothing missing or extra)."""
    import transformers

    model, info = transformers.GPT2LMHeadModel.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(idx).logits


def text_cfg(path: Path | str, cache: Path, **kw: object) -> DataConfig:
    kw = {"num_proc": 1, **kw}
    return DataConfig(name="text", path=str(path), cache_dir=str(cache), **kw)  # type: ignore[arg-type]


def split_tokens(p: PreparedData) -> tuple[np.ndarray, np.ndarray]:
    return p.stream("train")[:], p.stream("val")[:]


EOT = 50256


def split_docs(ids: np.ndarray) -> list[list[int]]:
    """Documents of a split: every document ends with eot."""
    assert len(ids) == 0 or ids[-1] == EOT
    cuts = np.flatnonzero(ids == EOT)
    return [ids[a + 1 : b].tolist() for a, b in zip(np.concatenate([[-1], cuts[:-1]]), cuts)]


def data_cfg(kind: str, path: Path, cache: Path, **kw: object) -> DataConfig:
    common = {"cache_dir": str(cache), "num_proc": 1, **kw}
    if kind == "text":
        return DataConfig(name="text", path=str(path), **common)  # type: ignore[arg-type]
    builder = {"jsonl": "json", "parquet": "parquet"}[kind]
    return DataConfig(name="hf", path=builder, data_files=[str(path)], **common)  # type: ignore[arg-type]


CPU = torch.device("cpu")


class MaliciousPickle:
    """Unpickling this creates `marker` (it is what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))
