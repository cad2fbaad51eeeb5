"""Hydra glue shared by the entry points (run_train.py, run_generate.py, run_eval.py, run_prepare.py):
one way to report a user mistake, unknown command-line keys refused before Hydra composes, a run
directory checked where Hydra creates it, and a run directory that a failed start leaves empty removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gpt2.config import ConfigError, UserError, check_override_keys

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Files Hydra writes into a run directory before the task starts: a directory holding nothing
# else was never used by a run.
HYDRA_FILES = {".hydra", "train.log", "generate.log", "eval.log"}


class SweepJobFailed(UserError, CompactHydraException):
    """A sweep job's user mistake: Hydra prints the message alone (no traceback) and runs the other jobs."""


def fail(message: str) -> NoReturn:
    """Print `error: message` and exit 2, without a traceback.

    In a multirun sweep it raises `SweepJobFailed` instead (sys.exit would end the whole sweep),
    naming the job number and its overrides; Hydra reports the failed job and the others still run."""
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        raise SweepJobFailed(f"error: job #{hc.job.num} ({' '.join(hc.overrides.task)}) failed: {message}") from None
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run_main(main: Callable[[], object]) -> NoReturn:
    """Run an entry point's `main` and exit with its status; in a multi-rank job leave with `os._exit`
    once everything is flushed.

    Gloo's C++ threads can abort the process (SIGABRT, "terminate called without an active
    exception") when Python destroys leftover distributed objects during interpreter shutdown,
    turning a finished run into a failed one; skipping the finalizers avoids that."""
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def conf_groups() -> set[str]:
    """The config group names (folders of conf/): `model=tiny` selects a group, it is not a key."""
    return {p.name for p in CONF_DIR.iterdir() if p.is_dir()}


def check_command_line(schema: type, argv: list[str] | None = None) -> None:
    """Refuse unknown keys among the overrides (`key=`, `+key=`, `++key=`, `~key`) with one
    `error:` line naming the nearest valid key, before Hydra composes (and silently drops them)."""
    try:
        check_override_keys(schema, sys.argv[1:] if argv is None else argv, conf_groups())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


# ------------------------------------------------------------------ run directory

_created: dict[str, Path] = {}  # run dir -> the outermost folder this launch created for it


def _prepare_dir(key: str, config: DictConfig) -> None:
    try:
        path = Path(str(OmegaConf.select(config, key))).expanduser().absolute()
    except Exception:  # an interpolation only Hydra's job can resolve: leave it to Hydra
        return
    first_new = next((p for p in [*reversed(path.parents), path] if not p.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # writable? (a read-only file system passes mkdir of an existing dir)
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        print(f"error: {key}={path} cannot be used as the run directory: {reason} ({err.filename or path}); "
              f"choose a writable folder, e.g. {key}=outputs/my-run", file=sys.stderr, flush=True)
        sys.exit(2)
    from gpt2.train.metrics import RUN_FILES, symlink_refusal

    for name in RUN_FILES:  # Hydra itself would follow a planted train.log or .hydra link
        if (path / name).is_symlink():
            print(f"error: {symlink_refusal(path / name)}", file=sys.stderr, flush=True)
            sys.exit(2)
    if first_new is not None:
        _created[str(path)] = first_new


class RunDirCheck(Callback):
    """Creates and test-writes `hydra.run.dir` (or `hydra.sweep.dir`) before Hydra does, so that an
    unwritable, read-only or impossible path (e.g. under /proc) is one `error:` line and exit 2
    instead of Hydra's traceback. Listed under `hydra.callbacks` in conf/*.yaml."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _prepare_dir("hydra.run.dir", config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _prepare_dir("hydra.sweep.dir", config)


def remove_unused_run_dir(output_dir: str | Path) -> bool:
    """Remove a run directory this launch created when it holds only what Hydra put there
    (a run that failed before training); returns whether it did. Only rank 0 removes."""
    path = Path(output_dir).absolute()
    first_new = _created.get(str(path))
    if first_new is None or int(os.environ.get("RANK", "0")) != 0 or not path.is_dir():
        return False
    if any(child.name not in HYDRA_FILES for child in path.iterdir()):
        return False
    shutil.rmtree(path, ignore_errors=True)
    parent = path.parent
    while first_new in (parent, *parent.parents) and parent.exists():  # empty folders made for it (the date)
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
    return True
