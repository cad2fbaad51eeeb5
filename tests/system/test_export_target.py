"""run_export.py into a folder that holds the user's own files: an export never deletes or replaces a file it
did not write. It lists what it wrote in export_manifest.json; a re-export replaces and removes only those,
and a file it would replace that no export wrote is refused with one error line, untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from gpt2.checkpoint.export import MANIFEST
from gpt2.config import ModelConfig
from gpt2.model.gpt import GPT
from gpt2.tokenizers.bpe import TOKENIZER_FILE
from gpt2.train.launch import train
from tests.helpers import bpe_overrides, compose_train, save_model_checkpoint

USER_FILES = {"tokenizer.json": '{"mine": true}\n', "README.md": "my notes\n", "notes/plan.txt": "keep\n"}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def export(checkpoint: Path, out: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """run_export.py's own main, in-process: (exit code, what it printed)."""
    from run_export import main

    try:
        code = main([str(checkpoint), str(out)])
    except SystemExit as stop:
        code = int(stop.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def user_folder(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory, tiktoken_file: str) -> Path:
    """A checkpoint of a tiny GPT with GPT-2's tokenizer (its export writes vocab.json + merges.txt)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=50257))
    root = tmp_path_factory.mktemp("export-gpt2") / "run"
    save_model_checkpoint(root, 3, model)
    return root


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory: pytest.TempPathFactory, bpe_cache: Path) -> Path:
    """A 1-step run with our BPE (its export writes tokenizer.json)."""
    root = tmp_path_factory.mktemp("export-bpe") / "run"
    train(compose_train(bpe_overrides(bpe_cache, "max_steps=1", "eval.sample_tokens=0", "data.max_tokens=20000")), root)
    return root


def test_the_users_files_survive_an_export_and_a_re_export(gpt2_run: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = user_folder(tmp_path / "mine", USER_FILES)
    mine = snapshot(out)
    for _ in range(2):  # the second export replaces the first one's files
        code, printed = export(gpt2_run, out, capsys)
        assert code == 0, printed
        after = snapshot(out)
        assert {k: after[k] for k in mine} == mine  # the user's tokenizer.json among them
        written = json.loads((out / MANIFEST).read_text())["files"]
        assert set(written) == set(after) - set(mine) - {MANIFEST}
        assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(written)
    assert not [p for p in tmp_path.iterdir() if p.name != "mine"]  # no temporary folder left


def test_a_re_export_removes_only_the_earlier_exports_files(gpt2_run: Path, bpe_run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "hf"
    code, printed = export(bpe_run, out, capsys)
    assert code == 0 and (out / TOKENIZER_FILE).exists(), printed
    user_folder(out, {"README.md": "model card\n"})
    code, printed = export(gpt2_run, out, capsys)  # the BPE export's tokenizer.json is its own: removed
    assert code == 0, printed
    assert not (out / TOKENIZER_FILE).exists() and (out / "vocab.json").exists()
    assert (out / "README.md").read_text() == "model card\n"
    code, printed = export(bpe_run, out, capsys)  # and back: vocab.json and merges.txt go
    assert code == 0, printed
    assert (out / TOKENIZER_FILE).exists() and not (out / "vocab.json").exists() and not (out / "merges.txt").exists()
    assert json.loads((out / MANIFEST).read_text())["files"] == sorted(p.name for p in out.iterdir()
                                                                       if p.name not in (MANIFEST, "README.md"))


def test_a_conflicting_user_tokenizer_is_refused_and_kept(bpe_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = user_folder(tmp_path / "mine", USER_FILES)
    before = snapshot(tmp_path)
    code, printed = export(bpe_run, out, capsys)
    assert code == 2
    lines = printed.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: export target {out} holds tokenizer.json, which no earlier export wrote (the folder has no "
        f"{MANIFEST}), and the export would replace it"), printed
    assert snapshot(tmp_path) == before  # nothing written, nothing removed, no temporary folder left


@pytest.mark.parametrize("manifest", ['{"files": ["../victim.txt"]}', "not json", '{"files": "config.json"}'])
def test_a_manifest_that_is_not_ours_is_refused_before_anything_changes(manifest: str, gpt2_run: Path,
                                                                         tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "victim.txt").write_text("precious\n")
    out = user_folder(tmp_path / "hf", {MANIFEST: manifest, "config.json": "{}\n"})
    before = snapshot(tmp_path)
    code, printed = export(gpt2_run, out, capsys)
    assert code == 2 and printed.startswith(f"error: {out / MANIFEST} is not an export manifest"), printed
    assert snapshot(tmp_path) == before
