"""Sample efficiency: the fraction of the GPT-2 baseline's tokens the speedrun recipe needs to reach the
baseline's final val loss, on a corpus the recipe was not tuned on.

Both sides are shipped experiments, run by `run_train.py` as they are, with the same overrides on top:

- baseline: `experiment=shakespeare_cpu` (today's defaults: GPT-2 architecture, AdamW, cosine) with
  `model.n_layer=6`, so that its parameter count is within 10% of the recipe's (the recipe's untied head adds a
  vocab x n_embd matrix and its rotary positions drop wpe);
- recipe: `experiment=speedrun_cpu` (4 layers of 128, rotary, QK-norm, ReLU^2, RMSNorm, untied head, zero-init
  projections, logit soft cap; Muon + AdamW with per-part lrs; warmup-stable-decay), tuned on Shakespeare only.

Common to both: the corpus (default: the top-level modules of Python 3.11's standard library, /usr/lib/python3.11/
*.py, 4.7 MB), our byte-level BPE with 4,096 tokens trained on it, the batch (2,048 tokens = 16 x 128 per step),
fp32 on the CPU without compile (deterministic), the val sample, and the seeds (0, 1, 2). The baseline runs
the full budget (1,000 steps); the recipe runs the full budget and 1/8, 1/4 and 1/2 of it (each with its whole
schedule, so its cooldown ends at its budget). The headline, per seed: the budget at which the recipe's final
val loss equals the baseline's, interpolated linearly in log(tokens) between the recipe's budgets; the
conservative figure from the recipe's full-budget val curve (not yet cooled down where it crosses) is printed
next to it. Figures: benchmarks/RESULTS.md, "Sample efficiency".

`--ablation` runs the recipe with each technique switched off alone, as ONE Hydra multirun per seed
(gpt2/conf/ablate/), at half the budget, and prints each one's val-loss change and tok/s against the recipe.

    .venv/bin/python benchmarks/sample_efficiency.py                          # headline: 3 seeds, 31 min on 2 cores
    .venv/bin/python benchmarks/sample_efficiency.py --ablation --seeds 0 1     # 2 x 19 min
    .venv/bin/python benchmarks/sample_efficiency.py --corpus shakespeare --only recipe --fractions 0.5 \\
        --seeds 0 --extra optimizer.muon_lr=0.05                             # the tuning runs (Shakespeare only)
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from common import RESULTS_DIR, ROOT, default_out, environment, markdown_table, write_json

from gpt2.train.metrics import read_metrics

ABLATIONS = ("none", "rope", "qk_norm", "relu2", "rmsnorm", "untied_head", "zero_init_proj", "logit_softcap", "muon",
             "part_lrs", "wsd")
"""gpt2/conf/ablate/<name>.yaml: each switches one technique of the recipe off (none: the recipe itself)."""
BASELINE = ["experiment=shakespeare_cpu", "model.n_layer=6"]
RECIPE = ["experiment=speedrun_cpu"]
CORPORA = {
    "stdlib": ["data=text", "data.path='/usr/lib/python3.11/*.py'"],
    "shakespeare": ["data=shakespeare"],
}


def common_overrides(args: argparse.Namespace) -> list[str]:
    cache = [] if args.corpus == "shakespeare" else [f"data.cache_dir={args.cache_dir}"]
    return [*CORPORA[args.corpus], *cache, "tokenizer=bpe", f"tokenizer.vocab_size={args.vocab}", "device=cpu",
            "precision=fp32", "compile=false", f"total_batch_tokens={args.batch_tokens}", "micro_batch_size=16",
            "block_size=128", f"eval.iters={args.eval_iters}", "eval.sample_tokens=0", "checkpoint.interval=0",
            "checkpoint.keep_last=1", "logger=none", "progress_bar=false", "log_interval=10", "data.num_proc=1"]


def _quote(arg: str) -> str:
    """An argument as a shell takes it: an override holding single quotes goes in double quotes."""
    return f'"{arg}"' if "'" in arg else shlex.quote(arg)


def run_train(overrides: list[str], run_dir: Path, multirun: bool = False) -> float:
    """`python run_train.py overrides` (a multirun with -m) into run_dir; its output goes to run_dir.log."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    where = f"hydra.sweep.dir={run_dir}" if multirun else f"hydra.run.dir={run_dir}"
    cmd = [sys.executable, "run_train.py", *(["-m"] if multirun else []), *overrides, where]
    print("$ python " + " ".join(_quote(c) for c in cmd[1:]), flush=True)
    t0 = time.time()
    with open(f"{run_dir}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}); see {run_dir}.log")
    return time.time() - t0


