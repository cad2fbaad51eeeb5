"""Our byte-level BPE (gpt2/bpe.py) vs GPT-2's tiktoken encoding.

For each corpus (Shakespeare, the demo corpus; and Python code: this interpreter's standard-library
sources, a corpus any machine has), the last --held-out fraction of its documents is held out; BPE is
trained on the rest at each vocabulary size. Printed per corpus and vocabulary:

- bytes/token on the held-out slice (higher = fewer tokens for the same text), GPT-2's for reference;
- BPE training time, and that time extrapolated linearly to 100 MB of training text (an estimate:
  the BPE trainer's cost grows roughly linearly in text once the word counts settle);
- encoding tokens/s on the held-out slice, one thread, ours (Hugging Face tokenizers) vs tiktoken;
- with --scale-mb, BPE training time measured at 10-100 MB of Python sources from this environment's
  site-packages (16K ids, one thread; 100 MB is tokenizer.train_max_bytes' default), to check the
  extrapolation.

    python benchmarks/tokenizer.py [--vocabs 4096 8192 16384 32768] [--code-mb 8] [--scale-mb 10 25 50 100]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.data.sources import shakespeare_files  # noqa: E402
from gpt2.tokenizers.bpe import HFTokenizer, train_bpe  # noqa: E402
from gpt2.tokenizers.gpt2 import get_tokenizer  # noqa: E402


def shakespeare_docs(cache_dir: str) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in shakespeare_files(Path(os.path.expanduser(cache_dir)))]


def python_docs(root: Path, max_mb: float) -> list[str]:
    """UTF-8 Python files under root (site-packages left out unless root is one), in path order, up to max_mb MB."""
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.relative_to(root).parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        docs.append(text)
        total += len(text.encode())
        if total >= max_mb * 1e6:
            break
    return docs


def code_docs(max_mb: float) -> list[str]:
    """Python files of the standard library, up to max_mb MB."""
    return python_docs(Path(sysconfig.get_paths()["stdlib"]), max_mb)


def chunks(docs: list[str], size: int = 1 << 16) -> list[str]:
    return [d[i:i + size] for d in docs for i in range(0, len(d), size)]


def encode_rate(encode, texts: list[str], reps: int = 3) -> tuple[int, float]:
    """(tokens, best tokens/s over reps) of encoding every text with one thread."""
    best, n = 0.0, 0
    for _ in range(reps):
        t0 = time.perf_counter()
        n = sum(len(encode(t)) for t in texts)
        best = max(best, n / (time.perf_counter() - t0))
    return n, best


def run_corpus(name: str, docs: list[str], vocabs: list[int], held_out: float, gpt2) -> list[dict]:
    cut = max(1, int(len(docs) * (1 - held_out)))
    train_docs, test_docs = docs[:cut], docs[cut:]
    train_bytes = sum(len(d.encode()) for d in train_docs)
    test_bytes = sum(len(d.encode()) for d in test_docs)
    test = chunks(test_docs)
    n_gpt2, gpt2_rate = encode_rate(gpt2.encode, test)
    rows = [{"corpus": name, "tokenizer": "GPT-2 (tiktoken)", "vocab": gpt2.n_vocab, "train_mb": None,
             "train_s": None, "s_per_100mb": None, "bytes_per_token": test_bytes / n_gpt2, "encode_tok_s": gpt2_rate}]
    for vocab in vocabs:
        t0 = time.perf_counter()
        text = train_bpe(iter(chunks(train_docs)), vocab, 2, ["<|endoftext|>"])
        seconds = time.perf_counter() - t0
        tok = HFTokenizer.from_json(text)
        n, rate = encode_rate(tok.encode, test)
        assert tok.decode(tok.encode(test[0])) == test[0]
        rows.append({"corpus": name, "tokenizer": "our BPE", "vocab": tok.n_vocab, "train_mb": train_bytes / 1e6,
                     "train_s": seconds, "s_per_100mb": seconds / (train_bytes / 1e8),
                     "bytes_per_token": test_bytes / n, "encode_tok_s": rate})
        print(f"  {name} vocab {vocab}: trained in {seconds:.1f}s", file=sys.stderr)
    print(f"{name}: trained on {train_bytes / 1e6:.2f} MB ({len(train_docs)} docs), held out {test_bytes / 1e6:.2f} MB "
          f"({len(test_docs)} docs)")
    return rows


def site_packages_docs(max_mb: float) -> list[str]:
    """Python files of this environment's installed packages, up to max_mb MB (a corpus of 100+ MB that any
    machine with this venv has, offline)."""
    return python_docs(Path(sysconfig.get_paths()["purelib"]), max_mb)


def run_scale(sizes_mb: list[float], vocab: int) -> list[dict]:
    """BPE training time measured (not extrapolated) at growing corpus sizes, with the process's peak RSS."""
    import resource

    docs = site_packages_docs(max(sizes_mb))
    rows = []
    for mb in sizes_mb:
        sel, n = [], 0
        for d in docs:
            sel.append(d)
            n += len(d.encode())
            if n >= mb * 1e6:
                break
        t0 = time.perf_counter()
        train_bpe(iter(chunks(sel)), vocab, 2, ["<|endoftext|>"])
        seconds = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rows.append({"train_mb": n / 1e6, "vocab": vocab, "train_s": seconds, "s_per_100mb": seconds / (n / 1e8),
                     "peak_rss_mb": rss})
        print(f"  scale {n / 1e6:.0f} MB: trained in {seconds:.1f}s", file=sys.stderr)
    return rows


