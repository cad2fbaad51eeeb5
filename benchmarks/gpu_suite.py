"""Every GPU figure of the GPU benchmark in one run (< 6 minutes on one H100/H200), driven by benchmarks/gpu.sh.

1. Training step, 124M, T1024, bf16 autocast + torch.compile + fused AdamW, random tokens, at B16 and B64:
   our GPT (vocabulary padded to 64, as on CUDA by default), HF GPT2LMHeadModel, and nanoGPT's `GPT` when
   NANOGPT_DIR points at a checkout of karpathy/nanoGPT -- all in the SAME loop (forward + loss, backward,
   grad clip 1.0, fused AdamW step, zero_grad; one host sync at the end of the timed steps). tok/s, MFU
   (6N + 12 L H Q T FLOPs per token with the unpadded 124M N, the same number for every model, over the
   GPU's peak bf16 FLOP/s) and peak memory.
2. `run_train.py` end to end at the best settings (compile, bf16, micro_batch_size=auto, padded vocab):
   its own logged tok/s and MFU (the last log interval, after compilation); then the same for the speedrun
   recipe's model and optimizer (`experiment=gpt2_124m_speedrun` on the same data and batch), so the two
   compare in one run.
3. Decoding, 124M bf16, 16-token prompt + 200 new tokens, greedy, batch 1 and 16: ours eager, ours CUDA
   graph, HF `generate`; greedy tokens compared with HF (bf16, and fp32 at batch 1).

Configurations run in priority order and a time budget (--budget-s) skips what would not fit; every
result goes to the JSON as soon as it is measured. `--tiny` runs the same code on tiny shapes (CPU is
fine: the CUDA-only parts -- graph decoding, memory stats, micro_batch_size=auto -- are reported as
skipped) so the plumbing can be checked without a GPU.

    benchmarks/gpu.sh                     # on the GPU machine (see benchmarks/RESULTS.md)
    python benchmarks/gpu_suite.py --tiny --device cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import ROOT, environment, fmt, markdown_table, write_json

from gpt2.config import ModelConfig
from gpt2.generate.decoders import release_graphs
from gpt2.generate.sampling import generate
from gpt2.model.gpt import GPT
from gpt2.model.hf import gpt_to_hf, hf_config_dict
from gpt2.model.presets import model_preset
from gpt2.runtime.device import detect_peak_flops

START = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - START


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


# ------------------------------------------------------------------ models for the training loop


def fused_adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The one optimizer for every model: AdamW, decay on >= 2-D weights (nanoGPT's groups), fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def build_ours(cfg: ModelConfig, pad: int) -> tuple[torch.nn.Module, Callable[[Any, torch.Tensor, torch.Tensor], Any]]:
    model = GPT(dataclasses.replace(cfg, pad_vocab_multiple=pad))
    return model, lambda m, x, y: m(x, y).loss


def build_hf(cfg: ModelConfig) -> tuple[torch.nn.Module, Callable[[Any, torch.Tensor, torch.Tensor], Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(**{**hf_config_dict(cfg), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                           "attn_implementation": "sdpa"})
    return GPT2LMHeadModel(hf_cfg), lambda m, x, y: m(input_ids=x, labels=x).loss  # HF shifts labels itself


def build_nanogpt(cfg: ModelConfig) -> tuple[torch.nn.Module, Callable[[Any, torch.Tensor, torch.Tensor], Any]]:
    """nanoGPT's model.py from $NANOGPT_DIR (its own 50304-row padded vocabulary, as in its train.py)."""
    directory = os.environ.get("NANOGPT_DIR")
    if not directory or not (Path(directory) / "model.py").is_file():
        raise FileNotFoundError("set NANOGPT_DIR to a checkout of karpathy/nanoGPT (with model.py)")
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(directory) / "model.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    conf = module.GPTConfig(block_size=cfg.n_positions, vocab_size=50304, n_layer=cfg.n_layer, n_head=cfg.n_head,
                            n_embd=cfg.n_embd, dropout=0.0, bias=True)
    return module.GPT(conf), lambda m, x, y: m(x, y)[1]


