"""Generation speed: `gpt2.generate.sampling.generate` (KV cache) vs Hugging Face `GPT2LMHeadModel.generate`.

124M shape, random weights (ours, copied into the HF model so greedy tokens can be compared), batch 1,
a 16-token prompt, 200 new tokens, greedy, no EOS stop. Runs alternate between the variants and
tokens/s is 200 / median wall time of a whole call (prefill included).

Variants: fp32 for both; bf16 as HF's `model.to(torch.bfloat16)` vs ours with bf16 weights (and, with
--autocast, ours with fp32 weights under bf16 autocast, which is slower on CPU).

    .venv/bin/python benchmarks/generation.py [--reps 2] [--new-tokens 200] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from common import default_out, environment, fmt, markdown_table, median, write_json

from gpt2.generate.sampling import generate
from gpt2.model.gpt import GPT
from gpt2.model.hf import gpt_to_hf, hf_config_dict
from gpt2.model.presets import model_preset
from gpt2.runtime.device import DTYPES
from gpt2.runtime.device import autocast as device_autocast


def build_models(preset: str, device: torch.device) -> tuple[GPT, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model_preset(preset)
    torch.manual_seed(0)
    ours = GPT(cfg).to(device).eval()
    hf_cfg = GPT2Config(**{**hf_config_dict(cfg), "attn_implementation": "sdpa"})
    hf = GPT2LMHeadModel(hf_cfg).to(device).eval()
    missing, unexpected = hf.load_state_dict(gpt_to_hf(ours.state_dict(), cfg), strict=False)
    if unexpected or [k for k in missing if not k.endswith("attn.bias") and not k.endswith("masked_bias")]:
        raise RuntimeError(f"weight copy to HF failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf.generation_config.eos_token_id = None  # run all max_new_tokens
    hf.generation_config.pad_token_id = 0
    return ours, hf


def variants(ours: GPT, hf: Any, precision: str, new_tokens: int, autocast: bool,
             static: bool = False) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    def hf_run(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(idx: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, use_cache=True,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return run

    if precision == "fp32":
        runs = {"ours": lambda idx: generate(ours, idx, new_tokens, temperature=0.0)}
        if static:
            runs["ours (static cache)"] = lambda idx: generate(ours, idx, new_tokens, temperature=0.0,
                                                               decode_mode="static")
        return {**runs, "hf": hf_run(hf)}
    ours_bf16 = copy.deepcopy(ours).to(DTYPES[precision])
    hf_bf16 = copy.deepcopy(hf).to(DTYPES[precision])
    device = next(ours.parameters()).device

    def ours_autocast(idx: torch.Tensor) -> torch.Tensor:
        with device_autocast(device, precision):
            return generate(ours, idx, new_tokens, temperature=0.0)

    runs = {"ours (bf16 weights)": lambda idx: generate(ours_bf16, idx, new_tokens, temperature=0.0)}
    if static:
        runs["ours (bf16 weights, static cache)"] = lambda idx: generate(ours_bf16, idx, new_tokens, temperature=0.0,
                                                                         decode_mode="static")
    if autocast:  # slow on CPU: autocast re-casts every weight for every token (no cast cache in inference)
        runs["ours (fp32 weights, bf16 autocast)"] = ours_autocast
    return {**runs, "hf": hf_run(hf_bf16)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="gpt2/conf/model preset (default gpt2 = 124M)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--reps", type=int, default=2, help="timed calls per variant after one warm-up call")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", action="store_true", help="also time ours with fp32 weights under bf16 autocast")
    p.add_argument("--static", action="store_true", help="also time ours with the graph-ready static cache")
    p.add_argument("--out", default=str(default_out("generation")), help="JSON output path")
    args = p.parse_args()

    device = torch.device(args.device)
    t_start = time.perf_counter()
    env = environment(args.device)
    ours, hf = build_models(args.preset, device)
    idx = torch.randint(0, ours.cfg.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    idx = idx.to(device)
    rows: list[dict[str, Any]] = []
    match: bool | None = None
    for precision in args.precisions.split(","):
        runs = variants(ours, hf, precision, args.new_tokens, args.autocast, args.static)
        times: dict[str, list[float]] = {name: [] for name in runs}
        outputs: dict[str, torch.Tensor] = {}
        for rep in range(args.reps + 1):  # rep 0 warms up; variants alternate within each rep
            for name, run in runs.items():
                t0 = time.perf_counter()
                out = run(idx)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                if out.shape != (1, args.prompt_tokens + args.new_tokens):
                    raise RuntimeError(f"{name} returned shape {tuple(out.shape)}")
                outputs[name] = out
                if rep > 0:
                    times[name].append(dt)
        if precision == "fp32":
            match = outputs["ours"].tolist() == outputs["hf"].tolist()
        hf_tok_s = args.new_tokens / median(times["hf"])
        for name in runs:
            tok_s = args.new_tokens / median(times[name])
            row = {"precision": precision, "variant": name, "tok_s": tok_s, "ms_per_token": 1000 / tok_s,
                   "times_s": times[name], "vs_hf": tok_s / hf_tok_s if name != "hf" else None}
            if precision != "fp32" and name != "hf":
                same = outputs[name].tolist() == outputs["hf"].tolist()
                row["tokens_equal_hf"] = same
            rows.append(row)
            print(f"{precision} {name}: {tok_s:.1f} tok/s", flush=True)
    table = markdown_table(
        ["precision", "implementation", "tok/s", "ms/token", "vs HF"],
        [[r["precision"], "HF generate" if r["variant"] == "hf" else r["variant"], fmt(r["tok_s"], ".1f"),
          fmt(r["ms_per_token"], ".1f"), fmt(r["vs_hf"], ".2f") + ("x" if r["vs_hf"] else "")] for r in rows])
    print()
    print(table)
    print(f"\ngreedy tokens equal to HF in fp32: {match}")
    print(f"{env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, device {args.device}; "
          f"{args.prompt_tokens}-token prompt + {args.new_tokens} new tokens, batch 1, greedy; "
          f"load average at start {env['load_average_start']}; total {time.perf_counter() - t_start:.0f} s")
    path = write_json(args.out, {"benchmark": "generation", "device": args.device, "preset": args.preset,
                                 "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                 "reps": args.reps, "greedy_tokens_equal_fp32": match, "environment": env,
                                 "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
