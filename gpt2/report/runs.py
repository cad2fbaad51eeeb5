"""What one run dir says about its run, read from the files the run writes: `.hydra/overrides.yaml` and
`.hydra/config.yaml` (Hydra), `metrics.jsonl` (gpt2.train.metrics) and `train.log` (Hydra's log file of the run's
console lines). Nothing here imports the training stack; a run that is still writing is read as it stands.

The status comes from the last of these lines in train.log: `done: ...` (the end-of-run summary: finished),
`error: ...` (the one error line of a failed run), `preempted at step N` (a checkpoint was saved on a preemption
signal) and `resumed from ... at step N` (a later session continued). After none of them, or after a resume, the
run is running while it keeps writing, and stalled once its files have been silent for `stale_s` seconds (a
process killed without a word, e.g. by the OOM killer or a time limit).
"""

from __future__ import annotations

import datetime
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RUN_MARKERS = (".hydra", "metrics.jsonl")
"""A folder holding one of these is a run dir."""
SKIPPED_DIRS = {"checkpoints", "wandb"}
"""Folders inside a run dir or sweep dir that hold no runs (besides hidden ones: .hydra, .submitit)."""
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})\]\[[^\]]*\]\[\w+\] - (.*)$")
"""A record of Hydra's log format: `[2026-11-25 10:00:00,123][gpt2][INFO] - message`."""
PREEMPTED = re.compile(r"preempted at step (\d+); checkpoint saved")
"""The trainer's line when it stops on a preemption signal."""
RESUMED = re.compile(r"resumed from .+ at step (\d+)$")
"""The trainer's line when a run continues from a checkpoint."""


@dataclass
class Run:
    """One run as its files describe it."""

    name: str
    """Its folder, relative to the folder the report covers (a sweep's job number, a run's date/time)."""
    path: Path
    overrides: dict[str, str] = field(default_factory=dict)
    """Command-line overrides, key -> value as typed (e.g. optimizer.lr -> 3e-3)."""
    status: str = "running"
    """finished, failed, preempted, running or stalled."""
    detail: str = ""
    """The error line of a failed run; the preemptions of a preempted or resumed one; the silence of a stalled one."""
    max_steps: int | None = None
    step: int | None = None
    """The last optimizer step logged."""
    tokens: int | None = None
    """Training tokens seen at that step."""
    tokens_per_s: float | None = None
    """Median training throughput over the logged intervals."""
    wall_s: float | None = None
    """From the first to the last line of train.log (a resumed run: including the wait between sessions)."""
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    """(step, val loss) of each evaluation, each step once (a resumed run's own value where it re-trained)."""

    @property
    def final_val_loss(self) -> float | None:
        return self.val_curve[-1][1] if self.val_curve else None

    @property
    def best_val_loss(self) -> float | None:
        return min(loss for _, loss in self.val_curve) if self.val_curve else None


def find_runs(folder: Path) -> list[Path]:
    """The run dirs at or below `folder` (a run dir, a sweep dir, multirun/ or outputs/), in name order with job
    numbers numerically."""
    runs: list[Path] = []

    def walk(d: Path) -> None:
        if any((d / marker).exists() for marker in RUN_MARKERS):
            runs.append(d)
            return
        for child in sorted(d.iterdir()):
            if child.is_dir() and not child.is_symlink() and not child.name.startswith(".") \
                    and child.name not in SKIPPED_DIRS:
                walk(child)

    walk(folder)
    return sorted(runs, key=lambda p: [int(part) if part.isdigit() else part for part in p.relative_to(folder).parts])


def read_overrides(run_dir: Path) -> dict[str, str]:
    """`.hydra/overrides.yaml` as key -> value (`+key`, `++key` as key; `~key` as key -> "~")."""
    import yaml

    path = run_dir / ".hydra" / "overrides.yaml"
    try:
        items = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    except (OSError, yaml.YAMLError):
        return {}
    out: dict[str, str] = {}
    for item in items if isinstance(items, list) else []:
        key, eq, value = str(item).partition("=")
        out[key.lstrip("+~")] = value if eq else "~"
    return out


