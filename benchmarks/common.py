"""Helpers shared by the benchmark scripts: environment facts, medians, markdown tables, JSON output.

Benchmarks are not tests: they print a side-by-side table and write JSON (default
benchmarks/results/<name>.json, git-ignored). Run them from the repository root, e.g.
``.venv/bin/python benchmarks/train_throughput.py --help``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ on sys.path, not the repo root
    sys.path.insert(0, str(ROOT))

RESULTS_DIR = ROOT / "benchmarks" / "results"


def default_out(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def cpu_model() -> str:
    """`lscpu`'s model name (falls back to platform.processor())."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def environment(device: str = "cpu") -> dict[str, Any]:
    """Facts that make a number reproducible: date, CPU/GPU, cores, torch version, load."""
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    except ImportError:
        pass
    for mod in ("transformers", "tiktoken"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return info


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt(value: Any, spec: str = ",.0f") -> str:
    """A number formatted with `spec`; strings pass through, None becomes 'n/a'."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return format(value, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "environment": {**payload.get("environment", {}), "load_average_end": load_average()}}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