def finished(run_dir: Path, steps: int) -> bool:
    """Whether the run in run_dir logged its final val loss at step `steps`."""
    metrics = run_dir / "metrics.jsonl"
    return metrics.exists() and any(r.get("step") == steps and "val/loss" in r for r in read_metrics(metrics))


def sweep_jobs(sweep: Path) -> list[Path]:
    """The job dirs of a Hydra multirun (0, 1, ...), in job order; none when it has not run."""
    if not sweep.is_dir():
        return []
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def train_or_reuse(overrides: list[str], run_dir: Path, steps: int) -> float:
    """run_train into run_dir, unless it already finished there (0 s); an interrupted run resumes exactly from
    its last checkpoint (resume=auto), so a benchmark that was stopped picks up where it was."""
    if finished(run_dir, steps):
        print(f"  reusing {run_dir} (finished)", flush=True)
        return 0.0
    return run_train([*overrides, "resume=auto"] if (run_dir / "checkpoints").exists() else overrides, run_dir)


def val_curve(run_dir: Path, tokens_per_step: int) -> list[tuple[int, float]]:
    """(tokens, val loss) at each evaluation of a run."""
    return [(r["step"] * tokens_per_step, r["val/loss"]) for r in read_metrics(run_dir / "metrics.jsonl")
            if "val/loss" in r]


def tokens_per_s(run_dir: Path) -> float:
    """The median logged tok/s after the first log interval (which holds the warm-up)."""
    values = [r["perf/tokens_per_s"] for r in read_metrics(run_dir / "metrics.jsonl") if "perf/tokens_per_s" in r]
    return statistics.median(values[1:] or values)


def n_params(overrides: list[str], vocab: int) -> int:
    """The parameter count of the model these overrides compose (built on the meta device)."""
    import dataclasses

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gpt2.cli import CONF_DIR, register_configs
    from gpt2.model.gpt import GPT

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="train", overrides=overrides))
    with torch.device("meta"):
        return GPT(dataclasses.replace(cfg.model, vocab_size=vocab)).num_params()  # type: ignore[attr-defined]


def crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """The x where the loss (y) first falls to `target`, linear in log(x) between the bracketing points (x > 0,
    sorted by x); None when no two points bracket it (see `bracket_text`)."""
    points = sorted(p for p in points if p[0] > 0)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 <= target < y0:
            t = (y0 - target) / (y0 - y1)
            return math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
    return None


def bracket_text(points: list[tuple[float, float]], target: float, x: float | None) -> str:
    """A crossing as text: the value, or the bound the points give when they do not bracket the target."""
    if x is not None:
        return f"{x:.3f}"
    points = sorted(p for p in points if p[0] > 0)
    if points and points[0][1] <= target:
        return f"< {points[0][0]:g} (add a smaller --fractions)"
    return f"> {points[-1][0]:g}" if points else "n/a"


