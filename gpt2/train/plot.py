"""The loss-curve PNG of a run: train and val loss against step, and HellaSwag accuracy when measured."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gpt2.utils.fs import open_run_file


def plot_loss_curve(records: list[dict[str, Any]], out_path: str | Path) -> None:
    """Train and val loss against step; a second panel with HellaSwag accuracy when it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r and math.isfinite(r["train/loss"])]
    val = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
    hs = [(r["step"], r["hellaswag/acc_norm"], r["hellaswag/acc"]) for r in records if "hellaswag/acc_norm" in r]
    if not train and not val:
        return
    fig, axes = plt.subplots(1, 2 if hs else 1, figsize=(12 if hs else 7, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if hs:
        ax = axes[0, 1]
        steps, acc_norm, acc = zip(*hs)
        ax.plot(steps, acc_norm, "o-", label="acc_norm")
        ax.plot(steps, acc, "s--", label="acc", alpha=0.7)
        ax.axhline(0.25, color="gray", linestyle=":", label="chance")
        ax.set_xlabel("step")
        ax.set_ylabel("HellaSwag accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with open_run_file(out_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