def read_max_steps(run_dir: Path) -> int | None:
    import yaml

    try:
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    value = config.get("max_steps") if isinstance(config, dict) else None
    return value if isinstance(value, int) else None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (none when missing; a line being written or cut by a crash is skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def last_per_step(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key`, in step order, the last record of each step (a resumed run re-logs the steps after
    the checkpoint it resumed from)."""
    values = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float))}
    return sorted(values.items())


def read_log(path: Path) -> tuple[list[tuple[str, str]], float | None]:
    """The status lines of train.log as (kind, text) in order, kind one of done, error, preempted, resumed; and
    the seconds from its first to its last line."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return [], None
    events: list[tuple[str, str]] = []
    stamps: list[datetime.datetime] = []
    for line in lines:
        m = LOG_LINE.match(line)
        if not m:
            continue  # a continuation line (a sample's text)
        stamps.append(datetime.datetime.strptime(f"{m.group(1)}.{m.group(2)}", "%Y-%m-%d %H:%M:%S.%f"))
        message = m.group(3)
        if message.startswith("done: "):
            events.append(("done", message))
        elif message.startswith("error: "):
            events.append(("error", message.removeprefix("error: ")))
        elif p := PREEMPTED.match(message):
            events.append(("preempted", p.group(1)))
        elif r := RESUMED.match(message):
            events.append(("resumed", r.group(1)))
    wall = (stamps[-1] - stamps[0]).total_seconds() if stamps else None
    return events, wall


def status_of(events: list[tuple[str, str]], last_write: float | None, now: float, stale_s: float
              ) -> tuple[str, str]:
    """(status, detail) from the status lines of train.log and the time of the run's last write."""
    kind, text = events[-1] if events else ("", "")
    if kind == "error":
        return "failed", text
    if kind == "preempted":
        return "preempted", f"at step {text}; resume=auto continues it"
    preempted = [step for kind, step in events if kind == "preempted"]
    history = f"preempted at step {', '.join(preempted)} and resumed" if preempted else ""
    if kind == "done":
        return "finished", history
    if last_write is not None and now - last_write > stale_s:
        silence = f"no write for {format_duration(now - last_write)} and no end line (killed?)"
        return "stalled", "; ".join(filter(None, [silence, history]))
    return "running", history


def read_run(run_dir: Path, folder: Path, now: float | None = None, stale_s: float = 3600.0) -> Run:
    """Everything the report shows about the run in `run_dir` (named relative to `folder`)."""
    now = time.time() if now is None else now
    records = read_records(run_dir / "metrics.jsonl")
    events, wall = read_log(run_dir / "train.log")
    writes = [p.stat().st_mtime for p in (run_dir / "metrics.jsonl", run_dir / "train.log") if p.exists()]
    status, detail = status_of(events, max(writes) if writes else None, now, stale_s)
    train = last_per_step(records, "train/loss")
    tokens = last_per_step(records, "train/tokens_seen")
    speeds = [value for _, value in last_per_step(records, "perf/tokens_per_s")]
    if wall is None and records:
        wall = records[-1].get("time", 0.0) - records[0].get("time", 0.0)
    return Run(name=str(run_dir.relative_to(folder)) if run_dir != folder else run_dir.name, path=run_dir,
               overrides=read_overrides(run_dir), status=status, detail=detail, max_steps=read_max_steps(run_dir),
               step=train[-1][0] if train else None, tokens=int(tokens[-1][1]) if tokens else None,
               tokens_per_s=statistics.median(speeds) if speeds else None, wall_s=wall,
               val_curve=last_per_step(records, "val/loss"))


def format_duration(seconds: float) -> str:
    """H:MM:SS (MM:SS under an hour)."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"
