"""The body of run_eval.py: load a checkpoint or pretrained model, run the asked tasks (split over the ranks
when launched with torchrun), print a table and optionally write the results as JSON. `lm_eval:NAME` tasks
run together through lm-evaluation-harness (gpt2.evals.lm_eval_tasks, imported only when asked for), after ours;
their datasets are loaded before the model, so that a task that cannot be fetched fails at once."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any, TextIO

import torch

from gpt2.checkpoint.handle import Checkpoint, load_for_inference
from gpt2.config import DataConfig, DistributedConfig, EvalRunConfig, TokenizerConfig, TrainConfig
from gpt2.data.preprocess import prepare_on_ranks
from gpt2.errors import UserError
from gpt2.evals import hellaswag
from gpt2.evals.val_loss import ValWindows, select_windows, val_loss
from gpt2.runtime.device import autocast as autocast_for
from gpt2.runtime.device import resolve_precision
from gpt2.runtime.distributed import cleanup, init_distributed, main_rank_first
from gpt2.runtime.world import rank_and_world
from gpt2.tokenizers.factory import AnyTokenizer
from gpt2.utils.fs import atomic_write, check_writable


def _val_tokenizer(ckpt: Checkpoint | None, train_cfg: TrainConfig | None) -> TokenizerConfig:
    """The tokenizer a val split is encoded with: the checkpoint's own tokenizer.json (our BPE), else GPT-2's."""
    if ckpt is not None and ckpt.tokenizer_record.get("kind") == "hf":
        return TokenizerConfig(name="file", path=str(ckpt.path / str(ckpt.tokenizer_record.get("file"))))
    if train_cfg is not None and train_cfg.tokenizer.name == "gpt2":
        return train_cfg.tokenizer
    return TokenizerConfig()


def training_windows(n_tokens: int, block_size: int, train_cfg: TrainConfig, micro_batch_size: int) -> ValWindows:
    """The val windows a training run scores at every evaluation: the whole split up to eval.val_tokens, else a
    sample of that many tokens seeded by its seed, and at most eval.iters x `micro_batch_size` windows (the run
    plan's micro-batch; eval.iters=0: no cap)."""
    return select_windows(n_tokens, block_size, train_cfg.eval.val_tokens, train_cfg.seed,
                          max_windows=train_cfg.eval.iters * micro_batch_size)


def eval_windows(cfg: EvalRunConfig, ckpt: Checkpoint | None, n_tokens: int, block_size: int) -> ValWindows:
    """The val windows to score: by the val_tokens rule (the whole split up to val_tokens, else a seeded
    sample of that many tokens), or with match_training the exact windows the checkpoint's training run logged
    (`training_windows` with its config and the micro-batch its saved run plan records). `limit` keeps the
    first N windows."""
    if cfg.match_training:
        if ckpt is None:
            raise UserError("match_training=true reproduces a training run's val windows; it needs checkpoint=RUN, "
                            "not pretrained=.")
        train_cfg = ckpt.train_config
        micro = ckpt.plan.get("micro_batch_size")
        if micro is None and train_cfg.eval.iters > 0:
            raise UserError(f"match_training=true: {ckpt.path} does not record the micro-batch its run chose "
                            f"(micro_batch_size=auto in an older checkpoint format), so its eval.iters="
                            f"{train_cfg.eval.iters} cap cannot be reproduced; drop match_training.")
        windows = training_windows(n_tokens, block_size, train_cfg, int(micro or 0))
    else:
        defaults = ckpt.train_config if ckpt is not None else TrainConfig()
        val_tokens = cfg.val_tokens if cfg.val_tokens is not None else defaults.eval.val_tokens
        seed = cfg.seed if cfg.seed is not None else defaults.seed
        windows = select_windows(n_tokens, block_size, val_tokens, seed)
    if cfg.limit:
        windows = ValWindows(windows.starts[: cfg.limit], windows.skip[: cfg.limit], block_size,
                             full=windows.full and cfg.limit >= len(windows.starts),
                             n_split_tokens=windows.n_split_tokens)
    return windows


def run_val_loss(cfg: EvalRunConfig, ckpt: Checkpoint | None, model: torch.nn.Module, device: torch.device,
                 autocast: Any) -> dict[str, Any]:
    """val_loss on the checkpoint's (or cfg.data's) val split."""
    train_cfg = ckpt.train_config if ckpt is not None else None
    data: DataConfig | None = cfg.data or (train_cfg.data if train_cfg is not None else None)
    if data is None:
        raise UserError("val_loss needs a corpus: pass data=shakespeare|text|hf (with data.path=...) or run "
                        "tasks=[hellaswag] only.")
    block_size = cfg.block_size or (train_cfg.block_size if train_cfg else model.cfg.n_positions)
    if block_size > model.cfg.n_positions:
        raise UserError(f"block_size={block_size} exceeds the model's n_positions={model.cfg.n_positions}; "
                        f"lower block_size.")
    tokens = prepare_on_ranks(data, _val_tokenizer(ckpt, train_cfg)).stream("val")
    windows = eval_windows(cfg, ckpt, len(tokens), block_size)
    res = val_loss(model, tokens, windows, batch_size=cfg.batch_size, device=device, autocast=autocast)
    return {"loss": res.loss, "perplexity": res.perplexity, "tokens": res.n_tokens, "items": res.n_windows,
            "full_split": res.full, "split_tokens": windows.n_split_tokens, "block_size": block_size}


def run_hellaswag(cfg: EvalRunConfig, cache_dir: str, tokenizer: AnyTokenizer, model: torch.nn.Module,
                  device: torch.device, autocast: Any) -> dict[str, Any]:
    path = main_rank_first(lambda: hellaswag.resolve_path(cfg.hellaswag.path, cache_dir), "download HellaSwag")
    items = hellaswag.render(hellaswag.load_items(path, cfg.limit), tokenizer.encode_batch, model.cfg.n_positions)
    res = hellaswag.score(model, items, batch_size=cfg.batch_size, device=device, autocast=autocast)
    return {"acc": res.acc, "acc_norm": res.acc_norm, "items": res.n_items, "path": str(path)}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """task | metric | value | items | seconds, one row per metric."""
    metrics = {"val_loss": ("loss", "perplexity", "tokens"), "hellaswag": ("acc", "acc_norm")}
    rows = [("task", "metric", "value", "items", "seconds")]
    for task, res in results.items():
        for m in metrics[task]:
            value = f"{res[m]:,}" if isinstance(res[m], int) else f"{res[m]:.4f}"
            rows.append((task, m, value, f"{res['items']:,}", f"{res['seconds']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_evals(cfg: EvalRunConfig, out: TextIO = sys.stdout) -> dict[str, Any]:
    """Run cfg.tasks on the model named by cfg; every rank returns the same results, rank 0 prints."""
    cfg.check()
    rank, world_size = rank_and_world()
    # Rank 0 alone writes output_file, so it alone checks it (before loading): a check creates and removes
    # the folder, which would pull it from under another rank's check.
    output_file = check_writable("output_file", cfg.output_file) if cfg.output_file and rank == 0 else None
    dist = init_distributed(DistributedConfig(name="ddp" if world_size > 1 else "none"), cfg.device)
    try:
        precision = resolve_precision(cfg.dtype, dist.device)

        def autocast() -> contextlib.AbstractContextManager:
            return autocast_for(dist.device, precision)

        lm_loaded = None  # the lm_eval:NAME tasks, loaded before the model: a dataset that cannot be fetched fails now
        if cfg.lm_eval_tasks:
            from gpt2.evals import lm_eval_model, lm_eval_tasks

            lm_loaded = lm_eval_tasks.load_tasks(cfg.lm_eval_tasks, cfg.lm_eval, key="lm_eval")
        model, tokenizer, ckpt = load_for_inference(cfg.checkpoint, cfg.pretrained, cfg.tokenizer.path,
                                                    None if cfg.checkpoint else cfg.cache_dir)
        model = model.to(dist.device).eval()
        cache_dir = ckpt.train_config.data.cache_dir if ckpt is not None else cfg.cache_dir
        results: dict[str, dict[str, Any]] = {}
        for task in cfg.tasks:
            t0 = time.perf_counter()
            if task == "val_loss":
                res = run_val_loss(cfg, ckpt, model, dist.device, autocast)
            elif task == "hellaswag":
                res = run_hellaswag(cfg, cache_dir, tokenizer, model, dist.device, autocast)
            else:
                continue
            res["seconds"] = time.perf_counter() - t0
            results[task] = res
        payload = {"model": cfg.checkpoint or cfg.pretrained, "device": str(dist.device), "precision": precision,
                   "world_size": dist.world_size, "results": results}
        if lm_loaded is not None:
            lm = lm_eval_model.GPTLM(model, tokenizer, batch_size=cfg.batch_size, device=dist.device,
                                     autocast=autocast)
            payload["lm_eval"] = lm_eval_tasks.evaluate(lm, lm_loaded, cfg.lm_eval, cfg.limit)
        if dist.is_main:
            if results:
                out.write(format_table(results) + "\n")
            if lm_loaded is not None:
                out.write(lm_eval_tasks.table(payload["lm_eval"]) + "\n")
            out.flush()
            if output_file is not None:
                try:
                    atomic_write(output_file, json.dumps(payload, indent=2) + "\n")
                except OSError as err:
                    raise UserError(f"could not write output_file={cfg.output_file}: {err.strerror or err}; the "
                                    f"results are in the table above.") from None
        return payload
    finally:
        cleanup()
