"""run_generate.py as a subprocess: from a pretrained directory and from a training checkpoint, and its errors."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2.config import GenerateConfig, VocabFileConfig
from gpt2.generate.command import generate_samples
from gpt2.generate.sampling import generate
from tests.helpers import REPO, save_model_checkpoint, tiny_model


def run_generate(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "run_generate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_run_generate_cli(tiny_hf_dir: Path, tiktoken_file: str, tmp_path: Path) -> None:
    ok = run_generate([f"pretrained={tiny_hf_dir}", f"tokenizer.path={tiktoken_file}", "prompt=Hello world",
                       "max_new_tokens=24", "device=cpu", "seed=1", "num_samples=2"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    cfg = GenerateConfig(pretrained=str(tiny_hf_dir), tokenizer=VocabFileConfig(path=tiktoken_file),
                         prompt="Hello world", max_new_tokens=24, device="cpu", seed=1, num_samples=2)
    assert ok.stdout == "\n---------------\n".join(generate_samples(cfg, io.StringIO())) + "\n"
    long_prompt = "prompt=" + "word " * 120
    bad = run_generate([f"pretrained={tiny_hf_dir}", f"tokenizer.path={tiktoken_file}", long_prompt,
                        "max_new_tokens=20", "crop_prompt=false"], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: the prompt is 120 tokens") and "crop_prompt=true" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log file


@pytest.mark.slow
def test_run_generate_from_checkpoint_and_errors(tiktoken_file: str, tmp_path: Path) -> None:

    model = tiny_model(vocab_size=50257)
    run_dir = tmp_path / "run"
    save_model_checkpoint(run_dir, 3, model)
    work = tmp_path / "cwd"
    work.mkdir()
    ok = run_generate([f"checkpoint={run_dir}", f"tokenizer.path={tiktoken_file}", "prompt=ROMEO:", "max_new_tokens=8",
                       "temperature=0"], work)
    assert ok.returncode == 0, ok.stderr
    from gpt2.tokenizers.gpt2 import get_tokenizer

    tok = get_tokenizer(tiktoken_file)
    ids = generate(model, torch.tensor([tok.encode("ROMEO:")]), 8, temperature=0.0)
    assert ok.stdout == tok.decode(ids[0].tolist()) + "\n"

    bad = run_generate([f"checkpoint={tmp_path / 'missing'}", f"tokenizer.path={tiktoken_file}"], work)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    both = run_generate([f"checkpoint={run_dir}", "pretrained=gpt2"], work)
    assert both.returncode == 2 and "exactly one of checkpoint" in both.stderr and "Traceback" not in both.stderr
    assert sorted(p.name for p in work.iterdir()) == []
