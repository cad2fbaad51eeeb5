"""The body of run_eval.py: load a checkpoint or pretrained model, run the asked tasks (split over the
ranks when launched with torchrun), print a table and optionally write the results as JSON."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, TextIO

import torch

from gpt2.config import DataConfig, DistributedConfig, EvalRunConfig, TokenizerConfig, TrainConfig, UserError, from_dict
from gpt2.data.shards import TokenStream
from gpt2.evals import hellaswag
from gpt2.evals.val_loss import select_windows, val_loss
from gpt2.train.metrics import check_output_file, write_text_atomic


def _train_config(cfg: EvalRunConfig) -> TrainConfig | None:
    """The training config saved with the checkpoint (None for a pretrained model)."""
    if cfg.checkpoint is None:
        return None
    from gpt2.checkpoint.format import read_meta, resolve_checkpoint

    saved = read_meta(resolve_checkpoint(cfg.checkpoint)).get("config") or {}
    return from_dict(TrainConfig, saved)


def _tokenizer_config(cfg: EvalRunConfig, train_cfg: TrainConfig | None) -> TokenizerConfig:
    """The tokenizer a val split is encoded with: the checkpoint's own tokenizer.json (our BPE), else GPT-2's."""
    if cfg.checkpoint is not None:
        from gpt2.checkpoint.format import read_meta, resolve_checkpoint
        from gpt2.tokenizers.bpe import TOKENIZER_FILE

        ckpt = resolve_checkpoint(cfg.checkpoint)
        if (read_meta(ckpt).get("tokenizer") or {}).get("kind") == "hf":
            return TokenizerConfig(name="file", path=str(ckpt / TOKENIZER_FILE))
    if train_cfg is not None and train_cfg.tokenizer.name == "gpt2":
        return train_cfg.tokenizer
    return TokenizerConfig()


def open_val_split(data: DataConfig, tokenizer: TokenizerConfig | None = None) -> TokenStream:
    """The prepared val split of `data` as one token stream over its shards (prepared on rank 0 first)."""
    from gpt2.data.loader import prepare_on_main_rank

    return prepare_on_main_rank(data, int(os.environ.get("RANK", "0")) == 0, tokenizer=tokenizer).stream("val")


def run_val_loss(cfg: EvalRunConfig, train_cfg: TrainConfig | None, model: torch.nn.Module, device: torch.device,
                 autocast: Any) -> dict[str, Any]:
    """val_loss on the checkpoint's (or cfg.data's) val split, on the windows its training logged."""
    data = cfg.data or (train_cfg.data if train_cfg is not None else None)
    if data is None:
        raise UserError("val_loss needs a corpus: pass data=shakespeare|text|hf (with data.path=...) or run "
                        "tasks=[hellaswag] only.")
    block_size = cfg.block_size or (train_cfg.block_size if train_cfg else model.cfg.n_positions)
    if block_size > model.cfg.n_positions:
        raise UserError(f"block_size={block_size} exceeds the model's n_positions={model.cfg.n_positions}; "
                        f"lower block_size.")
    defaults = train_cfg or TrainConfig()
    val_tokens = cfg.val_tokens if cfg.val_tokens is not None else defaults.eval.val_tokens
    seed = cfg.seed if cfg.seed is not None else defaults.seed
    max_windows = defaults.eval_iters * defaults.micro_batch_size if train_cfg is not None else 0
    tokens = open_val_split(data, _tokenizer_config(cfg, train_cfg))
    windows = select_windows(len(tokens), block_size, val_tokens, seed, max_windows=max_windows)
    if cfg.limit:
        windows = type(windows)(windows.starts[: cfg.limit], windows.skip[: cfg.limit], block_size,
                                full=windows.full and cfg.limit >= len(windows.starts),
                                n_split_tokens=windows.n_split_tokens)
    res = val_loss(model, tokens, windows, batch_size=cfg.batch_size, device=device, autocast=autocast)
    return {"loss": res.loss, "perplexity": res.perplexity, "tokens": res.n_tokens, "items": res.n_windows,
            "full_split": res.full, "split_tokens": windows.n_split_tokens, "block_size": block_size}


def run_hellaswag(cfg: EvalRunConfig, cache_dir: str, tokenizer: Any, model: torch.nn.Module, device: torch.device,
                  autocast: Any) -> dict[str, Any]:
    from gpt2.runtime.distributed import barrier

    path = None
    if int(os.environ.get("RANK", "0")) == 0:
        path = hellaswag.resolve_path(cfg.hellaswag.path, cache_dir)
    barrier()
    if path is None:
        path = hellaswag.resolve_path(cfg.hellaswag.path, cache_dir)
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
    from gpt2.checkpoint.format import RESUME_FIX
    from gpt2.generate.sampling import load_model
    from gpt2.runtime.device import autocast as autocast_for
    from gpt2.runtime.device import resolve_precision
    from gpt2.runtime.distributed import cleanup, init_distributed
    from gpt2.tokenizers.bpe import for_inference

    cfg.check()
    output_file = check_output_file("output_file", cfg.output_file) if cfg.output_file else None  # before loading
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dist = init_distributed(DistributedConfig(name="ddp" if world_size > 1 else "none"), cfg.device)
    try:
        train_cfg = _train_config(cfg)
        precision = resolve_precision(cfg.dtype, dist.device)

        def autocast() -> contextlib.AbstractContextManager:
            return autocast_for(dist.device, precision)

        model = load_model(cfg.checkpoint, cfg.pretrained).to(dist.device).eval()
        cache_dir = train_cfg.data.cache_dir if train_cfg is not None else cfg.cache_dir
        tok_path = cfg.tokenizer_path or (train_cfg.data.tokenizer_path if train_cfg is not None else None)
        results: dict[str, dict[str, Any]] = {}
        for task in cfg.tasks:
            t0 = time.perf_counter()
            if task == "val_loss":
                res = run_val_loss(cfg, train_cfg, model, dist.device, autocast)
            else:
                tokenizer = for_inference(cfg.checkpoint, cfg.pretrained, tok_path, RESUME_FIX, cache_dir)
                res = run_hellaswag(cfg, cache_dir, tokenizer, model, dist.device, autocast)
            res["seconds"] = time.perf_counter() - t0
            results[task] = res
        payload = {"model": cfg.checkpoint or cfg.pretrained, "device": str(dist.device), "precision": precision,
                   "world_size": dist.world_size, "results": results}
        if dist.is_main:
            out.write(format_table(results) + "\n")
            out.flush()
            if output_file is not None:
                write_text_atomic(output_file, json.dumps(payload, indent=2) + "\n")
        return payload
    finally:
        cleanup()