def spread(values: list[float], spec: str = ".3f") -> str:
    """mean (min-max) of values, or the value alone."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ({format(min(values), spec)}-{format(max(values), spec)})"


def ascii_plot(series: dict[str, list[tuple[int, float]]], width: int = 64, height: int = 16) -> str:
    """The val-loss curves as text: one letter per series, x = tokens, y = val loss."""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    grid = [[" "] * width for _ in range(height)]
    for mark, pts in zip("BRbr", series.values()):
        for x, y in pts:
            col = round((x - x0) / max(1, x1 - x0) * (width - 1))
            row = round((y1 - y) / max(1e-9, y1 - y0) * (height - 1))
            grid[row][col] = mark
    lines = [f"{y1 - (y1 - y0) * i / (height - 1):6.2f} |" + "".join(row) for i, row in enumerate(grid)]
    lines.append(" " * 7 + "+" + "-" * width)
    lines.append(" " * 8 + f"{x0:,} tokens" + " " * (width - 24) + f"{x1:,}")
    legend = ", ".join(f"{mark} = {name}" for mark, name in zip("BRbr", series))
    return "\n".join([*lines, " " * 8 + legend])


def save_png(series: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in series.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def headline(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    common = common_overrides(args)
    steps = args.steps
    budgets = sorted(set(args.fractions)) if args.only != "baseline" else []
    runs: dict[str, Any] = {}
    for seed in args.seeds:
        jobs = [] if args.only == "recipe" else [("baseline", 1.0, BASELINE)]
        jobs += [("recipe", f, RECIPE) for f in budgets]
        for side, fraction, exp in jobs:
            n = max(1, round(fraction * steps))
            name = f"{side}-f{fraction:g}-s{seed}"
            eval_every = args.eval_interval if fraction == 1.0 else 0
            overrides = [*exp, *common, f"max_steps={n}", f"seed={seed}", f"eval.interval={eval_every}", *args.extra]
            seconds = train_or_reuse(overrides, out / name, n)
            curve = val_curve(out / name, args.batch_tokens)
            runs[name] = {"side": side, "fraction": fraction, "seed": seed, "steps": n, "overrides": overrides,
                          "seconds": seconds, "val_curve": curve, "final_val_loss": curve[-1][1],
                          "tokens_per_s": tokens_per_s(out / name)}
            print(f"  {name}: final val loss {curve[-1][1]:.4f} after {curve[-1][0]:,} tokens "
                  f"({seconds:.0f} s, {runs[name]['tokens_per_s']:,.0f} tok/s)", flush=True)
    return runs


def summarize(args: argparse.Namespace, runs: dict[str, Any], out: Path) -> dict[str, Any]:
    """The curves table, the plots, and the headline fraction per seed."""
    base_tokens = args.steps * args.batch_tokens
    by = {(r["side"], r["fraction"], r["seed"]): r for r in runs.values()}
    seeds = sorted({r["seed"] for r in runs.values()})
    lines = []
    summary: dict[str, Any] = {}
    full = {side: [by[(side, 1.0, s)]["val_curve"] for s in seeds if (side, 1.0, s) in by]
            for side in ("baseline", "recipe")}
    mean_curves = {}
    for side, curves in full.items():
        if curves:
            mean_curves[f"{side} (mean of {len(curves)} seed(s))"] = [
                (pts[0][0], statistics.mean(p[1] for p in pts)) for pts in zip(*curves)]
    if full["baseline"] or full["recipe"]:
        ref = (full["baseline"] or full["recipe"])[0]
        rows = []
        for i, (tokens, _) in enumerate(ref):
            row = [f"{tokens:,}"]
            for side in ("baseline", "recipe"):
                row.append(spread([c[i][1] for c in full[side]]) if full[side] else "n/a")
            rows.append(row)
        lines += ["Val loss at each evaluation, mean (min-max) over seeds " + str(seeds) + ":", "",
                  markdown_table(["tokens", "baseline", "recipe"], rows), ""]
        lines += ["```", ascii_plot(mean_curves), "```", ""]
        png = out / "val_loss.png"
        save_png(mean_curves, png)
        lines.append(f"(plot: {png})")
    if full["baseline"] and any(side == "recipe" for side, _, _ in by):
        rows = []
        fractions, curve_fractions = [], []
        for s in seeds:
            target = by[("baseline", 1.0, s)]["final_val_loss"]
            budget_points = [(r["fraction"], r["final_val_loss"]) for (side, _, seed), r in by.items()
                             if side == "recipe" and seed == s]
            f = crossing(budget_points, target)
            rc = by.get(("recipe", 1.0, s))
            fc = crossing([(t / base_tokens, v) for t, v in rc["val_curve"]], target) if rc else None
            fractions += [f] if f is not None else []
            curve_fractions += [fc] if fc is not None else []
            curve_points = [(t / base_tokens, v) for t, v in rc["val_curve"]] if rc else []
            rows.append([s, f"{target:.4f}", ", ".join(f"{fr:g}: {v:.4f}" for fr, v in sorted(budget_points)),
                         bracket_text(budget_points, target, f), bracket_text(curve_points, target, fc)])
        lines += ["", "Fraction of the baseline's tokens the recipe needs to reach the baseline's final val loss:", "",
                  markdown_table(["seed", "baseline final val loss", "recipe final val loss by budget",
                                  "fraction (budgets)", "fraction (full-run curve)"], rows), ""]
        summary["fractions"] = fractions
        summary["curve_fractions"] = curve_fractions
        if len(fractions) == len(seeds):
            lines.append(f"HEADLINE: the recipe needs {spread(fractions)} of the baseline's tokens "
                         f"(goal <= 0.5; full-run curve: {spread(curve_fractions)}).")
        else:
            lines.append("HEADLINE: the budgets do not bracket the baseline's final val loss for every seed (table).")
    params = {side: n_params([*exp, *common_overrides(args)], args.vocab)
              for side, exp in (("baseline", BASELINE), ("recipe", RECIPE))}
    lines.append(f"parameters: baseline {params['baseline']:,}, recipe {params['recipe']:,} "
                 f"({params['recipe'] / params['baseline'] - 1:+.1%})")
    speed = {side: [r["tokens_per_s"] for r in runs.values() if r["side"] == side and r["fraction"] == 1.0]
             for side in ("baseline", "recipe")}
    lines.append(f"tok/s (median per full run): baseline {spread(speed['baseline'], ',.0f')}, "
                 f"recipe {spread(speed['recipe'], ',.0f')}")
    print("\n".join(lines), flush=True)
    return {**summary, "params": params, "report": "\n".join(lines)}


def ablation(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Each technique off alone, as one multirun per seed; a table of each one's val-loss change against the
    recipe (per seed and their mean) and its tok/s. A seed whose multirun finished already is reused."""
    n = max(1, round(args.ablation_fraction * args.steps))
    results: dict[int, dict[str, dict[str, float]]] = {}
    runs = {}
    for seed in args.seeds:
        sweep = out / f"ablation-s{seed}"
        overrides = [*RECIPE, f"ablate={','.join(ABLATIONS)}", *common_overrides(args), f"max_steps={n}",
                     f"seed={seed}", "eval.interval=0", *args.extra]
        jobs = sweep_jobs(sweep)
        done = len(jobs) == len(ABLATIONS) and all(finished(job, n) for job in jobs)
        seconds = 0.0 if done else run_train(overrides, sweep, multirun=True)
        runs[seed] = {"overrides": overrides, "seconds": seconds}
        results[seed] = {}
        for job in sweep_jobs(sweep):
            job_overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
            chosen = next(o.split("=", 1)[1] for o in job_overrides if o.startswith("ablate="))
            curve = val_curve(job, args.batch_tokens)
            results[seed][chosen] = {"final_val_loss": curve[-1][1], "tokens_per_s": tokens_per_s(job)}
    seeds = list(results)
    rows = []
    for name in ABLATIONS:
        deltas = [results[s][name]["final_val_loss"] - results[s]["none"]["final_val_loss"] for s in seeds]
        speed = [results[s][name]["tokens_per_s"] / results[s]["none"]["tokens_per_s"] for s in seeds]
        rows.append([name if name != "none" else "none (the recipe)",
                     ", ".join(f"{results[s][name]['final_val_loss']:.4f}" for s in seeds),
                     "-" if name == "none" else ", ".join(f"{d:+.4f}" for d in deltas),
                     "-" if name == "none" else f"{statistics.mean(deltas):+.4f}",
                     f"{statistics.mean(results[s][name]['tokens_per_s'] for s in seeds):,.0f}",
                     f"{statistics.mean(speed):.2f}x"])
    table = markdown_table(["switched off", f"final val loss (seeds {', '.join(map(str, seeds))})",
                            "change vs recipe, per seed", "mean change", "tok/s", "tok/s vs recipe"], rows)
    noise = [results[s]["none"]["final_val_loss"] for s in seeds]
    print(f"Ablation: {n} steps x {args.batch_tokens:,} tokens, seeds {seeds}, one multirun per seed "
          f"({sum(r['seconds'] for r in runs.values()) / 60:.1f} min run now); the recipe itself: "
          f"{spread(noise, '.4f')} over these seeds:\n\n{table}", flush=True)
    return {"steps": n, "runs": runs, "results": results, "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="stdlib")
    parser.add_argument("--cache-dir", default=str(RESULTS_DIR / "sample_efficiency_cache"),
                        help="data.cache_dir of the stdlib corpus (Shakespeare uses the default cache)")
    parser.add_argument("--vocab", type=int, default=4096, help="tokenizer.vocab_size of the BPE")
    parser.add_argument("--steps", type=int, default=1000, help="the baseline's (the full) budget in steps")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0],
                        help="the recipe's budgets, as fractions of the baseline's (1 = the same)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-interval", type=int, default=50, help="evaluation interval of the full runs")
    parser.add_argument("--eval-iters", type=int, default=16, help="val batches of 2,048 tokens per evaluation")
    parser.add_argument("--only", choices=("baseline", "recipe"), default=None)
    parser.add_argument("--ablation", action="store_true", help="run the ablation multirun instead")
    parser.add_argument("--ablation-fraction", type=float, default=0.5, help="the ablation's budget (of --steps)")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--out", default=None, help="run dirs (default benchmarks/results/sample_efficiency/)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = Path(args.out or RESULTS_DIR / "sample_efficiency" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    payload: dict[str, Any] = {"environment": environment(), "args": vars(args), "out": str(out)}
    if args.ablation:
        payload["ablation"] = ablation(args, out)
        name = "sample_efficiency_ablation"
    else:
        payload["runs"] = headline(args, out)
        payload["summary"] = summarize(args, payload["runs"], out)
        name = "sample_efficiency"
    print(f"wrote {write_json(args.json or default_out(name), payload)}")


if __name__ == "__main__":
    main()