def scale_table(rows: list[dict]) -> str:
    lines = ["| training text (site-packages .py) | vocab | train s (measured) | s per 100 MB | peak RSS MB (process, "
             "corpus in memory included) |", "|---|---|---|---|---|"]
    lines += [f"| {r['train_mb']:.0f} MB | {r['vocab']:,} | {r['train_s']:.1f} | {r['s_per_100mb']:.0f} | "
              f"{r['peak_rss_mb']:,.0f} |" for r in rows]
    return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = ["| corpus | tokenizer | vocab | bytes/token (held out) | train s | train s per 100 MB (extrapolated) "
             "| encode tok/s (1 thread) | vs tiktoken |", "|---|---|---|---|---|---|---|---|"]
    base = {r["corpus"]: r["encode_tok_s"] for r in rows if r["train_s"] is None}
    for r in rows:
        lines.append(f"| {r['corpus']} | {r['tokenizer']} | {r['vocab']:,} | {r['bytes_per_token']:.2f} | "
                     f"{_fmt(r['train_s'], '.1f')} | {_fmt(r['s_per_100mb'], ',.0f')} | {r['encode_tok_s']:,.0f} | "
                     f"{r['encode_tok_s'] / base[r['corpus']]:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of documents held out")
    parser.add_argument("--code-mb", type=float, default=8.0, help="MB of standard-library Python (0 = skip)")
    parser.add_argument("--scale-mb", type=float, nargs="*", default=[10, 25, 50, 100],
                        help="also time BPE training (16K ids) on this many MB of site-packages Python (none = skip)")
    parser.add_argument("--cache-dir", default="~/.cache/gpt2")
    parser.add_argument("--json", default="benchmarks/results/tokenizer.json")
    args = parser.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    gpt2 = get_tokenizer(cache_dir=args.cache_dir)
    rows = run_corpus("shakespeare", shakespeare_docs(args.cache_dir), args.vocabs, args.held_out, gpt2)
    if args.code_mb > 0:
        rows += run_corpus("python stdlib", code_docs(args.code_mb), args.vocabs, args.held_out, gpt2)
    print(f"load average {os.getloadavg()[0]:.1f} (shared machine)")
    print(table(rows))
    scale = run_scale(args.scale_mb, 16384) if args.scale_mb else []
    if scale:
        print(f"load average {os.getloadavg()[0]:.1f} (shared machine)")
        print(scale_table(scale))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "scale": scale, "load": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
