"""The loss-curve PNG of a run: train and val loss against step, and HellaSwag and lm-eval accuracies when
measured."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gpt2.utils.fs import open_run_file

ACCURACY_METRICS = ("acc", "acc_norm", "exact_match")
"""lm-eval metrics (`lm_eval/<task>/<metric>[,<filter>]`) that are shares in [0, 1], plotted next to HellaSwag's."""


def _accuracies(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of HellaSwag's acc_norm and acc and of each lm-eval accuracy, by metric name."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for key, value in r.items():
            metric = key.rsplit("/", 1)[-1].split(",")[0]
            if key in ("hellaswag/acc_norm", "hellaswag/acc") or (key.startswith("lm_eval/")
                                                                  and metric in ACCURACY_METRICS):
                series.setdefault(key, []).append((r["step"], value))
    return series


def plot_loss_curve(records: list[dict[str, Any]], out_path: str | Path) -> None:
    """Train and val loss against step; a second panel with the HellaSwag and lm-eval accuracies when measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r and math.isfinite(r["train/loss"])]
    val = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    acc = _accuracies(records)
    if not train and not val:
        return
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(12 if acc else 7, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if acc:
        ax = axes[0, 1]
        for key, points in acc.items():
            style = "s--" if key == "hellaswag/acc" else "o-"
            ax.plot(*zip(*points), style, label=key.removeprefix("lm_eval/"), alpha=0.7 if style == "s--" else 1.0)
        if "hellaswag/acc_norm" in acc:
            ax.axhline(0.25, color="gray", linestyle=":", label="HellaSwag chance")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with open_run_file(out_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
