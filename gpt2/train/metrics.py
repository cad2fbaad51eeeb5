"""Run logging: console lines (also in train.log via Hydra's file handler), metrics.jsonl, Weights & Biases,
TensorBoard event files (gpt2.train.tensorboard), and the loss-curve PNG at the end (gpt2.train.plot). Only
rank 0 creates a `RunLogger`."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from gpt2.config import LoggerConfig, TrainConfig
from gpt2.train.plot import plot_loss_curve
from gpt2.train.progress import format_duration
from gpt2.train.tensorboard import TensorBoardLog
from gpt2.utils.fs import open_run_file
from gpt2.utils.serialize import to_dict

log = logging.getLogger("gpt2")


class RunLogger:
    """Writes metrics to metrics.jsonl, the console/train.log, and W&B and TensorBoard (when enabled).
    `resumed_at`: the step of the checkpoint a resumed run started from (None for a new run)."""

    def __init__(self, output_dir: str | Path, cfg: TrainConfig, wandb_run_id: str | None = None,
                 resumed_at: int | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._metrics_file = open_run_file(self.metrics_path, "a")
        if _torn_last_line(self.metrics_path):  # a resumed run appends; a crash may have cut the last line
            self._metrics_file.write("\n")
        self.wandb_run: Any = None
        if cfg.logger.use_wandb:
            self.wandb_run = self._init_wandb(cfg, wandb_run_id)
        self.tensorboard = TensorBoardLog(self.output_dir, resumed_at) if cfg.logger.use_tensorboard else None

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
        sources = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("data/") and k.endswith("/tokens")}
        total = sum(sources.values()) or 1.0
        mix = " tokens " + " ".join(f"{n} {v / total:.1%}" for n, v in sources.items()) if sources else ""
        self.log(step, metrics, f"step {step}/{max_steps} loss {metrics['train/loss']:.4f} "
                                f"lr {metrics['train/lr']:.2e} norm {metrics['train/grad_norm']:.2f} "
                                f"{metrics['perf/tokens_per_s']:,.0f} tok/s{mfu} eta {format_duration(eta_s)}{mix}")

    def log_eval(self, step: int, metrics: dict[str, float], sample: str | None) -> None:
        """One evaluation record (val loss; HellaSwag and lm-eval metrics when present) with its console line,
        and the sample."""
        line = (f"step {step}: val loss {metrics['val/loss']:.4f} (ppl {metrics['val/perplexity']:.1f}, "
                f"{int(metrics['val/tokens']):,} tokens)")
        per_source = [f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items() if k.count("/") == 2
                      and k.startswith("val/") and k.endswith("/loss")]
        if per_source:
            line += " [" + ", ".join(per_source) + "]"
        if "hellaswag/acc_norm" in metrics:
            line += (f" hellaswag acc_norm {metrics['hellaswag/acc_norm']:.4f} acc {metrics['hellaswag/acc']:.4f} "
                     f"({int(metrics['hellaswag/items']):,} items)")
        lm_eval = [f"{k.removeprefix('lm_eval/')} {v:.4f}" for k, v in metrics.items() if k.startswith("lm_eval/")]
        if lm_eval:
            line += " lm_eval " + " ".join(lm_eval)
        self.log(step, metrics, line)
        if sample is not None:
            self.log_text(step, "sample", sample)

    def log(self, step: int, metrics: dict[str, float], console: str | None = None) -> None:
        """Append one record to metrics.jsonl (flushed), send it to W&B and TensorBoard, print `console`."""
        record = {"step": step, "time": time.time(), **metrics}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if self.tensorboard is not None:
            self.tensorboard.scalars(step, metrics, record["time"])
        if console:
            log.info(console)

    def log_text(self, step: int, name: str, text: str) -> None:
        """A text sample: into train.log, metrics.jsonl, W&B (as a table row) and TensorBoard (as text)."""
        log.info("%s @ step %d:\n%s", name, step, text)
        now = time.time()
        self._metrics_file.write(json.dumps({"step": step, "time": now, name: text}) + "\n")
        self._metrics_file.flush()
        if self.tensorboard is not None:
            self.tensorboard.text(step, name, text, now)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Html(f"<pre>{_html_escape(text)}</pre>")}, step=step)

    def finish(self) -> None:
        """Close files, write the loss-curve PNG, and finish the W&B run (called in `finally`; again is a no-op)."""
        if self._metrics_file.closed:
            return
        self._metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        try:
            plot_loss_curve(read_metrics(self.metrics_path), self.output_dir / "loss.png")
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


