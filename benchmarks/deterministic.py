"""What `deterministic=true` costs: training tokens/s of the quickstart recipe (experiment=shakespeare_cpu: the
small model, its batch, precision=auto, the demo corpus) with the switch off and on, eager and compiled.

In one process, two Trainers per compile setting (built as `run_train.py` builds them, from the same seed)
take turns, one optimizer step each, the switch set before each step (torch.compile keeps one compiled graph
per setting: Dynamo guards on it). Alternating steps means load from other processes hits both sides alike;
tokens/s is the median over the timed steps after warm-up (the first step compiles).

    .venv/bin/python benchmarks/deterministic.py                      # eager and compiled, 10 timed steps each
    .venv/bin/python benchmarks/deterministic.py --compile on --steps 30 --precision fp32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import environment, fmt, markdown_table, median, write_json
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gpt2.cli import CONF_DIR, register_configs
from gpt2.config import TrainConfig
from gpt2.runtime.determinism import set_deterministic
from gpt2.runtime.distributed import local_dist
from gpt2.train.assembly import build_run
from gpt2.train.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent


def recipe(overrides: list[str]) -> TrainConfig:
    """gpt2/conf/train.yaml with experiment=shakespeare_cpu and `overrides`, as run_train.py composes it."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dcfg = compose(config_name="train", overrides=["experiment=shakespeare_cpu", *overrides])
    return OmegaConf.to_object(dcfg)  # type: ignore[return-value]


def trainer(cfg: TrainConfig, out_dir: str) -> Trainer:
    """A Trainer on one CPU rank over the run `run_train.py` assembles (gpt2.train.assembly.build_run), without a
    metrics logger."""
    return Trainer(build_run(cfg, local_dist("cpu"), out_dir, log_metrics=False))


def measure(compiled: bool, precision: str, warmup: int, steps: int) -> dict[str, Any]:
    cfg = recipe([f"compile={str(compiled).lower()}", f"precision={precision}"])
    times: dict[bool, list[float]] = {False: [], True: []}
    first: dict[bool, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-det-") as out_dir:
        trainers = {det: trainer(cfg, out_dir) for det in (False, True)}
        for i in range(warmup + steps):
            for det in (False, True):
                set_deterministic(det)
                t0 = time.perf_counter()
                trainers[det].train_step()
                dt = time.perf_counter() - t0
                if i == 0:
                    first[det] = dt
                elif i >= warmup:
                    times[det].append(dt)
    set_deterministic(False)
    tok_s = {det: cfg.total_batch_tokens / median(times[det]) for det in (False, True)}
    return {"compile": compiled, "precision": trainers[False].run.plan.precision, "off_tok_s": tok_s[False],
            "on_tok_s": tok_s[True], "cost": 1 - tok_s[True] / tok_s[False], "first_step_off_s": first[False],
            "first_step_on_s": first[True]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", default="both", choices=("off", "on", "both"), help="torch.compile")
    parser.add_argument("--precision", default="auto", help="precision= (auto: bf16 where native, else fp32)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side (the first one compiles)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deterministic.json"))
    args = parser.parse_args()

    env = environment()
    rows = []
    for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        row = measure(compiled, args.precision, args.warmup, args.steps)
        print(f"compile={compiled}: off {fmt(row['off_tok_s'])} tok/s, on {fmt(row['on_tok_s'])} tok/s", flush=True)
        rows.append(row)
    print(markdown_table(
        ["model", "precision", "deterministic=false tok/s", "deterministic=true tok/s", "cost",
         "first step off/on (s)"],
        [["compiled" if r["compile"] else "eager", r["precision"], fmt(r["off_tok_s"]), fmt(r["on_tok_s"]),
          f"{r['cost']:.1%}", f"{r['first_step_off_s']:.1f}/{r['first_step_on_s']:.1f}"] for r in rows]))
    print(f"{env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} threads), torch {env['torch']}; "
          f"load average at start {env['load_average_start']}")
    path = write_json(args.out, {"benchmark": "deterministic", "args": vars(args), "environment": env, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
