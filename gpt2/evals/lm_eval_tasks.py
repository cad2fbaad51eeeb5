"""lm-evaluation-harness tasks, loaded once and run on a `GPTLM` (gpt2.evals.lm_eval_model) as often as needed.

`load_tasks` resolves task, group or tag names once, rank 0 first (it downloads the datasets into the Hugging
Face cache, the other ranks then read it), and turns an unknown name or a dataset that cannot be fetched into
one UserError. `evaluate` runs them through lm_eval.simple_evaluate (training evaluates periodically, with the
global RNGs restored afterwards) and broadcasts rank 0's results, so that every rank returns them; `metrics`
flattens them to `lm_eval/<task>/<metric>` and `table` is lm-eval's own table.

This module imports lm_eval; gpt2.config checks that it is installed before anything imports this module.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import json
import logging
import random
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lm_eval
import numpy as np
import torch
import torch.distributed as dist
from lm_eval.api.group import Group
from lm_eval.api.task import Task
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from gpt2.config import LMEvalConfig
from gpt2.errors import UserError
from gpt2.evals.lm_eval_model import GPTLM
from gpt2.runtime.distributed import main_rank_first

OWN_ARGS = ("model", "model_args", "tasks", "num_fewshot", "limit", "batch_size", "max_batch_size", "device",
            "task_manager", "metadata")
"""simple_evaluate arguments that come from our own config, never from lm_eval.args (metadata goes to the
TaskManager)."""


# ------------------------------------------------------------------------- the tasks


@dataclass(frozen=True)
class LoadedTasks:
    """lm-eval tasks and groups, resolved once (datasets loaded) and run by `evaluate` as often as needed."""

    manager: TaskManager
    specs: tuple[Task | Group, ...]
    """The top-level tasks and groups the names resolved to (a tag expands to its tasks)."""


class UnknownTask(UserError):
    """A task, group or tag name that lm-eval's TaskManager does not know."""


@contextlib.contextmanager
def _isolated() -> Iterator[None]:
    """simple_evaluate seeds the global RNGs and logs at INFO: restore the RNG states (a training run's data
    order and dropout go on as if nothing happened) and keep lm-eval's INFO lines out of our logs."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


@functools.cache
def _manager(include_path: str | None, with_builtin: bool, metadata: str) -> TaskManager:
    """A TaskManager; indexing lm-eval's ~15,000 built-in task files takes seconds, so each is built once."""
    return TaskManager(include_path=include_path, include_defaults=with_builtin, metadata=json.loads(metadata))


def load_tasks(names: Sequence[str], cfg: LMEvalConfig, key: str) -> LoadedTasks:
    """lm-eval tasks, groups or tags by name, rank 0 first (it downloads the datasets, the other ranks then read
    its cache). `key` is where `cfg` sits in the user's config (lm_eval, eval.lm_eval), for error messages.
    UserError for an unknown name or a dataset that cannot be fetched."""
    with _isolated():
        return main_rank_first(lambda: _load(tuple(names), cfg, key), "load the lm-eval tasks " + ", ".join(names))


def _load(names: tuple[str, ...], cfg: LMEvalConfig, key: str) -> LoadedTasks:
    check_args(cfg.args, key)
    include = str(Path(cfg.include_path).expanduser()) if cfg.include_path else None
    if include is not None and not Path(include).is_dir():
        raise UserError(f"{key}.include_path={cfg.include_path} is not a folder; give a folder of lm-eval task "
                        f"yaml files, or leave it unset for lm-eval's own tasks.")
    metadata = json.dumps(cfg.args.get("metadata") or {}, sort_keys=True)
    # Tasks of include_path alone resolve without indexing lm-eval's own; anything else needs the full index.
    local = _manager(include, False, metadata) if include else None
    if local is not None and all(n in local.all_tasks for n in names):
        try:
            return LoadedTasks(local, tuple(s for n in names for s in _load_one(local, n, key)))
        except UnknownTask:  # e.g. a local group of built-in tasks: try again with everything
            pass
    manager = _manager(include, True, metadata)
    return LoadedTasks(manager, tuple(s for n in names for s in _load_one(manager, n, key)))


