"""Training throughput: our Trainer.train_step vs Hugging Face GPT2LMHeadModel + torch.optim.AdamW.

Both sides train the same shape (random weights, random tokens, dropout 0) at the same precision
(autocast), with or without torch.compile, in one process. Steps alternate ours / HF so that load
from other processes hits both alike; tokens/s is the median over the timed steps after warm-up.

Ours is exactly what training runs: a run assembled by `gpt2.train.assembly.build_run` (random batches in place
of the prepared corpus) stepped by `gpt2.train.trainer.Trainer.train_step` (lr schedule, autocast forward +
backward, foreach grad-norm clip, AdamW from `gpt2.train.optim.build_optimizer` -- fused where supported).
HF is the usual loop: `model(input_ids, labels=...)`, backward, `clip_grad_norm_`, `torch.optim.AdamW`
with its defaults (not fused), `zero_grad`.

    .venv/bin/python benchmarks/train_throughput.py                       # CPU: tiny, fp32/bf16, compile off/on
    .venv/bin/python benchmarks/train_throughput.py --shapes 124m --compile off   # then --compile on
    .venv/bin/python benchmarks/train_throughput.py --shapes tiny --precisions fp32 --compile off
    .venv/bin/python benchmarks/train_throughput.py --device cuda --shapes 124m-gpu --precisions bf16 --compile on
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from common import default_out, environment, fmt, markdown_table, median, write_json

from gpt2.config import EvalConfig, ModelConfig, OptimizerConfig, PrecisionConfig, SchedulerConfig, TrainConfig
from gpt2.model.gpt import GPT
from gpt2.model.presets import model_preset
from gpt2.runtime.device import DTYPES, autocast, detect_peak_flops, set_tf32
from gpt2.runtime.distributed import DistInfo
from gpt2.train.assembly import RunData, build_run
from gpt2.train.evaluation import ValSplit
from gpt2.train.plan import Vocabulary
from gpt2.train.trainer import Trainer


@dataclass(frozen=True)
class Shape:
    preset: str
    """gpt2/conf/model/<preset>.yaml gives the architecture."""
    batch: int
    seq: int
    warmup: int
    """Default warm-up steps per model (the first one includes compilation)."""
    steps: int
    """Default timed steps per model."""


SHAPES = {
    "tiny": Shape("tiny", 12, 64, warmup=3, steps=20),
    "124m": Shape("gpt2", 4, 256, warmup=2, steps=5),
    "124m-gpu": Shape("gpt2", 16, 1024, warmup=5, steps=20),
}


class RandomBatches:
    """Stands in for TokenLoader: the same random (x, y) batch every step, already on the device."""

    def __init__(self, vocab: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        data = torch.randint(0, vocab, (batch, seq + 1), generator=g)  # (B, T+1)
        self.x, self.y = data[:, :-1].contiguous().to(device), data[:, 1:].contiguous().to(device)
        self.tokens = data[0].numpy()  # (T+1,): one val window, so the Trainer can be built (it never evaluates)

    def source_tokens(self) -> dict[str, int]:
        return {}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_ours(cfg: ModelConfig, shape: Shape, precision: str, compile_: bool, device: torch.device,
               out_dir: str) -> Callable[[], float]:
    """Trainer.train_step on a fresh GPT (what `run_train.py` builds, minus the metrics logger and data prep)."""
    train_cfg = TrainConfig(model=cfg, optimizer=OptimizerConfig(), scheduler=SchedulerConfig(warmup_steps=10),
                            precision=PrecisionConfig(name=precision), eval=EvalConfig(sample_tokens=0),
                            micro_batch_size=shape.batch,
                            block_size=shape.seq, total_batch_tokens=shape.batch * shape.seq, compile=compile_,
                            device=device.type, max_steps=10_000)
    batches = RandomBatches(cfg.vocab_size, shape.batch, shape.seq, device)
    data = RunData(batches, [ValSplit("", 1.0, batches.tokens)],  # type: ignore[arg-type]
                   Vocabulary(int(cfg.vocab_size or 50257), "benchmark"))
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=device)
    run = build_run(train_cfg, dist, out_dir, data=data, model=GPT(cfg), log_metrics=False)  # compiles per compile_
    trainer = Trainer(run)
    return lambda: trainer.train_step()["train/loss"]


def build_hf(cfg: ModelConfig, shape: Shape, precision: str, compile_: bool,
             device: torch.device) -> Callable[[], float]:
    """A plain HF training step at the same shape and precision."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        layer_norm_epsilon=cfg.layer_norm_epsilon, activation_function="gelu_new",
                        attn_implementation="sdpa")
    model: torch.nn.Module = GPT2LMHeadModel(hf_cfg).to(device).train()
    if compile_:
        model = torch.compile(model)
    opt_cfg = OptimizerConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2),
                                  eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
    batches = RandomBatches(cfg.vocab_size, shape.batch, shape.seq, device)

    def step() -> float:
        x, _ = batches.next_batch()
        with autocast(device, precision):
            loss = model(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def run_config(shape_name: str, precision: str, compile_: bool, device: torch.device, warmup: int, steps: int,
               peak: float | None) -> dict[str, Any]:
    shape = SHAPES[shape_name]
    cfg = model_preset(shape.preset)
    tokens = shape.batch * shape.seq
    row: dict[str, Any] = {"shape": shape_name, "batch": shape.batch, "seq": shape.seq, "precision": precision,
                           "compile": compile_, "warmup": warmup, "steps": steps}
    flops_per_token = GPT(dataclasses.replace(cfg)).flops_per_token(shape.seq) if peak else None
    runners: dict[str, Callable[[], float]] = {}
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out_dir:
        torch.manual_seed(0)
        for name, build in (("ours", lambda: build_ours(cfg, shape, precision, compile_, device, out_dir)),
                            ("hf", lambda: build_hf(cfg, shape, precision, compile_, device))):
            try:
                runners[name] = build()
            except Exception as e:  # a failing build (or compile) is a table entry, not a crash
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        first_step_s: dict[str, float] = {}
        for i in range(warmup + steps):  # alternate ours / HF every step
            for name in ("ours", "hf"):
                if name not in runners:
                    continue
                try:
                    sync(device)
                    t0 = time.perf_counter()
                    loss = runners[name]()
                    sync(device)
                    dt = time.perf_counter() - t0
                except Exception as e:
                    errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    traceback.print_exc()
                    del runners[name]
                    continue
                if not math.isfinite(loss):
                    errors[name] = f"loss {loss}"
                if i == 0:
                    first_step_s[name] = dt
                if i >= warmup:
                    times[name].append(dt)
    for name in ("ours", "hf"):
        if times[name] and name not in errors:
            tok_s = tokens / median(times[name])
            row[f"{name}_tok_s"] = tok_s
            row[f"{name}_step_ms"] = 1000 * median(times[name])
            row[f"{name}_first_step_s"] = first_step_s.get(name)
            row[f"{name}_mfu"] = tok_s * flops_per_token / peak if peak and flops_per_token else None
        else:
            row[f"{name}_tok_s"] = None
            row[f"{name}_error"] = errors.get(name, "no timed steps")
    if row["ours_tok_s"] and row["hf_tok_s"]:
        row["ratio"] = row["ours_tok_s"] / row["hf_tok_s"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["shape (BxT)", "precision", "compile", "ours tok/s", "HF tok/s", "ours/HF", "ours MFU", "HF MFU",
               "first step ours/HF (s)"]
    out = []
    def cell(r: dict[str, Any], name: str) -> str:
        return fmt(r.get(f"{name}_tok_s")) if r.get(f"{name}_tok_s") else f"FAILED ({r.get(f'{name}_error')})"

    for r in rows:
        first = "/".join(fmt(r.get(f"{n}_first_step_s"), ".1f") for n in ("ours", "hf"))
        out.append([f"{r['shape']} ({r['batch']}x{r['seq']})", r["precision"], "on" if r["compile"] else "off",
                    cell(r, "ours"), cell(r, "hf"), fmt(r.get("ratio"), ".2f") + ("x" if r.get("ratio") else ""),
                    fmt(r.get("ours_mfu"), ".1%"), fmt(r.get("hf_mfu"), ".1%"), first])
    return markdown_table(headers, out)


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Ours at its best setting vs HF at its default (fp32, eager), per shape."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape and r.get("ours_tok_s")]
        base = [r for r in mine if r.get("hf_tok_s") and r["precision"] == "fp32" and not r["compile"]]
        hf_best = max((r for r in rows if r["shape"] == shape and r.get("hf_tok_s")), key=lambda r: r["hf_tok_s"],
                      default=None)
        if not mine:
            continue
        best = max(mine, key=lambda r: r["ours_tok_s"])
        setting = f"{best['precision']}, compile {'on' if best['compile'] else 'off'}"
        line = f"- {shape}: ours best = {best['ours_tok_s']:,.0f} tok/s ({setting})"
        if base:
            ref = base[0]["hf_tok_s"]
            line += f"; vs HF fp32 eager {ref:,.0f} tok/s: {best['ours_tok_s'] / ref:.2f}x"
        if hf_best:
            hs = f"{hf_best['precision']}, compile {'on' if hf_best['compile'] else 'off'}"
            ref = hf_best["hf_tok_s"]
            line += f"; vs HF best {ref:,.0f} tok/s ({hs}): {best['ours_tok_s'] / ref:.2f}x"
        lines.append(line)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny",
                   help=f"comma list of {', '.join(SHAPES)} (default tiny; 124m takes ~4 min per compile setting on 2 "
                        "CPU cores)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (default fp32,bf16)")
    p.add_argument("--compile", default="both", choices=("off", "on", "both"), help="torch.compile (default both)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default: per shape)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per model (default: per shape)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="peak FLOP/s of the device for MFU (default: known GPUs; CPU: MFU n/a)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=str(default_out("train_throughput")), help="JSON output path")
    args = p.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_tf32(device, True)  # the trainer's default (precision.tf32=true)
    peak = args.peak_flops or (detect_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda"
                               else None)
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    t_start = time.perf_counter()
    env = environment(args.device)
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            p.error(f"--shapes: {shape!r} is not one of {', '.join(SHAPES)}")
        for precision in args.precisions.split(","):
            if precision not in DTYPES:
                p.error(f"--precisions: {precision!r} is not one of {', '.join(DTYPES)}")
            for compile_ in compiles:
                s = SHAPES[shape]
                warmup = s.warmup if args.warmup is None else args.warmup
                steps = s.steps if args.steps is None else args.steps
                t0 = time.perf_counter()
                row = run_config(shape, precision, compile_, device, warmup, steps, peak)
                row["wall_s"] = round(time.perf_counter() - t0, 1)
                print(f"{shape} {precision} compile={compile_}: ours {fmt(row.get('ours_tok_s'))} tok/s, "
                      f"HF {fmt(row.get('hf_tok_s'))} tok/s ({row['wall_s']} s)", flush=True)
                rows.append(row)
    print()
    print(table(rows))
    print()
    print("\n".join(summary(rows)))
    print(f"\n{env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, device {args.device}"
          f"{' ' + env['gpu'] if 'gpu' in env else ''}; load average at start {env['load_average_start']}; "
          f"total {time.perf_counter() - t_start:.0f} s")
    path = write_json(args.out, {"benchmark": "train_throughput", "device": args.device, "peak_flops": peak,
                                 "environment": env, "rows": rows, "summary": summary(rows)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
