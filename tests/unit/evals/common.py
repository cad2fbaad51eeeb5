"""Shared by the evaluation tests: HellaSwag-like items and helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers import REPO, subprocess_env

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "violin", "desert", "copper", "meadow", "harbor",
         "pencil", "falcon", "glacier", "lantern", "orchid", "saddle", "thunder", "velvet", "walnut"]


def tricky_items(n: int = 20, seed: int = 0) -> list[dict]:
    """Items in the HellaSwag schema: endings of different token lengths, leading/trailing spaces and
    punctuation, some contexts far longer than a 64-position window."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        ctx = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
        if i % 6 == 0:
            ctx = (ctx + ". ") * 20 + "Then"  # ~200+ tokens: cropped from the left
        if i % 5 == 1:
            ctx = "  " + ctx + ","
        endings = []
        for k in range(4):
            words = rng.choice(WORDS, size=int(rng.integers(1, 3 + 4 * k)))
            ending = " ".join(words) + ("." if k % 2 else "!?")
            endings.append((" " if (i + k) % 3 == 0 else "") + ending)
        items.append({"ind": i, "ctx": ctx, "endings": endings, "label": int(rng.integers(0, 4)), "split": "val"})
    return items


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    return path


CYCLE = """apple river stone cloud tiger lamp violin desert copper harbor pencil glacier lantern saddle thunder velvet
table chair window garden forest mountain ocean island bridge castle tower village city road train ship plane bird
horse sheep goat wolf bear fox rabbit mouse snake fish shark whale eagle owl bread cheese butter milk honey sugar salt
pepper rice bean corn wheat grape lemon orange cherry peach plum iron gold silver glass paper wood cotton silk wool
leather brick steel coal oil gas fire water snow rain wind storm sun moon star planet music song dance story poem
letter book page door""".split()


def predictable_items(n: int, seed: int) -> list[dict]:
    """The right ending continues the context's word cycle (CYCLE in order); the wrong ones are other
    words outside the context in random order (so a random model has nothing to prefer)."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        start = int(rng.integers(0, len(CYCLE)))
        cycle = [CYCLE[(start + j) % len(CYCLE)] for j in range(9)]
        unused = [w for w in CYCLE if w not in cycle[:6]]
        label = int(rng.integers(0, 4))
        endings = [" ".join(rng.permutation(unused)[:3]) for _ in range(4)]
        endings[label] = " ".join(cycle[6:])
        items.append({"ctx": " ".join(cycle[:6]), "endings": endings, "label": label})
    return items


def run_eval_cli(args: list[str], cwd: Path, nproc: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "run_eval.py"), *args]
    if nproc:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "run_eval.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