def _load_one(manager: TaskManager, name: str, key: str) -> list[Task | Group]:
    """The top-level tasks and groups `name` resolves to; its datasets are loaded now."""
    try:
        loaded = manager.load([name])
    except KeyError as err:
        if f"'{name}'" not in str(err):  # a task or group that `name` needs
            raise UnknownTask(f"lm-eval task {name}: {err.args[0] if err.args else err}") from None
        near = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f"did you mean {', '.join(near)}? " if near else ""
        raise UnknownTask(f"{name!r} is not an lm-eval task, group or tag; {hint}`lm_eval ls tasks` lists them, and "
                          f"{key}.include_path=FOLDER adds your own task yaml files.") from None
    except Exception as err:
        raise UserError(_load_error(name, err, key)) from None
    children = {c for kids in loaded.get("group_map", {}).values() for c in kids}
    return ([g for n, g in loaded.get("groups", {}).items() if n not in children]
            + [t for n, t in loaded["tasks"].items() if n not in children])


def _load_error(name: str, err: Exception, key: str) -> str:
    """One line for a task that failed to load: the dataset it could not fetch (read from lm-eval's
    `download` frame in the traceback) and how to point it at local files, else the error itself."""
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
    for frame, _ in traceback.walk_tb(err.__traceback__):
        task = frame.f_locals.get("self")
        if frame.f_code.co_name == "download" and isinstance(task, Task):
            cfg = task.config
            dataset = cfg.dataset_path + (f" ({cfg.dataset_name})" if cfg.dataset_name else "")
            return (f"lm-eval task {name}: could not fetch dataset {dataset} for task {cfg.task} ({reason}); to "
                    f"use local files, write a task yaml with `dataset_path: json` and `dataset_kwargs: {{data_files: "
                    f"{{test: FILE.jsonl}}}}` (test_split: test) into a folder and pass {key}.include_path=FOLDER.")
    return f"lm-eval task {name} could not be loaded ({reason}); check its task yaml."


# ------------------------------------------------------------------------- running


def check_args(args: dict[str, Any], key: str) -> None:
    """`args` must name arguments of lm_eval.simple_evaluate that our config does not set itself."""
    allowed = sorted(set(inspect.signature(lm_eval.simple_evaluate).parameters) - set(OWN_ARGS))
    for name in args:
        if name == "metadata":
            continue
        if name in OWN_ARGS:
            raise UserError(f"{key}.args.{name} is set by our own config (tasks, limit, batch_size, device, "
                            f"{key}.num_fewshot, {key}.include_path); drop it from {key}.args.")
        if name not in allowed:
            raise UserError(f"{key}.args.{name} is not an argument of lm_eval.simple_evaluate; choose among "
                            f"{', '.join(allowed)}.")


def evaluate(lm: GPTLM, tasks: LoadedTasks, cfg: LMEvalConfig, limit: int) -> dict[str, Any]:
    """lm_eval.simple_evaluate of the tasks on `lm` (the documents split over the ranks); every rank returns
    rank 0's results, as plain JSON data. `limit` > 0 scores only the first N documents of each task."""
    args = {k: v for k, v in cfg.args.items() if k != "metadata"}
    was_training = lm.model.training
    lm.model.eval()
    try:
        with _isolated():
            res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.specs), num_fewshot=cfg.num_fewshot,
                                          limit=limit or None, task_manager=tasks.manager,
                                          **{"log_samples": False, **args})
    finally:
        lm.model.train(was_training)
    if res is not None:
        res = json.loads(json.dumps(res, default=handle_non_serializable))
    if lm.world_size > 1:
        box = [res]
        dist.broadcast_object_list(box, src=0)
        res = box[0]
    return res


def metrics(results: dict[str, Any]) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` for every numeric metric of every task and group (stderrs left out); a
    filter other than lm-eval's `none` is kept in the name: `lm_eval/gsm8k/exact_match,strict-match`."""
    out: dict[str, float] = {}
    for task, values in results["results"].items():
        for name, value in values.items():
            metric, _, filt = name.partition(",")
            if not filt or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            out[f"lm_eval/{task}/{metric if filt == 'none' else name}"] = float(value)
    return out


def table(results: dict[str, Any]) -> str:
    """lm-eval's own table of the results (and of the groups, when there are any)."""
    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text
