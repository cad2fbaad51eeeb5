"""The report of a sweep (`python run_report.py multirun/<stamp>`): one row per run with its differing overrides,
status, val losses, steps, tokens, speed and wall time, sorted by final val loss, as Markdown and CSV, and one PNG
of every run's val-loss curve. It reads only the files runs write (gpt2.report.runs), never imports torch, Hydra
or the training stack, and works on a sweep that is still running, on outputs/ and on SLURM sweeps alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from gpt2.errors import UserError
from gpt2.report.runs import Run, find_runs, read_run
from gpt2.report.table import csv_text, differing_keys, markdown, plot_val_curves, sort_runs
from gpt2.utils.fs import atomic_write, check_writable

REPORT_FILES = ("report.md", "report.csv", "report.png")


@dataclass
class Report:
    runs: list[Run]
    """In table order (final val loss, lowest first)."""
    keys: list[str]
    """The override keys that differ between runs (the table's override columns)."""
    markdown: str
    written: list[Path]


def sweep_report(folder: str | Path, out_dir: str | Path | None = None, stale_s: float = 3600.0,
                 now: float | None = None) -> Report:
    """Read every run at or below `folder` and write report.md, report.csv and report.png into `out_dir`
    (default: `folder`); UserError when `folder` holds no run or `out_dir` cannot be written."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{folder} is not a folder; give a sweep folder (multirun/<date>/<time>), outputs/ or a run "
                        f"folder.")
    paths = find_runs(root)
    if not paths:
        raise UserError(f"{folder} holds no runs (no folder with .hydra/ or metrics.jsonl below it); give a sweep "
                        f"folder (multirun/<date>/<time>), outputs/ or a run folder.")
    out = check_writable("--out", Path(out_dir) if out_dir is not None else root, is_dir=True,
                         fix="give another folder with --out")
    now = time.time() if now is None else now
    runs = sort_runs([read_run(p, root, now, stale_s) for p in paths])
    keys = differing_keys(runs)
    table = markdown(runs, keys)
    written = [atomic_write(out / "report.md", table), atomic_write(out / "report.csv", csv_text(runs, keys))]
    if plot_val_curves(runs, keys, out / "report.png"):
        written.append(out / "report.png")
    return Report(runs, keys, table, written)
