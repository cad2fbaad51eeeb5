"""The sweep report's table: one row per run, the overrides that differ between runs as columns, sorted by final
val loss (runs without one last); as Markdown (printed and written) and CSV; and the PNG of every run's val-loss
curve, labelled with its differing overrides."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from gpt2.report.runs import Run, format_duration
from gpt2.utils.fs import atomic_write

UNSET = "-"
"""A differing override's cell for a run that did not set it (it ran with the config's value)."""


def differing_keys(runs: list[Run]) -> list[str]:
    """The override keys whose value is not the same in every run, in first-seen order."""
    keys = list(dict.fromkeys(k for run in runs for k in run.overrides))
    return [k for k in keys if len({run.overrides.get(k, UNSET) for run in runs}) > 1]


def label(run: Run, keys: list[str]) -> str:
    """A run's differing overrides (`optimizer.lr=3e-3 model=tiny`), or its name when nothing differs."""
    return " ".join(f"{k}={run.overrides.get(k, UNSET)}" for k in keys) or run.name


def sort_runs(runs: list[Run]) -> list[Run]:
    """By final val loss, lowest first; runs without one (failed early, still starting) after, in name order."""
    def key(run: Run) -> tuple[bool, float]:
        loss = run.final_val_loss
        return (loss is None or math.isnan(loss), loss if loss is not None and not math.isnan(loss) else 0.0)

    return sorted(runs, key=key)  # stable: equal keys keep the name order of find_runs


COLUMNS = ("status", "final val loss", "best val loss", "steps", "tokens", "tok/s", "wall time")


def row(run: Run, keys: list[str]) -> dict[str, object]:
    """The CSV row of a run: plain values (seconds, full-precision losses), None as empty."""
    return {"run": run.name, **{k: run.overrides.get(k, UNSET) for k in keys}, "status": run.status,
            "detail": run.detail, "final val loss": run.final_val_loss, "best val loss": run.best_val_loss,
            "steps": run.step, "max steps": run.max_steps, "tokens": run.tokens, "tok/s": run.tokens_per_s,
            "wall time (s)": run.wall_s}


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown(runs: list[Run], keys: list[str]) -> str:
    """The Markdown table (a terminal shows it as it is)."""
    header = ["run", *keys, *COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for run in runs:
        status = f"{run.status}: {run.detail}" if run.detail else run.status
        steps = "" if run.step is None else f"{run.step:,}" + (f"/{run.max_steps:,}" if run.max_steps else "")
        cells = [run.name, *(run.overrides.get(k, UNSET) for k in keys), status,
                 _cell(run.final_val_loss, ".4f"), _cell(run.best_val_loss, ".4f"), steps,
                 _cell(run.tokens, ","), _cell(run.tokens_per_s, ",.0f"),
                 "" if run.wall_s is None else format_duration(run.wall_s)]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(runs: list[Run], keys: list[str]) -> str:
    out = io.StringIO()
    rows = [row(run, keys) for run in runs]
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return out.getvalue()


def plot_val_curves(runs: list[Run], keys: list[str], out: Path) -> bool:
    """Every run's val loss against step in one PNG, the legend naming each run's differing overrides; False (and
    nothing written) when no run has a val loss yet."""
    curves = [(label(run, keys), run.val_curve) for run in runs if run.val_curve]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in curves:
        steps, losses = zip(*points)
        ax.plot(steps, losses, "o-" if len(points) < 30 else "-", label=name, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: long labels fit
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)
    return True
