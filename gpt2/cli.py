"""Hydra glue shared by the entry points (run_train.py, run_generate.py, run_eval.py, run_prepare.py):
the schemas registered with Hydra's ConfigStore, the run-directory stamp all ranks agree on, unknown
command-line keys refused before Hydra composes, a run directory checked where Hydra creates it and
removed when a failed start leaves it empty, and one way to report a user mistake.

This module and the run_*.py files are the only ones that import Hydra.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import logging
import os
import secrets
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from gpt2 import config as C
from gpt2.errors import ConfigError, UserError
from gpt2.runtime import world
from gpt2.utils.fs import RUN_FILES, check_writable, first_missing, remove_tree, symlink_refusal

CONF_DIR = Path(__file__).resolve().parent / "conf"
"""The Hydra config tree, shipped inside the package (gpt2/conf/)."""
HYDRA_FILES = {".hydra", "train.log", "generate.log", "eval.log"}
"""Files Hydra writes into a run directory before the task starts: a directory holding nothing else was
never used by a run."""
STAMP_ENV = "GPT2_RUN_STAMP"
GROUPS = {"model": C.ModelConfig, "optimizer": C.OptimizerConfig, "scheduler": C.SchedulerConfig,
          "precision": C.PrecisionConfig, "distributed": C.DistributedConfig, "data": C.DataConfig,
          "tokenizer": C.TokenizerConfig, "logger": C.LoggerConfig}
"""The config groups (folders of gpt2/conf/) whose files are typed by a dataclass (`base_<group>`)."""


# ------------------------------------------------------------------ schemas


def register_configs() -> None:
    """Register the dataclass schemas as `base_<group>` and the roots as `base_train`, `base_generate` and
    `base_eval`, and the `run_stamp` resolver of the run directory's name."""
    cs = ConfigStore.instance()
    cs.store(name="base_train", node=C.TrainConfig)
    cs.store(name="base_generate", node=C.GenerateConfig)
    cs.store(name="base_eval", node=C.EvalRunConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"base_{group}", node=node)
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)


def _new_stamp() -> str:
    """`YYYY-MM-DD/HH-MM-SS-xxxxxx`: date folder, time, and a random suffix so that two runs started in the
    same second never share a directory."""
    now = datetime.datetime.now()
    return f"{now:%Y-%m-%d}/{now:%H-%M-%S}-{secrets.token_hex(3)}"


def run_stamp() -> str:
    """The run-directory stamp, identical on every rank and every restart of one torchrun job.

    Under torchrun the first rank to ask draws it and publishes it under the job's run id in torchrun's agent
    store (the TCPStore at MASTER_ADDR:MASTER_PORT that the agent shares with its workers); every other rank,
    and the workers torchrun restarts while that store lives, read it there. Outside torchrun (or when the stamp
    was already set, e.g. by a SLURM submission) it is drawn locally.

    An elastic launch (`--max-restarts` > 0) must land every attempt in one run dir even when the node holding
    that store is lost, and without the agent store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) ranks cannot agree
    on a stamp: both are refused in one line asking for an explicit `hydra.run.dir`.
    """
    if STAMP_ENV in os.environ:
        return os.environ[STAMP_ENV]
    stamp = _new_stamp()
    world_size = world.rank_and_world()[1]
    if "TORCHELASTIC_RUN_ID" in os.environ:
        shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
        if restarts > 0 or (world_size > 1 and not shared):
            why = (f"torchrun --max-restarts={restarts} restarts the workers, and resume=auto finds the checkpoint "
                   f"only if every attempt lands in the same run dir" if restarts > 0 else
                   "without torchrun's agent store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) the ranks cannot agree "
                   "on a dated run dir")
            print(f"error: {why}; set it explicitly, e.g. hydra.run.dir=outputs/my-run (see docs/elastic.md).",
                  file=sys.stderr, flush=True)
            sys.exit(2)
        if world_size > 1:
            from torch.distributed import TCPStore

            store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=300))
            key = f"gpt2/run_stamp/{os.environ['TORCHELASTIC_RUN_ID']}"
            stamp = store.compare_set(key, "", stamp).decode()  # the first rank's draw wins
    os.environ[STAMP_ENV] = stamp
    return stamp