def train_row(name: str, batch: int, seq: int, cfg: ModelConfig, device: torch.device, compile_: bool,
              warmup: int, steps: int, flops_per_token: float, peak: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"kind": "train", "model": name, "batch": batch, "seq": seq, "compile": compile_}
    try:
        _measure_training(row, name, batch, seq, cfg, device, compile_, warmup, steps)
        row["mfu"] = row["tok_s"] * flops_per_token / peak if peak else None
    except Exception as e:  # a missing nanoGPT, an OOM or a compile failure is a table entry, not a crash
        row["error"] = short_error(e)
        if not isinstance(e, FileNotFoundError):
            traceback.print_exc()
    finally:
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _measure_training(row: dict[str, Any], name: str, batch: int, seq: int, cfg: ModelConfig, device: torch.device,
                      compile_: bool, warmup: int, steps: int) -> None:
    builders = {"ours": lambda: build_ours(cfg, 64), "ours (pad 1)": lambda: build_ours(cfg, 1),
                "hf": lambda: build_hf(cfg), "nanogpt": lambda: build_nanogpt(cfg)}
    torch.manual_seed(0)
    model, loss_fn = builders[name]()
    model = model.to(device).train()
    optimizer = fused_adamw(model, device)
    step_model = torch.compile(model) if compile_ else model
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(step_model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    t0 = time.perf_counter()
    step()
    sync(device)
    row["first_step_s"] = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    sync(device)
    dt = time.perf_counter() - t0
    row["loss_last"] = float(losses[-1])
    row["tok_s"] = steps * batch * seq / dt
    row["step_ms"] = 1000 * dt / steps
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


# ------------------------------------------------------------------ run_train.py end to end


E2E_RECIPES = {"baseline": [], "speedrun": ["experiment=gpt2_124m_speedrun"]}
"""The end-to-end runs: GPT-2 with today's defaults, and the speedrun recipe (its model switches, Muon, wsd)."""


def run_train_row(args: argparse.Namespace, device: torch.device, out_dir: Path, recipe: str) -> dict[str, Any]:
    """`python run_train.py` as a user runs it; tok/s and MFU read from its metrics.jsonl (last interval)."""
    gpu = ROOT / ".gpu"
    run_dir = out_dir / f"run_train_{recipe}"
    overrides = list(E2E_RECIPES[recipe])
    if args.tiny:
        overrides += ["model=tiny", "total_batch_tokens=2048", "micro_batch_size=8", "block_size=64",
                     "max_steps=6", "log_interval=2", "precision=auto", f"compile={str(device.type == 'cuda').lower()}"]
    else:
        overrides += ["model=gpt2", "compile=true", "precision=bf16", "block_size=1024", "total_batch_tokens=524288",
                     f"micro_batch_size={args.e2e_micro_batch}", f"max_steps={args.e2e_steps}",
                     f"log_interval={args.e2e_steps // 3}"]
    overrides += ["data=shakespeare", "eval.interval=0", "eval.hellaswag_interval=0", "eval.iters=1",
                  "eval.sample_prompt=", "logger=none",
                  "progress_bar=false", "checkpoint.save_final=false", "scheduler.warmup_steps=0",
                  f"device={device.type}", f"hydra.run.dir={run_dir}"]
    tokenizer = args.tokenizer_path or (gpu / "gpt2.tiktoken" if (gpu / "gpt2.tiktoken").is_file() else None)
    cache = args.cache_dir or (gpu / "cache" if (gpu / "cache").is_dir() else None)
    if tokenizer:
        overrides.append(f"tokenizer.path={tokenizer}")
    if cache:
        overrides.append(f"data.cache_dir={cache}")
    row: dict[str, Any] = {"kind": "run_train", "recipe": recipe, "overrides": overrides}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "run_train.py"), *overrides], capture_output=True, text=True,
                          timeout=args.e2e_timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    row["wall_s"] = time.perf_counter() - t0
    row["returncode"] = proc.returncode
    if proc.returncode != 0:
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return row
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    perf = [m for m in metrics if "perf/tokens_per_s" in m]
    if perf:
        row["tok_s"] = perf[-1]["perf/tokens_per_s"]
        row["mfu"] = perf[-1].get("perf/mfu")
        row["loss_last"] = perf[-1].get("train/loss")
    for line in (proc.stdout + proc.stderr).splitlines():
        if "micro_batch_size=auto" in line or "grad accumulation" in line:
            row.setdefault("log", []).append(line.strip()[-200:])
    return row


# ------------------------------------------------------------------ decoding


