"""Run logging: console lines (also in train.log via Hydra's file handler), metrics.jsonl,
Weights & Biases, and a loss-curve PNG. Only rank 0 creates a `RunLogger` that writes."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

# Imported here, not lazily: importing rich draws from Python's `random`, and a run's RNG state must not
# depend on when (or whether) a progress bar first appears (seeding happens after this import).
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gpt2.config import LoggerConfig, TrainConfig, UserError, to_dict

log = logging.getLogger("gpt2")

# Dense bf16 peak FLOP/s per device, by substring of torch.cuda.get_device_name().
PEAK_FLOPS_BF16: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}


def detect_peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s for a known GPU name, else None (MFU is then not reported)."""
    if not device_name:
        return None
    for key, flops in PEAK_FLOPS_BF16.items():
        if key in device_name:
            return flops
    return None


class Throughput:
    """Training time between log lines (evals and saves excluded): tokens/s, MFU and ETA."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float | None) -> None:
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_token * tokens_per_step
        self.peak_flops = peak_flops  # of all ranks together
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def flush(self) -> tuple[dict[str, float], float]:
        """perf/tokens_per_s (+ perf/mfu with a known peak) since the last flush, and the seconds per
        step (for an ETA); then start over."""
        dt = max(self.seconds, 1e-9)
        out = {"perf/tokens_per_s": self.steps * self.tokens_per_step / dt}
        if self.peak_flops:
            out["perf/mfu"] = self.flops_per_step * self.steps / dt / self.peak_flops
        per_step = dt / max(self.steps, 1)
        self.seconds, self.steps = 0.0, 0
        return out, per_step


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


RUN_FILES = (".hydra", "train.log", "metrics.jsonl", "loss.png")
"""What a run writes at the top of its run directory (checkpoints are built under new temporary names)."""


def symlink_refusal(path: Path) -> str:
    """The message for a symbolic link planted where a run writes one of its own files."""
    return (f"{path} is a symbolic link (to {os.readlink(path)}); a run writes only its own files, so it is not "
            f"followed. Remove the link (rm {path}) or pick another run dir.")


def open_run_file(path: str | Path, mode: str = "a") -> IO[Any]:
    """Open a file in a run directory for writing ("a", "w" or "wb") without following a symbolic link:
    a link planted where metrics.jsonl or loss.png belongs could point at any other file. A link is a
    UserError (one `error:` line) and its target stays untouched."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if mode.startswith("a") else os.O_TRUNC
    path = Path(path)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        if path.is_symlink():
            raise UserError(symlink_refusal(path)) from None
        raise UserError(f"cannot write {path}: {err.strerror}; check the run directory's permissions and free "
                        f"space.") from None
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def check_output_file(key: str, value: str | Path) -> Path:
    """Check, before any slow work, that `key=value` names a file that can be written (an existing
    writable file, or a new one in a writable folder, created if missing); returns the path."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise UserError(f"{key}={value} is a directory; give a file path, e.g. {key}={path / 'samples.txt'}.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders that will be created
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{key}={value}: {folder} is not a directory; give a path in a writable folder.")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{key}={value} is not writable ({path if path.exists() else folder} is read-only or not "
                        f"yours); give a path in a writable folder.")
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` (creating its folder) through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_summary(steps: int, tokens: int, seconds: float, val_loss: float, checkpoint: Path | None,
                plot: Path | None) -> str:
    """The end-of-run line: steps, tokens, time, final val loss, and where the checkpoint and plot are."""
    where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (checkpoint.save_final=false)"
    return (f"done: {steps:,} steps, {tokens:,} tokens in {format_duration(seconds)}; final val loss {val_loss:.4f}; "
            f"{where}; loss plot {plot if plot else '(none)'}")


class RunLogger:
    """Writes metrics to metrics.jsonl, the console/train.log, and W&B (when enabled)."""

    def __init__(self, output_dir: str | Path, cfg: TrainConfig, wandb_run_id: str | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._metrics_file = open_run_file(self.metrics_path, "a")
        if _torn_last_line(self.metrics_path):  # a resumed run appends; a crash may have cut the last line
            self._metrics_file.write("\n")
        self.wandb_run: Any = None
        if cfg.logger.name == "wandb":
            self.wandb_run = self._init_wandb(cfg, wandb_run_id)

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def _init_wandb(self, cfg: TrainConfig, run_id: str | None) -> Any:
        import wandb

        lcfg: LoggerConfig = cfg.logger
        mode = lcfg.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        run = wandb.init(
            project=lcfg.project,
            entity=lcfg.entity,
            name=lcfg.run_name or _default_run_name(self.output_dir),
            tags=list(lcfg.tags),
            mode=mode,
            dir=str(self.output_dir),
            config=to_dict(cfg),
            id=run_id,
            resume="allow" if run_id else None,
            reinit="finish_previous",
        )
        log.info("W&B run %s (%s) in %s", run.id, mode, self.output_dir / "wandb")
        return run

    def log_train(self, step: int, max_steps: int, metrics: dict[str, float], eta_s: float) -> None:
        """One training record with its console line (loss, lr, grad norm, tok/s, MFU, ETA)."""
        mfu = f" mfu {metrics['perf/mfu']:.1%}" if "perf/mfu" in metrics else ""
        self.log(step, metrics, f"step {step}/{max_steps} loss {metrics['train/loss']:.4f} "
                                f"lr {metrics['train/lr']:.2e} norm {metrics['train/grad_norm']:.2f} "
                                f"{metrics['perf/tokens_per_s']:,.0f} tok/s{mfu} eta {format_duration(eta_s)}")

    def log_eval(self, step: int, metrics: dict[str, float], sample: str | None) -> None:
        """One evaluation record (val loss, HellaSwag when present) with its console line, and the sample."""
        line = (f"step {step}: val loss {metrics['val/loss']:.4f} (ppl {metrics['val/perplexity']:.1f}, "
                f"{int(metrics['val/tokens']):,} tokens)")
        if "hellaswag/acc_norm" in metrics:
            line += (f" hellaswag acc_norm {metrics['hellaswag/acc_norm']:.4f} acc {metrics['hellaswag/acc']:.4f} "
                     f"({int(metrics['hellaswag/items']):,} items)")
        self.log(step, metrics, line)
        if sample is not None:
            self.log_text(step, "sample", sample)

    def log(self, step: int, metrics: dict[str, float], console: str | None = None) -> None:
        """Append one record to metrics.jsonl (flushed), send it to W&B, print `console`."""
        record = {"step": step, "time": time.time(), **metrics}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if console:
            log.info(console)

    def log_text(self, step: int, name: str, text: str) -> None:
        """A text sample: into train.log, metrics.jsonl and W&B (as a table row)."""
        log.info("%s @ step %d:\n%s", name, step, text)
        self._metrics_file.write(json.dumps({"step": step, "time": time.time(), name: text}) + "\n")
        self._metrics_file.flush()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Html(f"<pre>{_html_escape(text)}</pre>")}, step=step)

    def finish(self) -> None:
        """Close files, write the loss-curve PNG, and finish the W&B run (called in `finally`; again is a no-op)."""
        if self._metrics_file.closed:
            return
        self._metrics_file.close()
        try:
            plot_loss_curve(self.metrics_path, self.output_dir / "loss.png")
        except Exception as err:  # a plot must never hide the real outcome of a run
            log.warning("could not write loss plot: %s", err)
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _default_run_name(output_dir: Path) -> str:
    """The run dir's name; for a sweep job (`multirun/<date>/<time>/<num>`) `<time>/<num>`."""
    if output_dir.name.isdigit():
        return f"{output_dir.parent.name}/{output_dir.name}"
    return output_dir.name


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _torn_last_line(path: Path) -> bool:
    """True when the file is non-empty and does not end with a newline."""
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> None:
    """Train and val loss against step; a second panel with HellaSwag accuracy when it was measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
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


class ProgressBar:
    """A rich progress bar on an interactive console (rank 0), otherwise nothing."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-")

    def __enter__(self) -> ProgressBar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")