def compose_experiments(names: tuple[str, ...]) -> dict[str, C.TrainConfig]:
    """The shipped experiments `names` as they ship (gpt2/conf/train.yaml with experiment=NAME and nothing else),
    typed; called inside a running Hydra app (run_train.py), whose config search path it uses."""
    from hydra import compose

    return {name: OmegaConf.to_object(compose(config_name="train", overrides=[f"experiment={name}"]))  # type: ignore[misc]
            for name in names}


# ------------------------------------------------------------------ reporting


class SweepJobFailed(UserError, CompactHydraException):
    """A sweep job's user mistake: Hydra prints the message alone (no traceback) and runs the other jobs."""


def log_to_files(line: str) -> None:
    """Write `line` into this process's log files (Hydra's train.log, generate.log, ...) but not onto the console:
    a run dir then says why its run stopped (run_report.py reads it), and the console shows the error once."""
    record = logging.LogRecord("gpt2", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def fail(message: str) -> NoReturn:
    """Print `error: message` and exit 2, without a traceback; the run's log file gets the line too.

    In a multirun sweep it raises `SweepJobFailed` instead (sys.exit would end the whole sweep), naming the
    job number and its overrides; Hydra reports the failed job and the others still run."""
    log_to_files(f"error: {message}")
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        raise SweepJobFailed(f"error: job #{hc.job.num} ({' '.join(hc.overrides.task)}) failed: {message}") from None
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def log_failure(err: BaseException) -> None:
    """An exception that ends a run without `fail` (a bug, Ctrl-C) as one `error:` line in the log files; `fail`
    logged its own line, and a preempted run's exit was logged by the trainer."""
    if isinstance(err, (SystemExit, SweepJobFailed)):
        return
    first = next(iter(str(err).splitlines()), "")
    log_to_files(f"error: {type(err).__name__}{': ' + first if first else ''}")


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Inside: a user mistake (UserError, ValueError, an OmegaConf error, a value left unset) becomes one
    `error:` line and exit 2 (`fail`), and Ctrl-C exits 130 without a traceback."""
    try:
        yield
    except MissingMandatoryValue as err:
        fail(f"{err.full_key} has no value; set it on the command line, e.g. {err.full_key}=...")
    except (UserError, ValueError, OmegaConfBaseException) as err:
        fail(str(err))
    except KeyboardInterrupt:
        sys.exit(130)


def run_main(main: Callable[[], object]) -> NoReturn:
    """Run an entry point's `main` and exit with its status; in a multi-rank job leave with `os._exit` once
    everything is flushed.

    Gloo's C++ threads can abort the process (SIGABRT, "terminate called without an active exception")
    when Python destroys leftover distributed objects during interpreter shutdown, turning a finished run
    into a failed one; skipping the finalizers avoids that."""
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    if world.rank_and_world()[1] > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ------------------------------------------------------------------ command-line keys


DICT_OF = object()
"""Marks a field typed dict[str, X]: its next key part is a free name (e.g. a mixture's source), then X's keys."""


def _nested_schema(cls: type) -> dict[str, Any]:
    """Each field of dataclass `cls` -> its dataclass type (for `X` and `X | None`), (DICT_OF, X) for a
    dict[str, X] of dataclasses, else None."""
    hints = typing.get_type_hints(cls, vars(C))
    out: dict[str, Any] = {}
    for f in fields(cls):
        hint = hints[f.name]
        if typing.get_origin(hint) is dict:
            value = typing.get_args(hint)[1]
            out[f.name] = (DICT_OF, value) if is_dataclass(value) else None
            continue
        candidates = typing.get_args(hint) or (hint,)
        out[f.name] = next((c for c in candidates if isinstance(c, type) and is_dataclass(c)), None)
    return out


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, nested groups included (e.g. optimizer.lr)."""
    keys = []
    for name, sub in _nested_schema(cls).items():
        keys.append(prefix + name)
        if isinstance(sub, tuple):
            keys += schema_keys(sub[1], f"{prefix}{name}.NAME.")
        elif sub is not None:
            keys += schema_keys(sub, f"{prefix}{name}.")
    return keys


def conf_groups() -> set[str]:
    """The config group names (folders of gpt2/conf/): `model=tiny` selects a group, it is not a key."""
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


def check_override_keys(schema: type, overrides: list[str], groups: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Refuse a command-line override whose key is not in `schema`, whether written `key=`, `+key=`,
    `++key=` or `~key`, naming the nearest valid key. Group choices (`model=tiny`, any name in `groups`),
    `hydra.*` keys and non-override arguments (flags) are left to Hydra."""
    for arg in overrides:
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            continue
        key = arg.split("=", 1)[0].lstrip("~+")
        if not key or "/" in key or "@" in key or key == "hydra" or key.startswith("hydra.") or key in groups:
            continue
        moved = C.moved_key_error(key)
        if moved is not None:
            raise ConfigError(moved)
        cls: Any = schema
        prefix = ""
        for part in key.split("."):
            if cls is None:  # below a leaf that holds a list or mapping
                break
            if isinstance(cls, tuple):  # a free name in a dict of dataclasses (a mixture's source)
                cls, prefix = cls[1], prefix + part + "."
                continue
            nested = _nested_schema(cls)
            if part not in nested:
                valid = schema_keys(schema)
                siblings = [prefix + name for name in nested]
                near = (difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
                        or difflib.get_close_matches(prefix + part, siblings, n=1, cutoff=0.0))
                hint = f"did you mean {near[0]}?" if near else f"valid keys: {', '.join(valid)}."
                raise ConfigError(f"{arg.split('=', 1)[0]}: {prefix + part} is not a config key; {hint} "
                                  f"Every key is listed with its docstring in gpt2/config.py.")
            cls = nested[part]
            prefix += part + "."


def check_command_line(schema: type, argv: list[str] | None = None) -> None:
    """Refuse unknown keys among the overrides (`key=`, `+key=`, `++key=`, `~key`) with one `error:` line
    naming the nearest valid key, before Hydra composes (and silently drops them)."""
    try:
        check_override_keys(schema, sys.argv[1:] if argv is None else argv, conf_groups())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def quiet_non_zero_ranks() -> None:
    """Only rank 0 writes `.hydra/` and train.log into the shared run dir."""
    if not world.is_main():
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


# ------------------------------------------------------------------ run directory

_created: dict[str, Path] = {}  # run dir -> the outermost folder this launch created for it


def _prepare_dir(key: str, config: DictConfig) -> None:
    try:
        path = Path(str(OmegaConf.select(config, key))).expanduser().absolute()
    except Exception:  # an interpolation only Hydra's job can resolve: leave it to Hydra
        return
    first_new = first_missing(path)
    # Every rank of a torchrun launch prepares the same folder at once: it is created first, so that the
    # test write below creates (and removes) nothing that another rank is writing into.
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # check_writable names the reason
    try:
        check_writable(key, path, is_dir=True, fix=f"choose a writable folder, e.g. {key}=outputs/my-run")
    except UserError as err:
        if first_new is not None and first_new.is_dir() and world.is_main():
            remove_tree(first_new)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    for name in RUN_FILES:  # Hydra itself would follow a planted train.log or .hydra link
        if (path / name).is_symlink():
            print(f"error: {symlink_refusal(path / name)}", file=sys.stderr, flush=True)
            sys.exit(2)
    if first_new is not None:
        _created[str(path)] = first_new


class RunDirCheck(Callback):
    """Creates and test-writes `hydra.run.dir` (or `hydra.sweep.dir`) before Hydra does, so that an
    unwritable, read-only or impossible path (e.g. under /proc) is one `error:` line and exit 2 instead of
    Hydra's traceback. Listed under `hydra.callbacks` in gpt2/conf/train.yaml."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _prepare_dir("hydra.run.dir", config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _prepare_dir("hydra.sweep.dir", config)


def remove_unused_run_dir(output_dir: str | Path) -> bool:
    """Remove a run directory this launch created when it holds only what Hydra put there (a run that
    failed before training, or a dry run); returns whether it did. Only rank 0 removes."""
    path = Path(output_dir).absolute()
    first_new = _created.get(str(path))
    if first_new is None or not world.is_main() or not path.is_dir():
        return False
    if any(child.name not in HYDRA_FILES for child in path.iterdir()):
        return False
    remove_tree(path)
    parent = path.parent
    while first_new in (parent, *parent.parents) and parent.exists():  # empty folders made for it (the date)
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
    return True