def decode_rows(args: argparse.Namespace, cfg: ModelConfig, device: torch.device) -> list[dict[str, Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours32 = GPT(dataclasses.replace(cfg, pad_vocab_multiple=64 if device.type == "cuda" else 1)).to(device).eval()
    hf32 = GPT2LMHeadModel(GPT2Config(**{**hf_config_dict(cfg), "attn_implementation": "sdpa"})).to(device).eval()
    hf32.load_state_dict(gpt_to_hf(ours32.state_dict(), cfg), strict=False)
    hf32.generation_config.eos_token_id = None
    hf32.generation_config.pad_token_id = 0
    dtype = torch.bfloat16
    ours, hf = ours32.to(dtype), hf32.to(dtype)
    n = args.new_tokens
    rows: list[dict[str, Any]] = []
    modes = ["eager", "graph"] if device.type == "cuda" else ["eager", "static"]

    def hf_run(model: Any, idx: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, use_cache=True,
                                  max_new_tokens=n, min_new_tokens=n)

    for batch in args.decode_batches:
        idx = torch.randint(0, cfg.vocab_size, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
        idx = idx.to(device)
        runs: dict[str, Callable[[], torch.Tensor]] = {
            f"ours {m}": (lambda m=m, idx=idx: generate(ours, idx, n, temperature=0.0, decode_mode=m)) for m in modes}
        runs["hf generate"] = lambda idx=idx: hf_run(hf, idx)
        outputs: dict[str, torch.Tensor] = {}
        for name, run in runs.items():
            row: dict[str, Any] = {"kind": "decode", "impl": name, "batch": batch, "new_tokens": n,
                                   "prompt_tokens": args.prompt_tokens, "dtype": "bf16"}
            try:
                times = []
                for rep in range(args.decode_reps + 1):  # rep 0 warms up (and captures the graph)
                    sync(device)
                    t0 = time.perf_counter()
                    outputs[name] = run()
                    sync(device)
                    if rep > 0:
                        times.append(time.perf_counter() - t0)
                best = min(times)
                row["tok_s"] = batch * n / best
                row["ms_per_step"] = 1000 * best / n
            except Exception as e:
                row["error"] = short_error(e)
                traceback.print_exc()
            rows.append(row)
        if "hf generate" in outputs:
            for row in rows[-len(runs):]:
                if row["impl"] != "hf generate" and row["impl"] in outputs:
                    row["tokens_equal_hf"] = outputs[row["impl"]].tolist() == outputs["hf generate"].tolist()
                if "tok_s" in row and rows[-1].get("tok_s"):
                    row["vs_hf"] = row["tok_s"] / rows[-1]["tok_s"]
    # fp32 greedy identity at batch 1 (bf16 rounding of Linear vs Conv1D can flip a near-tie)
    ours32, hf32 = ours.float(), hf.float()
    idx = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(2))
    idx = idx.to(device)
    mode = modes[-1]
    with torch.inference_mode():
        want = hf32.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n)
    got = generate(ours32, idx, n, temperature=0.0, decode_mode=mode)
    rows.append({"kind": "decode_check", "impl": f"ours {mode}", "dtype": "fp32", "batch": 1, "new_tokens": n,
                 "tokens_equal_hf": got.tolist() == want.tolist()})
    release_graphs()
    return rows


# ------------------------------------------------------------------ report


def tables(rows: list[dict[str, Any]]) -> str:
    out = []
    train = [r for r in rows if r["kind"] == "train"]
    if train:
        nano = {r["batch"]: r.get("tok_s") for r in train if r["model"] == "nanogpt"}
        body = []
        for r in train:
            vs = r.get("tok_s") / nano[r["batch"]] if r.get("tok_s") and nano.get(r["batch"]) else None
            body.append([r["model"], f"B{r['batch']}xT{r['seq']}", fmt(r.get("tok_s")) if "tok_s" in r else
                         f"n/a ({r.get('error', 'skipped')})", fmt(r.get("mfu"), ".1%") if r.get("mfu") else "n/a",
                         fmt(r.get("peak_mem_gib"), ".1f"), fmt(vs, ".3f") + ("x" if vs else ""),
                         fmt(r.get("first_step_s"), ".0f")])
        out.append(markdown_table(["model", "shape", "tok/s", "MFU", "peak GiB", "vs nanoGPT", "first step s"],
                                  body))
    e2e = [r for r in rows if r["kind"] == "run_train"]
    for r in e2e:
        what = f"run_train.py end to end ({r.get('recipe', 'baseline')})"
        if "tok_s" in r:
            out.append(f"{what}: {fmt(r['tok_s'])} tok/s, MFU {fmt(r.get('mfu'), '.1%')}, "
                       f"wall {r['wall_s']:.0f} s ({' '.join(r.get('log', [])[:1])})")
        else:
            out.append(f"{what}: failed ({r.get('error')})")
    dec = [r for r in rows if r["kind"] == "decode"]
    if dec:
        out.append(markdown_table(
            ["implementation", "batch", "tok/s", "ms/step", "vs HF", "greedy tokens = HF (bf16)"],
            [[r["impl"], r["batch"], fmt(r.get("tok_s")) if "tok_s" in r else f"n/a ({r.get('error')})",
              fmt(r.get("ms_per_step"), ".2f"), fmt(r.get("vs_hf"), ".2f") + ("x" if r.get("vs_hf") else ""),
              r.get("tokens_equal_hf", "n/a")] for r in dec]))
    for r in rows:
        if r["kind"] == "decode_check":
            out.append(f"greedy tokens equal HF in fp32 ({r['impl']}, batch 1, {r['new_tokens']} tokens): "
                       f"{r['tokens_equal_hf']}")
    for r in rows:
        if r["kind"] == "skipped":
            out.append(f"skipped: {r['what']} ({r['why']})")
    return "\n\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model and shapes: check the plumbing (CPU is fine)")
    p.add_argument("--budget-s", type=float, default=330, help="start nothing new after this many seconds")
    p.add_argument("--only", default="train,e2e,decode,e2e_speedrun",
                   help="comma list of parts: train, e2e, decode, e2e_speedrun")
    p.add_argument("--train", default="ours:16,nanogpt:16,hf:16,ours:64,nanogpt:64,hf:64,ours (pad 1):16",
                   help="model:batch list, in priority order")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--e2e-micro-batch", default="auto")
    p.add_argument("--e2e-steps", type=int, default=9)
    p.add_argument("--e2e-timeout-s", type=float, default=240)
    p.add_argument("--tokenizer-path", help="gpt2.tiktoken for run_train.py (default: .gpu/gpt2.tiktoken if there)")
    p.add_argument("--cache-dir", help="data.cache_dir for run_train.py (default: .gpu/cache if there)")
    p.add_argument("--decode-batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 16])
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--decode-reps", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    args = p.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    preset, seq = ("tiny", 64) if args.tiny else ("gpt2", 1024)
    cfg = model_preset(preset)
    if args.tiny:
        cfg = dataclasses.replace(cfg, n_positions=256)
        args.new_tokens, args.decode_batches = min(args.new_tokens, 8), [1, 2]
    scale = 8 if args.tiny else 1  # tiny: B2/B8 instead of B16/B64
    with torch.device("meta"):
        flops_per_token = GPT(dataclasses.replace(cfg, pad_vocab_multiple=1)).flops_per_token(seq)
    peak = detect_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    env = environment(args.device)
    rows: list[dict[str, Any]] = []
    payload = {"benchmark": "gpu", "device": args.device, "tiny": args.tiny, "flops_per_token": flops_per_token,
               "peak_flops": peak, "environment": env, "rows": rows}
    parts = set(args.only.split(","))

    def save() -> None:
        write_json(args.out, payload)

    def budget_left(what: str) -> bool:
        if elapsed() < args.budget_s:
            return True
        rows.append({"kind": "skipped", "what": what, "why": f"time budget {args.budget_s:.0f} s used"})
        return False

    plan = [item.rsplit(":", 1) for item in args.train.split(",")] if "train" in parts else []
    train_plan = [(name, int(b)) for name, b in plan]
    # The first five training rows, then decoding and run_train.py, then the rest of the training rows.
    order: list[tuple[str, Any]] = [("train", t) for t in train_plan[:5]]
    order += [("decode", None)] if "decode" in parts else []
    order += [("e2e", None)] if "e2e" in parts else []
    order += [("e2e_speedrun", None)] if "e2e_speedrun" in parts else []
    order += [("train", t) for t in train_plan[5:]]
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        for part, item in order:
            label = f"{part} {item}" if item else part
            if not budget_left(label):
                continue
            print(f"[{elapsed():5.0f}s] {label}", flush=True)
            if part == "train":
                name, batch = item
                row = train_row(name, max(1, batch // scale), seq, cfg, device, compile_=device.type == "cuda",
                                warmup=args.warmup, steps=args.steps, flops_per_token=flops_per_token, peak=peak)
                rows.append(row)
                print("   ", {k: v for k, v in row.items() if k in ("tok_s", "mfu", "peak_mem_gib", "error")},
                      flush=True)
            elif part == "decode":
                try:
                    rows.extend(decode_rows(args, cfg, device))
                except Exception as e:
                    rows.append({"kind": "decode", "impl": "all", "batch": 0, "error": short_error(e)})
                    traceback.print_exc()
            elif part in ("e2e", "e2e_speedrun"):
                recipe = "baseline" if part == "e2e" else "speedrun"
                try:
                    rows.append(run_train_row(args, device, Path(tmp), recipe))
                except Exception as e:
                    rows.append({"kind": "run_train", "recipe": recipe, "error": short_error(e)})
                    traceback.print_exc()
            save()
    payload["total_s"] = elapsed()
    save()
    print()
    print(tables(rows))
    print(f"\n{env.get('gpu', env['cpu'])}, torch {env['torch']}; total {elapsed():.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
