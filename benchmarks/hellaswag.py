"""HellaSwag scoring speed: items/s of `gpt2.evals.hellaswag.score` (the code run_eval.py and the
trainer use) for a model preset with random weights, and the extrapolated time of the full 10,042-item
validation set.

Without --path the items are synthetic token rows shaped like HellaSwag validation items (context
20-80 tokens, endings 10-40 tokens; no tokenizer needed); with --path the real jsonl is read and
rendered (needs GPT-2's vocabulary file). Accuracy of random weights is meaningless; only speed counts.

    python benchmarks/hellaswag.py                                   # CPU, 124M, fp32 and bf16
    python benchmarks/hellaswag.py --device cuda --precisions bf16 --items 10042 --batch-sizes 64
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from common import default_out, environment, fmt, markdown_table, median, write_json

from gpt2.evals import hellaswag
from gpt2.model.gpt import GPT
from gpt2.model.presets import model_preset
from gpt2.runtime.device import autocast, resolve_precision

FULL = hellaswag.VAL_ITEMS


def synthetic_items(n: int, vocab: int, seed: int = 0) -> list[hellaswag.Rendered]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ctx = torch.randint(0, vocab, (int(torch.randint(20, 81, (1,), generator=g)),), generator=g).tolist()
        rows, scored = [], []
        for _ in range(4):
            end = torch.randint(0, vocab, (int(torch.randint(10, 41, (1,), generator=g)),), generator=g).tolist()
            rows.append(tuple(ctx + end))
            scored.append(len(end))
        out.append(hellaswag.Rendered(rows=tuple(rows), n_scored=tuple(scored),
                                      label=int(torch.randint(0, 4, (1,), generator=g))))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="gpt2/conf/model preset (default gpt2 = 124M)")
    p.add_argument("--items", type=int, default=24, help="items per timed run (10042 = the full set)")
    p.add_argument("--batch-sizes", default="8", help="comma-separated items per forward (4 rows each)")
    p.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16, fp16 (autocast; weights stay fp32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=1, help="timed runs per setting after one warm-up run")
    p.add_argument("--path", default=None, help="a real hellaswag_val.jsonl instead of synthetic items")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic shapes)")
    p.add_argument("--out", default=str(default_out("hellaswag")), help="JSON output path")
    args = p.parse_args()

    device = torch.device(args.device)
    env = environment(args.device)
    torch.manual_seed(0)
    model = GPT(model_preset(args.preset)).to(device).eval()
    scored_model: Any = torch.compile(model, dynamic=True) if args.compile else model
    if args.path:
        from gpt2.tokenizers.gpt2 import get_tokenizer

        items = hellaswag.render(hellaswag.load_items(args.path, args.items), get_tokenizer().encode_batch,
                                 model.cfg.n_positions)
    else:
        items = synthetic_items(args.items, model.cfg.vocab_size)
    warm = items[: min(len(items), 8)]
    rows: list[dict[str, Any]] = []
    for precision in args.precisions.split(","):
        precision = resolve_precision(precision, device)
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            times = []
            for rep in range(args.reps + 1):  # rep 0 warms up (on a few items)
                t0 = time.perf_counter()
                hellaswag.score(scored_model, warm if rep == 0 else items, batch_size=bs, device=device,
                                autocast=lambda precision=precision: autocast(device, precision))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if rep > 0:
                    times.append(time.perf_counter() - t0)
            items_s = len(items) / median(times)
            rows.append({"precision": precision, "batch_size": bs, "items": len(items), "items_s": items_s,
                         "times_s": times, "full_set_s": FULL / items_s})
            print(f"{precision} batch {bs}: {items_s:.2f} items/s", flush=True)
    print()
    print(markdown_table(
        ["device", "preset", "precision", "batch (items)", "items timed", "items/s", f"full {FULL:,} items (s)"],
        [[args.device, args.preset, r["precision"], r["batch_size"], r["items"], fmt(r["items_s"], ".2f"),
          fmt(r["full_set_s"], ",.0f")] for r in rows]))
    gpu = f", {env['gpu']}" if "gpu" in env else ""
    print(f"\n{env['cpu']} ({env['cpu_count']} cores{gpu}), torch {env['torch']}; "
          f"{'real items from ' + args.path if args.path else 'synthetic HellaSwag-shaped items'}; "
          f"load average at start {env['load_average_start']}")
    path = write_json(args.out, {"benchmark": "hellaswag", "device": args.device, "preset": args.preset,
                                 "compile": args.compile, "synthetic": not args.path, "environment": env,
                                 "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
