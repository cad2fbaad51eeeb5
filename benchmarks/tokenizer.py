"""Our byte-level BPE (gpt2/tokenizers/bpe.py) vs GPT-2's tiktoken encoding.

For each corpus (Shakespeare, the demo corpus; and Python code: this interpreter's standard-library
sources, a corpus any machine has), the last --held-out fraction of its documents is held out; BPE is
trained on the rest at each vocabulary size. Printed per corpus and vocabulary:

- bytes/token on the held-out slice (higher = fewer tokens for the same text), GPT-2's for reference;
- BPE training time, and that time extrapolated linearly to 100 MB of training text (an estimate:
  the BPE trainer's cost grows roughly linearly in text once the word counts settle);
- encoding tokens/s on the held-out slice, one thread, best of 3: ours as `HFTokenizer.encode` runs it
  (tiktoken, when the BPE converts exactly: gpt2.tokenizers.bpe_tiktoken) and through Hugging Face tokenizers,
  vs GPT-2's tiktoken measured in turn with them (its row: the median over the vocabularies); "per byte"
  scales the ratio by bytes/token (text encoded per second); the two paths of ours are checked to give the
  same ids;
- with --prep-mb, data-preparation throughput: `gpt2.data.preprocess.prepare_data` (data=text, data.num_proc
  processes, fresh temporary cache dirs) on each corpus of --prep-corpora (Shakespeare's plays repeated, and
  standard-library Python files; --prep-mb MB each) with GPT-2, with our BPE (trained on that corpus) encoding
  through tiktoken, and with our BPE through tokenizers (GPT2_BPE_ENCODER=tokenizers); each run in its own
  process, the three alternating, medians of --prep-reps runs; tok/s and MB/s (a vocabulary that packs more
  bytes per token makes fewer tokens of the same text); the two BPE runs are checked to write byte-identical
  shards;
- with --scale-mb, BPE training time measured at 10-100 MB of Python sources from this environment's
  site-packages (16K ids, one thread; 100 MB is tokenizer.train_max_bytes' default), to check the
  extrapolation.

    python benchmarks/tokenizer.py [--vocabs 4096 8192 16384 32768] [--code-mb 8] [--scale-mb 10 25 50 100]
                                   [--prep-mb 25] [--prep-vocab 16384] [--prep-reps 3] [--num-proc 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt2.data.sources import shakespeare_files  # noqa: E402
from gpt2.tokenizers.bpe import ENCODER_ENV, HFTokenizer, train_bpe  # noqa: E402
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


def encode_rates(encoders: dict[str, Callable[[str], list[int]]], texts: list[str],
                 reps: int = 3) -> dict[str, tuple[int, float]]:
    """name -> (tokens, best tokens/s over reps) of encoding every text with one thread; the encoders take turns
    in each rep, so a change of load on a shared machine hits them alike."""
    best = dict.fromkeys(encoders, (0, 0.0))
    for _ in range(reps):
        for name, encode in encoders.items():
            t0 = time.perf_counter()
            n = sum(len(encode(t)) for t in texts)
            best[name] = (n, max(best[name][1], n / (time.perf_counter() - t0)))
    return best


def run_corpus(name: str, docs: list[str], vocabs: list[int], held_out: float, gpt2) -> list[dict]:
    cut = max(1, int(len(docs) * (1 - held_out)))
    train_docs, test_docs = docs[:cut], docs[cut:]
    train_bytes = sum(len(d.encode()) for d in train_docs)
    test_bytes = sum(len(d.encode()) for d in test_docs)
    test = chunks(test_docs)
    gpt2_row = {"corpus": name, "tokenizer": "GPT-2 (tiktoken)", "vocab": gpt2.n_vocab, "train_mb": None,
                "train_s": None, "s_per_100mb": None, "encoder": "tiktoken", "encode_hf_tok_s": None}
    rows, gpt2_rates = [gpt2_row], []
    for vocab in vocabs:
        t0 = time.perf_counter()
        text = train_bpe(iter(chunks(train_docs)), vocab, 2, ["<|endoftext|>"])
        seconds = time.perf_counter() - t0
        tok = HFTokenizer.from_json(text)
        hf = HFTokenizer.from_json(text, encoder="tokenizers")
        rates = encode_rates({"gpt2": gpt2.encode, "ours": tok.encode, "hf": hf.encode}, test)
        if [tok.encode(t) for t in test] != [hf.encode(t) for t in test]:
            raise SystemExit(f"{name} vocab {vocab}: the tiktoken and tokenizers paths give different ids")
        if tok.decode(tok.encode(test[0])) != test[0]:
            raise SystemExit(f"{name} vocab {vocab}: decode(encode(text)) is not the text")
        gpt2_rates.append(rates["gpt2"][1])
        gpt2_row["bytes_per_token"] = test_bytes / rates["gpt2"][0]
        rows.append({"corpus": name, "tokenizer": "our BPE", "vocab": tok.n_vocab, "train_mb": train_bytes / 1e6,
                     "train_s": seconds, "s_per_100mb": seconds / (train_bytes / 1e8),
                     "bytes_per_token": test_bytes / rates["ours"][0], "encode_tok_s": rates["ours"][1],
                     "encoder": "tiktoken" if tok.encoding is not None else "tokenizers",
                     "encode_hf_tok_s": rates["hf"][1], "gpt2_tok_s_alongside": rates["gpt2"][1]})
        print(f"  {name} vocab {vocab}: trained in {seconds:.1f}s", file=sys.stderr)
    gpt2_row["encode_tok_s"] = statistics.median(gpt2_rates)
    gpt2_row["gpt2_tok_s_alongside"] = gpt2_row["encode_tok_s"]
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
             "| encode tok/s (1 thread) | vs tiktoken | per byte | via tokenizers tok/s | vs tiktoken |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    gpt2_bpt = {r["corpus"]: r["bytes_per_token"] for r in rows if r["train_s"] is None}
    for r in rows:
        ratio, hf = r["encode_tok_s"] / r["gpt2_tok_s_alongside"], r["encode_hf_tok_s"]
        lines.append(f"| {r['corpus']} | {r['tokenizer']} | {r['vocab']:,} | {r['bytes_per_token']:.2f} | "
                     f"{_fmt(r['train_s'], '.1f')} | {_fmt(r['s_per_100mb'], ',.0f')} | {r['encode_tok_s']:,.0f} | "
                     f"{ratio:.2f}x | {ratio * r['bytes_per_token'] / gpt2_bpt[r['corpus']]:.2f}x | "
                     f"{_fmt(hf, ',.0f')} | "
                     f"{'-' if hf is None else format(hf / r['gpt2_tok_s_alongside'], '.2f') + 'x'} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ data preparation throughput

PREP_KINDS = ("gpt2", "bpe", "bpe-tokenizers")
"""GPT-2; our BPE as HFTokenizer runs it (tiktoken when exact); our BPE through tokenizers."""


PREP_CORPORA = ("shakespeare", "python")


def prep_corpus(name: str, out_dir: Path, target_mb: float, cache_dir: str) -> tuple[int, int]:
    """Shakespeare's plays, or standard-library Python files in path order, one .txt file each, repeated until
    target_mb MB; returns (files, bytes)."""
    docs = shakespeare_docs(cache_dir) if name == "shakespeare" else code_docs(target_mb)
    docs = [d for d in docs if d]  # data=text refuses empty files
    out_dir.mkdir(parents=True, exist_ok=True)
    n_files = n_bytes = 0
    while n_bytes < target_mb * 1e6:
        for doc in docs:
            data = doc.encode()
            (out_dir / f"{n_files:05d}.txt").write_bytes(data)
            n_files, n_bytes = n_files + 1, n_bytes + len(data)
            if n_bytes >= target_mb * 1e6:
                break
    return n_files, n_bytes


def prep_worker(kind: str, corpus: str, gpt2_vocab_file: str, bpe_json: str, num_proc: int) -> dict[str, Any]:
    """One prepare_data run into a fresh cache dir (run in its own process; the encoder choice comes from the
    environment): seconds, text tokens, and the sha256 of the shards."""
    from gpt2.config import DataConfig, TokenizerConfig
    from gpt2.data.preprocess import prepare_data

    tcfg = TokenizerConfig(path=gpt2_vocab_file) if kind == "gpt2" else TokenizerConfig(name="file", path=bpe_json)
    with tempfile.TemporaryDirectory(prefix="bench-tok-prep-") as cache:
        cfg = DataConfig(name="text", path=corpus, cache_dir=cache, num_proc=num_proc)
        t0 = time.perf_counter()
        prepared = prepare_data(cfg, tokenizer=tcfg)
        seconds = time.perf_counter() - t0
        digest = hashlib.sha256()
        for path in sorted(Path(prepared.folder).glob("*.bin")):
            digest.update(path.read_bytes())
        encoding = getattr(prepared.tokenizer, "encoding", None)
        return {"kind": kind, "seconds": seconds, "encoder": "tiktoken" if encoding is not None else "tokenizers",
                "tokens": prepared.n_train_tokens + prepared.n_val_tokens - prepared.meta["n_docs"],
                "shards_sha256": digest.hexdigest()}


def run_prep(name: str, target_mb: float, vocab: int, reps: int, num_proc: int, cache_dir: str,
             gpt2_vocab_file: str) -> list[dict]:
    """prepare_data throughput for PREP_KINDS on one corpus (medians of `reps` alternating runs)."""
    root = Path(tempfile.mkdtemp(prefix="bench-tok-corpus-"))
    try:
        corpus = root / "corpus"
        n_files, n_bytes = prep_corpus(name, corpus, target_mb, cache_dir)
        docs = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
        bpe_json = root / "bpe.json"
        bpe_json.write_text(train_bpe(iter(chunks(docs)), vocab, 2, ["<|endoftext|>"]), encoding="utf-8")
        del docs
        runs: dict[str, list[dict]] = {k: [] for k in PREP_KINDS}
        for _ in range(reps):
            for kind in PREP_KINDS:  # alternate, so load changes hit all three alike
                env = {**os.environ, ENCODER_ENV: "tokenizers" if kind == "bpe-tokenizers" else "auto"}
                cmd = [sys.executable, __file__, "--prep-worker", kind, "--corpus", str(corpus),
                       "--gpt2-vocab-file", gpt2_vocab_file, "--bpe-json", str(bpe_json), "--num-proc", str(num_proc)]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    raise SystemExit(f"prep worker {kind} failed:\n{res.stderr[-3000:]}")
                runs[kind].append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(f"  prep {name} {kind}: {runs[kind][-1]['seconds']:.1f}s", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if len({r["shards_sha256"] for k in ("bpe", "bpe-tokenizers") for r in runs[k]}) != 1:
        raise SystemExit(f"{name}: our BPE wrote different shards through tiktoken and through tokenizers")
    rows = []
    for kind, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        tokens = results[0]["tokens"]
        rows.append({"corpus": name, "kind": kind, "encoder": results[0]["encoder"],
                     "vocab": 50257 if kind == "gpt2" else vocab, "corpus_mb": n_bytes / 1e6, "files": n_files,
                     "num_proc": num_proc, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
                     "mb_s": n_bytes / 1e6 / seconds, "runs_s": [r["seconds"] for r in results]})
    return rows


def prep_table(rows: list[dict]) -> str:
    names = {"gpt2": "GPT-2 (tiktoken)", "bpe": "our BPE", "bpe-tokenizers": "our BPE, GPT2_BPE_ENCODER=tokenizers"}
    base = {r["corpus"]: r for r in rows if r["kind"] == "gpt2"}
    lines = ["| corpus | tokenizer | encoder | vocab | tokens | prep s (median) | prep tok/s | vs GPT-2 | MB/s | "
             "vs GPT-2 |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['corpus']}, {r['corpus_mb']:.0f} MB, {r['files']} files, {r['num_proc']} processes | "
              f"{names[r['kind']]} | {r['encoder']} | {r['vocab']:,} | {r['tokens']:,} | {r['seconds']:.1f} | "
              f"{r['tok_s']:,.0f} | {r['tok_s'] / base[r['corpus']]['tok_s']:.2f}x | {r['mb_s']:.1f} | "
              f"{r['mb_s'] / base[r['corpus']]['mb_s']:.2f}x |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--held-out", type=float, default=0.1, help="fraction of documents held out")
    parser.add_argument("--code-mb", type=float, default=8.0, help="MB of standard-library Python (0 = skip)")
    parser.add_argument("--scale-mb", type=float, nargs="*", default=[10, 25, 50, 100],
                        help="also time BPE training (16K ids) on this many MB of site-packages Python (none = skip)")
    parser.add_argument("--prep-mb", type=float, default=25.0,
                        help="MB of text per corpus for the data-preparation rows (0 = skip)")
    parser.add_argument("--prep-corpora", nargs="+", choices=PREP_CORPORA, default=list(PREP_CORPORA),
                        help="corpora of the data-preparation rows: the plays repeated, stdlib Python files")
    parser.add_argument("--prep-vocab", type=int, default=16384, help="ids of the BPE in the data-preparation rows")
    parser.add_argument("--prep-reps", type=int, default=3, help="data-preparation runs per tokenizer (median)")
    parser.add_argument("--num-proc", type=int, default=2, help="data.num_proc of the data-preparation rows")
    parser.add_argument("--cache-dir", default="~/.cache/gpt2")
    parser.add_argument("--json", default="benchmarks/results/tokenizer.json")
    parser.add_argument("--prep-worker", choices=PREP_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--gpt2-vocab-file", help=argparse.SUPPRESS)
    parser.add_argument("--bpe-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    if args.prep_worker:
        print(json.dumps(prep_worker(args.prep_worker, args.corpus, args.gpt2_vocab_file, args.bpe_json,
                                     args.num_proc)))
        return
    gpt2 = get_tokenizer(cache_dir=args.cache_dir)
    if gpt2.source is None and args.prep_mb > 0:
        raise SystemExit("GPT-2's vocabulary file is not available offline; "
                         "run gpt2.tokenizers.gpt2.fetch_vocab_file().")
    rows = run_corpus("shakespeare", shakespeare_docs(args.cache_dir), args.vocabs, args.held_out, gpt2)
    if args.code_mb > 0:
        rows += run_corpus("python stdlib", code_docs(args.code_mb), args.vocabs, args.held_out, gpt2)
    print(f"load average {os.getloadavg()[0]:.1f} (shared machine)")
    print(table(rows))
    scale = run_scale(args.scale_mb, 16384) if args.scale_mb else []
    if scale:
        print(f"load average {os.getloadavg()[0]:.1f} (shared machine)")
        print(scale_table(scale))
    prep = [row for name in (args.prep_corpora if args.prep_mb > 0 else [])
            for row in run_prep(name, args.prep_mb, args.prep_vocab, args.prep_reps, args.num_proc, args.cache_dir,
                                str(gpt2.source))]
    if prep:
        print(f"load average {os.getloadavg()[0]:.1f} (shared machine)")
        print(prep_table(prep))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows, "scale": scale, "prep": prep, "load": os.getloadavg()},
                                          indent=2))


if __name__ == "__main__":
    main()
